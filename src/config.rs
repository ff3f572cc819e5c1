//! Configuration: one typed [`Config`], read from environment variables (each also a
//! command-line flag of the same name in kebab case), validated at startup.
//!
//! Building a `Config` from a map of variables is pure ([`Config::from_vars`]), so tests
//! build configs without touching the process environment. A bad value is reported
//! with the variable's name; nothing here connects, opens or binds anything.

use crate::broker::{AmqpAddresses, TlsSettings, redact};
use crate::delivery::topology::QueueType;
use crate::platform::heap::HugePages;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

/// One setting: its variable, default (None = computed) and meaning.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The environment variable (and, in kebab case, the flag).
    pub variable: &'static str,
    /// Its default, if it has a fixed one.
    pub default: Option<&'static str>,
    /// What it sets, for `--help`.
    pub help: &'static str,
}

/// Every setting, in README order. Defaults are stated here and nowhere else in code;
/// each number's accepted range is in [`Config::from_vars`] and the README.
pub const SETTINGS: [Setting; 28] = [
    Setting {
        variable: "AMQP_URL",
        default: Some("amqp://guest:guest@127.0.0.1:5672/%2f"),
        help: "broker URL, or a cluster's node URLs separated by commas",
    },
    Setting {
        variable: "AMQP_URL_FILE",
        default: None,
        help: "a file holding the broker URL, instead of AMQP_URL (Docker secrets)",
    },
    Setting {
        variable: "AMQP_PASSWORD_FILE",
        default: None,
        help: "a file holding the broker password, replacing the URL's",
    },
    Setting {
        variable: "AMQP_CA_FILE",
        default: None,
        help: "PEM CA certificates trusted for amqps:// besides the system's",
    },
    Setting {
        variable: "AMQP_CLIENT_CERT_FILE",
        default: None,
        help: "PEM client certificate chain for amqps:// (mutual TLS)",
    },
    Setting { variable: "AMQP_CLIENT_KEY_FILE", default: None, help: "PEM private key of AMQP_CLIENT_CERT_FILE" },
    Setting {
        variable: "QUEUE_TYPE",
        default: Some("classic"),
        help: "how the service declares its queues: classic (the vhost's default type) or quorum",
    },
    Setting { variable: "TASK_QUEUE", default: Some("task_report"), help: "queue tasks are consumed from" },
    Setting { variable: "REPORT_QUEUE", default: Some("ready_report"), help: "queue reports go to without reply_to" },
    Setting {
        variable: "DEAD_LETTER_QUEUE",
        default: Some("task_report.dlq"),
        help: "queue unusable messages are copied to",
    },
    Setting {
        variable: "DATA_PATH",
        default: Some("data/data.json"),
        help: "the call records: a file, or a directory of *.json segments",
    },
    Setting { variable: "CACHE_TTL_SECS", default: Some("600"), help: "cache TTL in seconds; 0 disables the cache" },
    Setting {
        variable: "CACHE_MAX_ENTRIES",
        default: Some("100000"),
        help: "the most phones cached (about 440 bytes each)",
    },
    Setting { variable: "SNAPSHOT_PATH", default: Some("data/cache.snapshot"), help: "cache snapshot file" },
    Setting { variable: "SNAPSHOT_INTERVAL_MS", default: Some("1000"), help: "write-behind period of the snapshot" },
    Setting {
        variable: "INDEX_DIR",
        default: None,
        help: "where each data file's index is kept between starts (default: the snapshot's directory)",
    },
    Setting {
        variable: "DATA_POLL_INTERVAL_MS",
        default: Some("2000"),
        help: "how often the data file or directory is checked for changes",
    },
    Setting { variable: "PREFETCH", default: Some("64"), help: "tasks in flight per instance (1..=65535)" },
    Setting { variable: "MAX_PHONES_PER_TASK", default: Some("10000"), help: "larger tasks get an error report" },
    Setting { variable: "MAX_TASK_BYTES", default: Some("1048576"), help: "larger bodies are dead-lettered" },
    Setting {
        variable: "MAX_ATTEMPTS",
        default: Some("5"),
        help: "processing attempts before a failing task is dead-lettered",
    },
    Setting {
        variable: "RETRY_DELAY_MS",
        default: Some("1000"),
        help: "wait after a failed attempt; doubles each time",
    },
    Setting { variable: "WORKER_THREADS", default: None, help: "rayon pool size (default: number of cores)" },
    Setting {
        variable: "ASYNC_THREADS",
        default: Some("1"),
        help: "threads of the async runtime, which awaits the broker (the CPU work runs on WORKER_THREADS)",
    },
    Setting {
        variable: "TRANSPARENT_HUGE_PAGES",
        default: Some("off"),
        help: "off: the process opts out of transparent huge pages; system: the system's policy applies",
    },
    Setting { variable: "HTTP_ADDR", default: Some("127.0.0.1:9090"), help: "address of /health and /metrics" },
    Setting { variable: "SHUTDOWN_TIMEOUT_SECS", default: Some("30"), help: "drain limit on SIGTERM/SIGINT" },
    Setting { variable: "RUST_LOG", default: Some("info"), help: "log filter (tracing EnvFilter syntax)" },
];

