//! The real `report-service` binary as a child process, for tests that need a process
//! of its own (signals, crashes, memory, its own thread set-up): started on a test's
//! queues, its JSON log lines readable as they come.

use super::amqp::{Names, WAIT};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The log line of every (re)connect.
pub(crate) const READY: &str = r#""event":"Consumer connected and ready to consume messages.""#;

/// A report-service child process; its stdout lines arrive on `lines`. Killed when
/// dropped.
pub(crate) struct Worker {
    pub child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line read so far (for assertions and failure messages).
    pub log: Vec<String>,
}

impl Worker {
    /// Starts the binary on `names`' queues over `data`, its snapshot in `dir`, HTTP on
    /// an ephemeral port, with `extra` settings on top.
    pub(crate) fn start(
        names: &Names,
        data: &std::path::Path,
        dir: &std::path::Path,
        extra: &[(&str, &str)],
    ) -> Worker {
        Worker::start_binary(env!("CARGO_BIN_EXE_report-service").as_ref(), names, data, dir, extra)
    }

    /// [`Worker::start`] with another build of the binary (say, the release one).
    pub(crate) fn start_binary(
        binary: &std::path::Path,
        names: &Names,
        data: &std::path::Path,
        dir: &std::path::Path,
        extra: &[(&str, &str)],
    ) -> Worker {
        names.expect_service(extra);
        let mut command = Command::new(binary);
        command
            .envs(names.vars())
            .env("DATA_PATH", data)
            .env("SNAPSHOT_PATH", dir.join("cache.snapshot"))
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            // The binary sets up its own thread stacks: do not hand it the test's.
            .env_remove("RUST_MIN_STACK")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in extra {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start report-service");
        let (sender, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Worker { child, lines, log: Vec::new() }
    }

    /// Waits (bounded) for a stdout line containing `needle`; returns it.
    pub(crate) fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line with {needle:?}; got:\n{}", self.log.join("\n")));
            self.log.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// How many lines read so far contain `needle`.
    pub(crate) fn count(&self, needle: &str) -> usize {
        self.log.iter().filter(|line| line.contains(needle)).count()
    }

    /// The bound `/health` address, from the startup log line.
    pub(crate) fn http_addr(&mut self) -> SocketAddr {
        let line = self.wait_for("serving /health and /metrics");
        let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
        json["address"].as_str().and_then(|a| a.parse().ok()).expect("an address field")
    }

    /// Sends SIGTERM.
    pub(crate) fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal named `name` (`TERM`, `STOP`, ...).
    pub(crate) fn signal(&self, name: &str) {
        let status =
            Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Stops the process (SIGSTOP) and waits, bounded, until every one of its threads
    /// is stopped. `kill` only queues the signal: the threads stop as each next enters
    /// the kernel, so on a busy machine a running thread can go on for milliseconds (a
    /// CI run once saw the worker answer a task sent after `kill -STOP` returned).
    pub(crate) fn pause(&self) {
        self.signal("STOP");
        let threads = std::path::PathBuf::from(format!("/proc/{}/task", self.child.id()));
        let deadline = Instant::now() + WAIT;
        loop {
            let states: Vec<char> = std::fs::read_dir(&threads)
                .expect("the worker's threads")
                .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("stat")).ok())
                .filter_map(|stat| thread_state(&stat))
                .collect();
            if !states.is_empty() && states.iter().all(|state| *state == 'T') {
                return;
            }
            assert!(Instant::now() < deadline, "the worker's threads are not all stopped: {states:?}");
            std::thread::yield_now();
        }
    }

    /// Waits for the process to exit, at most `limit`; panics if it does not.
    pub(crate) fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {limit:?}");
            // Reading a log line is the one event this loop can block on without
            // missing the exit: its stdout closes when it exits.
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
                self.log.push(line);
            }
        }
    }

    /// Whether any line the process wrote before it exited contains `needle` (reads
    /// the rest of its output, waiting at most [`WAIT`] for it to close).
    pub(crate) fn logged_before_exit(&mut self, needle: &str) -> bool {
        let deadline = Instant::now() + WAIT;
        while let Ok(line) = self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            self.log.push(line);
        }
        self.count(needle) > 0
    }

    /// Resident memory in KiB; a process whose memory cannot be read fails the test
    /// (a 0 would turn every memory bound into one that always holds).
    pub(crate) fn rss_kib(&self) -> u64 {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        vm_rss_kib(&status).unwrap_or_else(|| panic!("{path} has no VmRSS line:\n{status}"))
    }
}

/// The `VmRSS` figure (KiB) of a `/proc/<pid>/status` text, if it has a positive one
/// (a live process always does; a zombie's line is missing).
fn vm_rss_kib(status: &str) -> Option<u64> {
    let field = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    field.trim().strip_suffix("kB")?.trim().parse().ok().filter(|&kib| kib > 0)
}

#[test]
fn rss_is_read_from_the_status_line_and_missing_is_none() {
    assert_eq!(vm_rss_kib("Name:\tx\nVmRSS:\t   12345 kB\nVmData:\t1 kB\n"), Some(12_345));
    assert_eq!(vm_rss_kib("Name:\tx\nState:\tZ (zombie)\n"), None);
    assert_eq!(vm_rss_kib("VmRSS:\t0 kB\n"), None);
    assert_eq!(vm_rss_kib("VmRSS:\tlots\n"), None);
}

/// `GET path` on `addr`: (status code, body).
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Already exited, or killed now: either way it is reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The state letter of a `/proc/<pid>/task/<tid>/stat` line: the first field after the
/// command name, which is in parentheses and may itself hold spaces and parentheses.
fn thread_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

#[test]
fn a_threads_state_is_read_after_its_command_name() {
    assert_eq!(thread_state("4242 (tokio-runtime-w) T 1 4242 0"), Some('T'));
    assert_eq!(thread_state("7 (a) b (c)) S 1 7"), Some('S'));
    assert_eq!(thread_state("7 (unterminated S 1"), None);
    assert_eq!(thread_state(""), None);
}
