//! datagen as a user runs it: the output appears only when complete, and a SIGTERM in the
//! middle (`docker compose down` during the first start) stops it at once and leaves no
//! partial file behind.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_sigterm_mid_generation_stops_it_and_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data.json");
    let mut child = Command::new(crate::support::tool("datagen"))
        .args(["--phones", "200", "--per-phone", "100000", "--out"])
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start datagen");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.starts_with("writing 20000000 records"), "{line}");
    let signalled = Instant::now();
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert_eq!(exit.code(), Some(1), "{rest}");
    assert!(rest.contains("interrupted; nothing written"), "{rest}");
    assert!(signalled.elapsed() < Duration::from_secs(10), "stopped promptly");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_complete_run_replaces_the_file_readable_by_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data.json");
    std::fs::write(&out, b"old").unwrap();
    let status = Command::new(crate::support::tool("datagen"))
        .args(["--phones", "3", "--per-phone", "10", "--out"])
        .arg(&out)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let bytes = std::fs::read(&out).unwrap();
    assert!(bytes.starts_with(b"[{\"phone\":0,"), "{}", String::from_utf8_lossy(&bytes[..40]));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&out).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o644);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary left");
}