/// A setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {variable}={value:?}: expected {expected}")]
pub struct ConfigError {
    /// The setting's variable.
    pub variable: &'static str,
    /// The value as given (a URL's password redacted).
    pub value: String,
    /// What would have been accepted.
    pub expected: String,
}

/// The service's settings. See [`SETTINGS`] for defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `AMQP_URL`, or the contents of `AMQP_URL_FILE`: one broker or a cluster's nodes;
    /// every password replaced by the contents of `AMQP_PASSWORD_FILE` if set.
    pub amqp_urls: AmqpAddresses,
    /// `AMQP_CA_FILE`, `AMQP_CLIENT_CERT_FILE`, `AMQP_CLIENT_KEY_FILE`, read and checked.
    pub tls: TlsSettings,
    /// `QUEUE_TYPE`.
    pub queue_type: QueueType,
    /// `TASK_QUEUE`.
    pub task_queue: String,
    /// `REPORT_QUEUE`.
    pub report_queue: String,
    /// `DEAD_LETTER_QUEUE`.
    pub dead_letter_queue: String,
    /// `DATA_PATH`.
    pub data_path: PathBuf,
    /// `CACHE_TTL_SECS`; zero disables the cache.
    pub cache_ttl: Duration,
    /// `CACHE_MAX_ENTRIES`: the most phones the cache holds.
    pub cache_max_entries: NonZeroUsize,
    /// `SNAPSHOT_PATH`.
    pub snapshot_path: PathBuf,
    /// `SNAPSHOT_INTERVAL_MS`.
    pub snapshot_interval: Duration,
    /// `INDEX_DIR`: where each data file's index is kept between starts; by default the
    /// directory of `SNAPSHOT_PATH` (the data volume may be read-only).
    pub index_dir: PathBuf,
    /// `DATA_POLL_INTERVAL_MS`.
    pub data_poll_interval: Duration,
    /// `PREFETCH`.
    pub prefetch: NonZeroU16,
    /// `MAX_PHONES_PER_TASK`.
    pub max_phones_per_task: NonZeroUsize,
    /// `MAX_TASK_BYTES`.
    pub max_task_bytes: NonZeroUsize,
    /// `MAX_ATTEMPTS`.
    pub max_attempts: NonZeroU32,
    /// `RETRY_DELAY_MS`: the wait after a task's first failed attempt; doubled after
    /// each further one.
    pub retry_delay: Duration,
    /// `WORKER_THREADS`.
    pub worker_threads: NonZeroUsize,
    /// `ASYNC_THREADS`.
    pub async_threads: NonZeroUsize,
    /// `TRANSPARENT_HUGE_PAGES`: applied by the binary before any thread starts (see
    /// [`HugePages`]).
    pub huge_pages: HugePages,
    /// `HTTP_ADDR`.
    pub http_addr: SocketAddr,
    /// `SHUTDOWN_TIMEOUT_SECS`.
    pub shutdown_timeout: Duration,
    /// `RUST_LOG`.
    pub log_filter: String,
}

