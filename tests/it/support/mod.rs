//! Test support shared by the integration tests: a slow, obviously-correct reference
//! implementation of the statistics, and writers of data files in every layout.
pub(crate) mod amqp;
pub(crate) mod broker;
pub(crate) mod proxy;
#[cfg(feature = "tls")]
pub(crate) mod tls;
pub(crate) mod worker;

use report_service::data::stats::CallStats;
use serde::Deserialize;
use std::path::PathBuf;

/// One record as the reference sees it: serde's derive enforces the schema (integer
/// fields, no duplicate keys, unknown keys ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) struct RefRecord {
    pub phone: u64,
    pub start_date: i64,
    pub end_date: i64,
}

/// The whole file parsed with serde_json, or why it is not a valid data file.
pub(crate) fn reference_parse(bytes: &[u8]) -> Result<Vec<RefRecord>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// Statistics of each phone by a plain scan over every record, written independently of
/// `CallStats::record` (fields filled directly, buckets by an if-chain).
pub(crate) fn reference_stats(records: &[RefRecord], phones: &[u64]) -> Vec<CallStats> {
    phones
        .iter()
        .map(|&phone| {
            let durations: Vec<i128> = records
                .iter()
                .filter(|r| r.phone == phone)
                .map(|r| i128::from(r.end_date) - i128::from(r.start_date))
                .collect();
            let mut stats = CallStats::EMPTY;
            stats.records = durations.len() as u64;
            for &ms in &durations {
                if ms <= 10_000 {
                    stats.up_to_10s += 1;
                } else if ms <= 30_000 {
                    stats.from_10_to_30s += 1;
                } else {
                    stats.over_30s += 1;
                }
                if ms > 15_000 {
                    stats.over_15s_total_ms += ms;
                }
            }
            stats.total_ms = durations.iter().sum();
            stats.min_ms = durations.iter().copied().min().unwrap_or(i128::MAX);
            stats.max_ms = durations.iter().copied().max().unwrap_or(i128::MIN);
            stats
        })
        .collect()
}

/// A small deterministic generator for layout decisions (tests must be reproducible
/// from the proptest seed alone).
pub(crate) struct Dice(u64);

impl Dice {
    pub(crate) fn new(seed: u64) -> Dice {
        Dice(seed | 1)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

/// How a test file is written.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Style {
    /// Exactly the reference layout (the fast path).
    Compact,
    /// Random whitespace, key order, escaped keys and extra fields of every type, mixed
    /// with compact records; `seed` drives the choices.
    Varied { seed: u64 },
}

const WS: [&str; 6] = ["", " ", "\n", "\t", "\r\n  ", "   "];
const EXTRAS: [&str; 8] = [
    r#""note":"he said \"},{\" then [1,2], {\"phone\": 1}""#,
    r#""meta":{"a":[null,true,false,{"b":-1.5e-3}],"c":"}{"}"#,
    r#""s":"Tele2 \u00e9 \ud83d\udcde \/ \b\f\n\r\t \\""#,
    r#""arr":[[],{},[[[]]],0,-0.0,1E+2]"#,
    r#""phone_like":"{\"phone\":9,\"start_date\":0,\"end_date\":0}""#,
    r#""e":"""#,
    "\"utf8\":\"привет, мир\"",
    r#""num":123456789012345678901234567890"#,
];

/// Writes `records` as a JSON array in `style`.
pub(crate) fn render(records: &[RefRecord], style: Style) -> Vec<u8> {
    let mut out = Vec::new();
    let mut dice = match style {
        Style::Compact => None,
        Style::Varied { seed } => Some(Dice::new(seed)),
    };
    let ws = |dice: &mut Option<Dice>, out: &mut Vec<u8>| {
        if let Some(d) = dice {
            out.extend_from_slice(WS[d.below(WS.len())].as_bytes());
        }
    };
    ws(&mut dice, &mut out);
    out.push(b'[');
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            ws(&mut dice, &mut out);
            out.push(b',');
        }
        ws(&mut dice, &mut out);
        let text = dice.as_mut().and_then(|d| (d.below(3) > 0).then(|| varied_record(r, d)));
        let text = text.unwrap_or_else(|| {
            format!(r#"{{"phone":{},"start_date":{},"end_date":{}}}"#, r.phone, r.start_date, r.end_date)
        });
        out.extend_from_slice(text.as_bytes());
    }
    ws(&mut dice, &mut out);
    out.push(b']');
    ws(&mut dice, &mut out);
    out
}

