//! report-service: the worker (no subcommand), `report` (one report without a broker)
//! and `healthcheck` (for container health checks).

use anyhow::{Context, Result};

/// mimalloc: the service allocates for every message (lapin's frames, the task, the
/// report); with glibc's malloc that cost about a quarter of its CPU per task under load
/// (README, "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

unsafe extern "C" {
    /// mimalloc's own collection (`mimalloc.h`: `void mi_collect(bool force)`), linked in
    /// with the allocator above.
    fn mi_collect(force: bool);
}

/// Gives the calling thread's free mimalloc pages back to the operating system, those
/// other threads freed included (`platform::heap`).
fn collect_free_pages() {
    // SAFETY: it takes no pointer and works on the calling thread's heap and mimalloc's
    // own free lists: it releases only memory mimalloc holds as free.
    unsafe { mi_collect(true) }
}
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use report_service::app;
use report_service::config::{self, Config};
use report_service::message::CorrelationId;
use report_service::ops::http;
use report_service::ops::telemetry::{self, LogTarget};
use report_service::platform::clock::SystemClock;
use report_service::platform::{heap, shutdown, stack};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Call-statistics report worker for RabbitMQ. Every setting is an environment variable
/// and the flag of the same name (`PREFETCH` / `--prefetch`); flags win.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print one report as JSON on stdout, computed from a data file without a broker.
    Report {
        /// The call records (default: DATA_PATH, else data/data.json).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Comma-separated phones, e.g. 1,2,3.
        #[arg(long, value_delimiter = ',', required = true)]
        phones: Vec<u64>,
        /// Echoed in the report (an integer).
        #[arg(long, default_value = "0", value_parser = parse_correlation_id)]
        correlation_id: CorrelationId,
    },
    /// Exit 0 when the worker at HTTP_ADDR reports ready on /health, 1 otherwise.
    Healthcheck,
    /// Print the `rabbitmqctl set_permissions` command that gives AMQP_URL's user the
    /// least the service needs with these settings.
    Permissions,
}

fn parse_correlation_id(text: &str) -> Result<CorrelationId, String> {
    CorrelationId::integer(text).ok_or_else(|| format!("`{text}` is not an integer"))
}

fn main() -> Result<()> {
    stack::ensure_deep_stacks();
    heap::set_collector(collect_free_pages);
    let matches = Cli::command().args(config::flags(|_| true)).get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    let config = Config::from_env_and_flags(&matches)?;
    // Before the runtime and the pool start any thread (`platform::heap`).
    heap::apply_huge_pages(config.huge_pages).context("cannot apply TRANSPARENT_HUGE_PAGES")?;
    // One thread by default: it only awaits the broker (the consume loop drives every
    // light task as one future; CPU work runs on the pool), and a second one cost the
    // worker a tenth more CPU per message in wake-ups between the two (README,
    // "Performance").
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.async_threads.get())
        .enable_all()
        .thread_stack_size(stack::THREAD_STACK_BYTES)
        .build()?;
    match cli.command {
        None => {
            telemetry::init(&config.log_filter, LogTarget::Stdout)?;
            let outcome = runtime.block_on(worker(config));
            // Blocking work that outlived the shutdown deadline is not waited for.
            runtime.shutdown_timeout(Duration::from_millis(100));
            outcome
        }
        Some(Command::Report { data, phones, correlation_id }) => {
            telemetry::init(&config.log_filter, LogTarget::Stderr)?;
            let data = data.unwrap_or(config.data_path.clone());
            let report = runtime.block_on(app::report_once(&data, &phones, &correlation_id, config.worker_threads))?;
            println!("{}", String::from_utf8_lossy(&report));
            Ok(())
        }
        Some(Command::Permissions) => {
            println!("{}", app::permissions_command(&config));
            Ok(())
        }
        Some(Command::Healthcheck) => {
            let ready = http::probe(config.http_addr, Duration::from_secs(3)).unwrap_or(false);
            std::process::exit(if ready { 0 } else { 1 })
        }
    }
}

/// Runs until SIGTERM/SIGINT, then stops within `SHUTDOWN_TIMEOUT_SECS` and exits 0:
/// every step of the shutdown has its share of that deadline, and this is the backstop.
async fn worker(config: Config) -> Result<()> {
    let timeout = config.shutdown_timeout;
    let running = app::start(config, Arc::new(SystemClock)).await?;
    shutdown::cancel_on_signals(running.shutdown_token())?;
    running.shutdown_token().cancelled().await;
    match tokio::time::timeout(timeout, running.stopped()).await {
        Ok(stopped) => stopped,
        Err(_) => {
            tracing::warn!(
                timeout_secs = timeout.as_secs(),
                "shutdown deadline reached; exiting without waiting further"
            );
            Ok(())
        }
    }
}