impl Config {
    /// Builds a config from variables (missing ones take their defaults).
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let get = |variable: &'static str| -> Value {
            let default = SETTINGS.iter().find(|s| s.variable == variable).and_then(|s| s.default);
            Value { variable, raw: vars.get(variable).map(String::as_str).or(default) }
        };
        let amqp_urls = broker_urls(vars, &get)?;
        let tls = tls_settings(&amqp_urls, &get)?;
        Ok(Config {
            amqp_urls,
            tls,
            queue_type: match get("QUEUE_TYPE").raw.map(str::trim) {
                Some("classic") => QueueType::Classic,
                Some("quorum") => QueueType::Quorum,
                _ => return Err(get("QUEUE_TYPE").error("classic or quorum")),
            },
            task_queue: get("TASK_QUEUE").queue(255 - crate::delivery::retry::QUEUE_SUFFIX_MAX_LEN)?,
            report_queue: get("REPORT_QUEUE").queue(255)?,
            dead_letter_queue: get("DEAD_LETTER_QUEUE").queue(255)?,
            data_path: get("DATA_PATH").path()?,
            cache_ttl: Duration::from_secs(get("CACHE_TTL_SECS").number(0, 31_536_000)?),
            cache_max_entries: get("CACHE_MAX_ENTRIES").positive(1, 100_000_000, usize_non_zero)?,
            snapshot_path: get("SNAPSHOT_PATH").path()?,
            index_dir: match get("INDEX_DIR").raw {
                Some(_) => get("INDEX_DIR").path()?,
                None => {
                    let snapshot = get("SNAPSHOT_PATH").path()?;
                    snapshot
                        .parent()
                        .filter(|dir| !dir.as_os_str().is_empty())
                        .map_or(PathBuf::from("."), PathBuf::from)
                }
            },
            snapshot_interval: Duration::from_millis(get("SNAPSHOT_INTERVAL_MS").number(10, 3_600_000)?),
            data_poll_interval: Duration::from_millis(get("DATA_POLL_INTERVAL_MS").number(10, 3_600_000)?),
            prefetch: get("PREFETCH")
                .positive(1, u16::MAX.into(), |n| u16::try_from(n).ok().and_then(NonZeroU16::new))?,
            max_phones_per_task: get("MAX_PHONES_PER_TASK").positive(1, 1_000_000, usize_non_zero)?,
            max_task_bytes: get("MAX_TASK_BYTES").positive(64, 128 << 20, usize_non_zero)?,
            max_attempts: get("MAX_ATTEMPTS").positive(1, 100, |n| u32::try_from(n).ok().and_then(NonZeroU32::new))?,
            retry_delay: Duration::from_millis(get("RETRY_DELAY_MS").number(10, 300_000)?),
            worker_threads: match get("WORKER_THREADS").raw {
                Some(_) => get("WORKER_THREADS").positive(1, 1024, usize_non_zero)?,
                None => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            },
            async_threads: get("ASYNC_THREADS").positive(1, 1024, usize_non_zero)?,
            huge_pages: match get("TRANSPARENT_HUGE_PAGES").raw.map(str::trim) {
                Some("off") => HugePages::Off,
                Some("system") => HugePages::System,
                _ => return Err(get("TRANSPARENT_HUGE_PAGES").error("off or system")),
            },
            http_addr: get("HTTP_ADDR").parse("a socket address such as 127.0.0.1:9090")?,
            shutdown_timeout: Duration::from_secs(get("SHUTDOWN_TIMEOUT_SECS").number(1, 3_600)?),
            log_filter: get("RUST_LOG").text()?,
        })
    }

    /// The process environment's values of every setting.
    pub fn env_vars() -> HashMap<String, String> {
        SETTINGS
            .iter()
            .filter_map(|s| std::env::var(s.variable).ok().map(|value| (s.variable.to_owned(), value)))
            .collect()
    }

    /// The environment, overridden by whichever setting flags (see [`flags`]) were given.
    pub fn from_env_and_flags(matches: &clap::ArgMatches) -> Result<Config, ConfigError> {
        let mut vars = Config::env_vars();
        for setting in SETTINGS {
            // `Err` for a setting this command does not offer as a flag.
            if let Ok(Some(value)) = matches.try_get_one::<String>(setting.variable) {
                vars.insert(setting.variable.to_owned(), value.clone());
            }
        }
        Config::from_vars(&vars)
    }
}