fn varied_record(r: &RefRecord, d: &mut Dice) -> String {
    let phone_key = if d.below(8) == 0 { r#""ph\u006fne""# } else { r#""phone""# };
    let mut fields = vec![
        format!("{phone_key}{}:{}{}", WS[d.below(6)], WS[d.below(6)], r.phone),
        format!(r#""start_date":{}{}"#, WS[d.below(6)], r.start_date),
        format!(r#""end_date"{}:{}"#, WS[d.below(6)], r.end_date),
    ];
    for _ in 0..d.below(3) {
        fields.push(EXTRAS[d.below(EXTRAS.len())].to_owned());
    }
    for i in (1..fields.len()).rev() {
        let j = d.below(i + 1);
        fields.swap(i, j);
    }
    let sep = format!("{},{}", WS[d.below(6)], WS[d.below(6)]);
    format!("{{{}{}{}}}", WS[d.below(6)], fields.join(&sep), WS[d.below(6)])
}

/// A task body: `{"correlation_id": id, "phones": phones}` (any JSON id).
pub(crate) fn task(id: impl serde::Serialize, phones: &[u64]) -> String {
    serde_json::json!({ "correlation_id": id, "phones": phones }).to_string()
}

/// Writes `bytes` to a fresh file in its own temporary directory.
pub(crate) fn temp_file(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("data.json");
    std::fs::write(&path, bytes).expect("write test data");
    (dir, path)
}

pub(crate) fn pool(threads: usize) -> report_service::platform::pool::WorkerPool {
    report_service::platform::pool::WorkerPool::new("test", threads).expect("test pool")
}

/// Starts an in-process service on `names`' queues over `data`, with its snapshot in
/// `dir`, HTTP on an ephemeral port, and `extra` settings on top.
pub(crate) async fn start_service(
    names: &amqp::Names,
    data: &std::path::Path,
    dir: &std::path::Path,
    extra: &[(&str, &str)],
    clock: std::sync::Arc<dyn report_service::platform::clock::Clock>,
) -> report_service::app::Running {
    let mut vars: std::collections::HashMap<String, String> =
        names.vars().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    for (k, v) in [
        ("DATA_PATH", data.display().to_string()),
        ("SNAPSHOT_PATH", dir.join("cache.snapshot").display().to_string()),
        ("SNAPSHOT_INTERVAL_MS", "10".to_owned()),
        ("HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("WORKER_THREADS", "2".to_owned()),
        ("SHUTDOWN_TIMEOUT_SECS", "20".to_owned()),
    ] {
        vars.insert(k.to_owned(), v);
    }
    for (k, v) in extra {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    let config = report_service::config::Config::from_vars(&vars).expect("test config");
    let settings: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    names.expect_service(&settings);
    report_service::app::start(config, clock).await.expect("service starts")
}

/// The path of one of report-tools' binaries (`producer`, `datagen`). They belong to a
/// crate of their own, so cargo gives this package no `CARGO_BIN_EXE_` for them: they
/// are built here, once per test run, with the profile this test binary was built with
/// (a no-op when `cargo test` at the workspace root has built them already).
pub(crate) fn tool(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let worker = std::path::Path::new(env!("CARGO_BIN_EXE_report-service"));
    let built = BUILT.get_or_init(|| {
        let profile = match worker.parent().and_then(|dir| dir.file_name()).and_then(|name| name.to_str()) {
            Some("debug") | None => "dev".to_owned(),
            Some(other) => other.to_owned(),
        };
        let status = std::process::Command::new(option_env!("CARGO").unwrap_or("cargo"))
            .args(["build", "--locked", "--quiet", "-p", "report-tools", "--bins", "--profile", &profile])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if status.success() { Ok(()) } else { Err(format!("cargo build -p report-tools failed: {status}")) }
    });
    if let Err(why) = built {
        panic!("{why}");
    }
    worker.with_file_name(name)
}