/// The command-line flags of the settings `offered` (`AMQP_URL` -> `--amqp-url`), global
/// to every subcommand, each with its variable and default in the help.
pub fn flags(offered: impl Fn(&Setting) -> bool) -> impl Iterator<Item = clap::Arg> {
    SETTINGS.iter().filter(move |s| offered(s)).map(|s| {
        let default = s.default.map_or_else(String::new, |d| format!(" [default: {d}]"));
        clap::Arg::new(s.variable)
            .long(s.variable.to_ascii_lowercase().replace('_', "-"))
            .global(true)
            .help(format!("{} ({}){default}", s.help, s.variable))
    })
}

/// The broker URLs: `AMQP_URL` or the contents of `AMQP_URL_FILE` (not both), one URL or
/// several separated by commas, with the password from `AMQP_PASSWORD_FILE` if set.
fn broker_urls<'a>(
    vars: &HashMap<String, String>,
    get: &impl Fn(&'static str) -> Value<'a>,
) -> Result<AmqpAddresses, ConfigError> {
    let url_file = get("AMQP_URL_FILE");
    let url = match url_file.raw {
        Some(_) if vars.contains_key("AMQP_URL") => return Err(url_file.error("AMQP_URL_FILE or AMQP_URL, not both")),
        Some(_) => {
            let text = url_file.read_file()?;
            Value { variable: "AMQP_URL_FILE", raw: Some(text.trim()) }.amqp_urls()?
        }
        None => get("AMQP_URL").amqp_urls()?,
    };
    let password_file = get("AMQP_PASSWORD_FILE");
    if password_file.raw.is_none() {
        return Ok(url);
    }
    let text = password_file.read_file()?;
    // `echo secret > file` leaves a newline that is not part of the password.
    let password = text.strip_suffix('\n').map_or(text.as_str(), |p| p.strip_suffix('\r').unwrap_or(p));
    url.with_password(password).map_err(|e| password_file.error(e.to_string()))
}

/// The TLS files, only with an `amqps://` URL (a CA file beside a plain URL would
/// otherwise leave the operator believing the connection is encrypted).
fn tls_settings<'a>(url: &AmqpAddresses, get: &impl Fn(&'static str) -> Value<'a>) -> Result<TlsSettings, ConfigError> {
    let (ca, cert, key) = (get("AMQP_CA_FILE"), get("AMQP_CLIENT_CERT_FILE"), get("AMQP_CLIENT_KEY_FILE"));
    let mut settings = TlsSettings::system_only();
    for file in [&ca, &cert, &key] {
        if file.raw.is_some() && !url.is_tls() {
            return Err(file.error("to be unset: AMQP_URL is not amqps://"));
        }
    }
    if ca.raw.is_some() {
        settings = settings.with_ca_pem(ca.read_file()?).map_err(|e| ca.error(format!("a PEM CA file: {e}")))?;
    }
    match (cert.raw, key.raw) {
        (None, None) => {}
        (Some(_), Some(_)) => {
            settings = settings
                .with_client_identity(cert.read_file()?, key.read_file()?)
                .map_err(|e| cert.error(format!("a PEM certificate matching AMQP_CLIENT_KEY_FILE: {e}")))?;
        }
        (Some(_), None) => return Err(key.error("set too: AMQP_CLIENT_CERT_FILE needs its key")),
        (None, Some(_)) => return Err(cert.error("set too: AMQP_CLIENT_KEY_FILE needs its certificate")),
    }
    Ok(settings)
}

/// A variable's raw value (or default) being validated.
struct Value<'a> {
    variable: &'static str,
    raw: Option<&'a str>,
}

fn usize_non_zero(n: u64) -> Option<NonZeroUsize> {
    usize::try_from(n).ok().and_then(NonZeroUsize::new)
}

impl Value<'_> {
    fn error(&self, expected: impl Into<String>) -> ConfigError {
        let raw = self.raw.unwrap_or("");
        // A URL may carry a password; no other setting is secret (files are named, never
        // quoted).
        let value = if self.variable.starts_with("AMQP_URL") { redact(raw) } else { raw.to_owned() };
        ConfigError { variable: self.variable, value, expected: expected.into() }
    }

    /// The contents of the file this variable names (UTF-8).
    fn read_file(&self) -> Result<String, ConfigError> {
        let path = self.raw.filter(|p| !p.is_empty()).ok_or_else(|| self.error("a file path"))?;
        std::fs::read_to_string(path).map_err(|e| self.error(format!("a readable UTF-8 file ({e})")))
    }

    fn text(&self) -> Result<String, ConfigError> {
        self.raw.map(str::to_owned).ok_or_else(|| self.error("a value"))
    }

    fn parse<T: std::str::FromStr>(&self, expected: &str) -> Result<T, ConfigError> {
        self.raw.and_then(|raw| raw.trim().parse().ok()).ok_or_else(|| self.error(expected))
    }

    /// [`Value::number`] as a non-zero type (`min` is at least 1).
    fn positive<T>(&self, min: u64, max: u64, convert: impl FnOnce(u64) -> Option<T>) -> Result<T, ConfigError> {
        let n = self.number(min, max)?;
        convert(n).ok_or_else(|| self.error(format!("a whole number from {min} to {max}")))
    }

    /// A whole number in `min..=max`; the error names the range.
    fn number(&self, min: u64, max: u64) -> Result<u64, ConfigError> {
        let expected = || format!("a whole number from {min} to {max}");
        match self.raw.and_then(|raw| raw.trim().parse::<u64>().ok()) {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.error(expected())),
        }
    }

    fn path(&self) -> Result<PathBuf, ConfigError> {
        match self.raw {
            Some(raw) if !raw.is_empty() => Ok(PathBuf::from(raw)),
            _ => Err(self.error("a file path")),
        }
    }

    /// AMQP short strings are at most 255 bytes; the task queue leaves room for the
    /// suffix of its retry queues.
    fn queue(&self, max: usize) -> Result<String, ConfigError> {
        match self.raw {
            Some(raw) if !raw.is_empty() && raw.len() <= max => Ok(raw.to_owned()),
            _ => Err(self.error(format!("a queue name of 1 to {max} bytes"))),
        }
    }

    fn amqp_urls(&self) -> Result<AmqpAddresses, ConfigError> {
        AmqpAddresses::parse(self.raw.unwrap_or("")).map_err(|e| self.error(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = config(&[]).expect("defaults are valid");
        assert_eq!(c.amqp_urls.first().expose(), "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(
            (c.task_queue.as_str(), c.report_queue.as_str(), c.dead_letter_queue.as_str()),
            ("task_report", "ready_report", "task_report.dlq")
        );
        assert_eq!((c.cache_ttl, c.cache_max_entries.get()), (Duration::from_secs(600), 100_000));
        assert_eq!(c.snapshot_interval, Duration::from_millis(1000));
        assert_eq!(c.index_dir, PathBuf::from("data"), "beside the snapshot");
        assert_eq!(config(&[("SNAPSHOT_PATH", "/snap/cache.snapshot")]).unwrap().index_dir, PathBuf::from("/snap"));
        assert_eq!(config(&[("SNAPSHOT_PATH", "cache.snapshot")]).unwrap().index_dir, PathBuf::from("."));
        assert_eq!(config(&[("INDEX_DIR", "/var/lib/idx")]).unwrap().index_dir, PathBuf::from("/var/lib/idx"));
        assert_eq!(c.data_poll_interval, Duration::from_millis(2000));
        assert_eq!((c.prefetch.get(), c.max_phones_per_task.get(), c.max_task_bytes.get()), (64, 10_000, 1_048_576));
        assert_eq!(c.http_addr, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!((c.max_attempts.get(), c.retry_delay), (5, Duration::from_secs(1)));
        assert_eq!(c.worker_threads, std::thread::available_parallelism().unwrap());
        assert_eq!(c.async_threads.get(), 1);
        assert_eq!(c.huge_pages, HugePages::Off);
    }

    #[test]
    fn transparent_huge_pages_are_off_or_left_to_the_system() {
        assert_eq!(config(&[("TRANSPARENT_HUGE_PAGES", "system")]).unwrap().huge_pages, HugePages::System);
        assert_eq!(config(&[("TRANSPARENT_HUGE_PAGES", "off")]).unwrap().huge_pages, HugePages::Off);
        let err = config(&[("TRANSPARENT_HUGE_PAGES", "always")]).unwrap_err();
        assert_eq!(err.to_string(), "invalid TRANSPARENT_HUGE_PAGES=\"always\": expected off or system");
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (variable, value) in [
            ("PREFETCH", "0"),
            ("PREFETCH", "70000"),
            ("CACHE_TTL_SECS", "-1"),
            ("SNAPSHOT_INTERVAL_MS", "0"),
            ("HTTP_ADDR", "localhost"),
            ("WORKER_THREADS", "many"),
            ("TASK_QUEUE", ""),
            ("AMQP_URL", "http://example.com"),
            ("AMQP_URL", "amqps://u:p@host/%2f?frame_max=0"),
            ("AMQP_URL", "amqp://u:p@host/%2f?frame_max=262144"),
            ("AMQP_URL", "amqp://u:p@host/%2f?frame_max=0"),
        ] {
            let err = config(&[(variable, value)]).expect_err(value);
            assert_eq!(err.variable, variable);
            assert!(err.to_string().starts_with(&format!("invalid {variable}=")), "{err}");
        }
    }

    #[test]
    fn a_bad_value_other_than_a_url_is_quoted_as_given() {
        let err = config(&[("PREFETCH", "lots")]).unwrap_err();
        assert_eq!(err.to_string(), "invalid PREFETCH=\"lots\": expected a whole number from 1 to 65535");
    }

    /// A file in a fresh temporary directory.
    fn file(contents: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, contents).unwrap();
        (dir, path.display().to_string())
    }

    #[test]
    fn the_url_can_come_from_a_file_but_not_from_both() {
        let (_dir, path) = file("amqp://svc:s3cret@rabbit:5672/%2f\n");
        let c = config(&[("AMQP_URL_FILE", &path)]).unwrap();
        assert_eq!(c.amqp_urls.first().expose(), "amqp://svc:s3cret@rabbit:5672/%2f");
        let err = config(&[("AMQP_URL_FILE", &path), ("AMQP_URL", "amqp://rabbit")]).unwrap_err();
        assert_eq!(err.variable, "AMQP_URL_FILE");
        let err = config(&[("AMQP_URL_FILE", "/nonexistent/url")]).unwrap_err();
        assert!(err.to_string().contains("a readable UTF-8 file"), "{err}");
        let (_bad, bad) = file("http://svc:s3cret@rabbit\n");
        let err = config(&[("AMQP_URL_FILE", &bad)]).unwrap_err();
        assert_eq!(err.variable, "AMQP_URL_FILE");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn a_password_file_replaces_the_urls_password_encoded_and_never_shows() {
        let (_dir, path) = file("p@ss:w/rd\n");
        let c = config(&[("AMQP_URL", "amqp://svc@rabbit:5672/%2f"), ("AMQP_PASSWORD_FILE", &path)]).unwrap();
        assert_eq!(c.amqp_urls.first().expose(), "amqp://svc:p%40ss%3Aw%2Frd@rabbit:5672/%2f");
        let uri: lapin::uri::AMQPUri = c.amqp_urls.first().expose().parse().unwrap();
        assert_eq!(uri.authority.userinfo.password, "p@ss:w/rd", "lapin decodes it back");
        assert!(!format!("{c:?}").contains("p@ss") && !c.amqp_urls.to_string().contains("ss"));
        let err = config(&[("AMQP_URL", "amqp://rabbit/%2f"), ("AMQP_PASSWORD_FILE", &path)]).unwrap_err();
        assert_eq!(err.variable, "AMQP_PASSWORD_FILE");
        assert!(!err.to_string().contains("p@ss"), "{err}");
        let (_empty_dir, empty) = file("\n");
        let err = config(&[("AMQP_PASSWORD_FILE", &empty)]).unwrap_err();
        assert_eq!(err.variable, "AMQP_PASSWORD_FILE");
    }

    #[test]
    fn tls_files_need_an_amqps_url_and_a_certificate_needs_its_key() {
        let (_dir, path) = file("-----BEGIN CERTIFICATE-----\n");
        for variable in ["AMQP_CA_FILE", "AMQP_CLIENT_CERT_FILE", "AMQP_CLIENT_KEY_FILE"] {
            let err = config(&[(variable, &path)]).unwrap_err();
            assert_eq!(err.variable, variable);
            assert!(err.to_string().contains("AMQP_URL is not amqps://"), "{err}");
        }
        if crate::broker::tls::AVAILABLE {
            let tls = ("AMQP_URL", "amqps://svc:pw@rabbit:5671/%2f");
            assert!(config(&[tls]).unwrap().amqp_urls.is_tls());
            assert_eq!(config(&[tls, ("AMQP_CLIENT_CERT_FILE", &path)]).unwrap_err().variable, "AMQP_CLIENT_KEY_FILE");
            assert_eq!(config(&[tls, ("AMQP_CLIENT_KEY_FILE", &path)]).unwrap_err().variable, "AMQP_CLIENT_CERT_FILE");
            let err = config(&[tls, ("AMQP_CA_FILE", &path)]).unwrap_err();
            assert_eq!(err.variable, "AMQP_CA_FILE");
            assert!(err.to_string().contains("a PEM CA file"), "{err}");
        } else {
            let err = config(&[("AMQP_URL", "amqps://svc:pw@rabbit:5671/%2f")]).unwrap_err();
            assert!(err.to_string().contains("built without the `tls` feature"), "{err}");
        }
    }

    #[test]
    fn zero_ttl_is_allowed_and_disables_the_cache() {
        assert_eq!(config(&[("CACHE_TTL_SECS", "0")]).unwrap().cache_ttl, Duration::ZERO);
    }

    #[test]
    fn passwords_never_appear_in_debug_display_or_errors() {
        let c = config(&[("AMQP_URL", "amqp://svc:s3cret@rabbit:5672/%2f")]).unwrap();
        assert_eq!(c.amqp_urls.to_string(), "amqp://svc:***@rabbit:5672/%2f");
        assert!(!format!("{c:?}").contains("s3cret"));
        let err = config(&[("AMQP_URL", "amqps://svc:s3cret@rabbit/%2f?frame_max=0")]).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert_eq!(redact("amqp://rabbit/%2f"), "amqp://rabbit/%2f");
        assert_eq!(redact("amqp://user@rabbit"), "amqp://user@rabbit");
    }

    /// Every way a password can be written, including `@`, `/` and `:` in it, encoded or
    /// not: the password's text never appears, in the redacted URL or in a config error.
    #[test]
    fn passwords_with_url_delimiters_are_redacted_too() {
        for (url, secret) in [
            ("amqp://svc:p@ss@rabbit:5672/%2f", "p@ss"),
            ("amqp://svc:p%40ss@rabbit:5672/%2f", "p%40ss"),
            ("amqp://svc:pa/ss@rabbit:5672/%2f", "pa/ss"),
            ("amqp://svc:pa%2Fss@rabbit/%2f", "pa%2Fss"),
            ("amqp://svc:a:b:c@rabbit/%2f", "a:b:c"),
            ("amqp://svc:s3cret@[::1]:5672/vhost", "s3cret"),
            ("amqp://:onlypass@rabbit", "onlypass"),
            ("not a url:hunter2@", "hunter2"),
        ] {
            let shown = redact(url);
            assert!(!shown.contains(secret), "{url} -> {shown}");
            let shown = match config(&[("AMQP_URL", url)]) {
                Ok(c) => format!("{} {c:?}", c.amqp_urls),
                Err(e) => e.to_string(),
            };
            assert!(!shown.contains(secret), "{url} -> {shown}");
        }
        assert_eq!(redact("amqp://svc:p@ss@rabbit:5672/%2f"), "amqp://svc:***@rabbit:5672/%2f");
    }

    /// A cluster's nodes as one list: each URL checked, an error names the bad one's
    /// position, and no password of any of them shows anywhere.
    #[test]
    fn a_list_of_urls_is_checked_entry_by_entry_without_showing_a_password() {
        let list = "amqp://u:s3cretA@a:5674/q, amqp://u:s3cretB@b:5675/q,amqp://u:s3cretC@c:5676/q";
        let c = config(&[("AMQP_URL", list)]).unwrap();
        assert_eq!(c.amqp_urls.len(), 3);
        assert_eq!(c.amqp_urls.urls()[1].expose(), "amqp://u:s3cretB@b:5675/q");
        let shown = format!("{c:?} {}", c.amqp_urls);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("amqp://u:***@c:5676/q"), "{shown}");
        for (bad, position) in [
            ("amqp://u:s3cretA@a/q,http://u:s3cretB@b/q", "URL 2 of 2"),
            ("amqp://u:s3cretA@a/q,,amqp://u:s3cretC@c/q", "URL 2 of 3"),
            ("amqp://u:s3cretA@a/q?frame_max=0,amqp://u:s3cretB@b/q", "URL 1 of 2"),
        ] {
            let err = config(&[("AMQP_URL", bad)]).unwrap_err();
            assert_eq!(err.variable, "AMQP_URL");
            assert!(err.expected.starts_with(position), "{err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn the_queue_type_is_classic_or_quorum() {
        assert_eq!(config(&[]).unwrap().queue_type, QueueType::Classic);
        assert_eq!(config(&[("QUEUE_TYPE", "quorum")]).unwrap().queue_type, QueueType::Quorum);
        let err = config(&[("QUEUE_TYPE", "stream")]).unwrap_err();
        assert_eq!(err.to_string(), "invalid QUEUE_TYPE=\"stream\": expected classic or quorum");
    }

    #[test]
    fn every_number_has_a_range_and_the_error_names_it() {
        for (variable, low, high) in [
            ("CACHE_TTL_SECS", "-1", "31536001"),
            ("CACHE_MAX_ENTRIES", "0", "100000001"),
            ("SNAPSHOT_INTERVAL_MS", "9", "18446744073709551615"),
            ("DATA_POLL_INTERVAL_MS", "9", "3600001"),
            ("PREFETCH", "0", "65536"),
            ("MAX_PHONES_PER_TASK", "0", "1000001"),
            ("MAX_TASK_BYTES", "63", "134217729"),
            ("MAX_ATTEMPTS", "0", "101"),
            ("RETRY_DELAY_MS", "9", "300001"),
            ("WORKER_THREADS", "0", "1025"),
            ("ASYNC_THREADS", "0", "1025"),
            ("SHUTDOWN_TIMEOUT_SECS", "0", "3601"),
        ] {
            for value in [low, high] {
                let err = config(&[(variable, value)]).expect_err(value);
                assert_eq!(err.variable, variable);
                assert!(err.expected.starts_with("a whole number from "), "{err}");
            }
        }
        let c =
            config(&[("SNAPSHOT_INTERVAL_MS", "3600000"), ("MAX_ATTEMPTS", "1"), ("RETRY_DELAY_MS", "10")]).unwrap();
        assert_eq!((c.snapshot_interval, c.max_attempts.get()), (Duration::from_secs(3600), 1));
        let too_long = "q".repeat(255 - crate::delivery::retry::QUEUE_SUFFIX_MAX_LEN + 1);
        assert_eq!(config(&[("TASK_QUEUE", too_long.as_str())]).unwrap_err().variable, "TASK_QUEUE");
    }
}
