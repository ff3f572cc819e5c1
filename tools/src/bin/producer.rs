//! producer: send tasks, publish the sample tasks, load-test the service or the broker.

use anyhow::{Context, Result, bail};

/// The service's allocator (see `src/bin/report-service.rs`), so `echo` measures a
/// client that allocates as the service does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use report_service::config::{self, Config};
use report_tools::producer::{self, Client, FIRST_SAMPLE_ID, LoadOptions, SAMPLE_TASKS};
use std::io::Write;
use std::time::Duration;

/// Client for report-service. The broker settings (AMQP_URL or AMQP_URL_FILE, the TLS
/// files), TASK_QUEUE and REPORT_QUEUE come from the environment or the flags of the same
/// name, as for the service.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish one task; with --wait, print its report (exit 1 on timeout or error report).
    Send {
        #[arg(long, value_delimiter = ',', required = true)]
        phones: Vec<u64>,
        /// Default: the current time in microseconds.
        #[arg(long)]
        correlation_id: Option<u64>,
        #[arg(long)]
        wait: bool,
        /// Seconds to wait for the report.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Rename a segment into the data directory and time the first report that includes it.
    Freshness {
        /// The new segment, already written, on the data directory's filesystem.
        #[arg(long)]
        segment: std::path::PathBuf,
        /// The data directory (the service's DATA_PATH).
        #[arg(long)]
        into: std::path::PathBuf,
        /// A phone the segment has records of.
        #[arg(long)]
        phone: u64,
        /// Seconds to wait for a report that includes it.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Publish the starting service's ten sample tasks (each printed as a JSON line); reports go to REPORT_QUEUE.
    Seed,
    /// Keep C tasks in flight until N are answered; print throughput and latency.
    Load {
        #[arg(long, default_value_t = 1000)]
        tasks: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        phones_per_task: usize,
        /// Phones are drawn from PHONE_BASE..PHONE_BASE+PHONE_MAX...
        #[arg(long, default_value_t = 200)]
        phone_max: u64,
        #[arg(long, default_value_t = 0)]
        phone_base: u64,
        /// ...or from 0..HOT_SET (a warm cache).
        #[arg(long)]
        hot_set: Option<u64>,
        /// Task i asks for phones i*K..(i+1)*K: no phone shared between tasks.
        #[arg(long)]
        disjoint: bool,
        /// Seconds without a reply before the remaining tasks count as unanswered.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the summary as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Answer every task on TASK_QUEUE with an empty report, as fast as the broker
    /// allows: the baseline a load test of the service is compared with.
    Echo {
        #[arg(long, default_value_t = 64)]
        prefetch: u16,
        /// Pad replies to this many bytes (a 10-phone report is about 2,300).
        #[arg(long, default_value_t = 0)]
        reply_bytes: usize,
    },
}

/// The settings the producer shares with the service.
const SHARED: [&str; 8] = [
    "AMQP_URL",
    "AMQP_URL_FILE",
    "AMQP_PASSWORD_FILE",
    "AMQP_CA_FILE",
    "AMQP_CLIENT_CERT_FILE",
    "AMQP_CLIENT_KEY_FILE",
    "TASK_QUEUE",
    "REPORT_QUEUE",
];

fn main() -> Result<()> {
    report_service::platform::stack::ensure_deep_stacks();
    let flags = config::flags(|s| SHARED.contains(&s.variable));
    let matches = Cli::command().args(flags).get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    let config = Config::from_env_and_flags(&matches)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(report_service::platform::stack::THREAD_STACK_BYTES)
        .build()?
        .block_on(run(cli.command, config))
}

async fn run(command: Command, config: Config) -> Result<()> {
    let client = Client::connect(&config.amqp_urls, &config.tls, &config.task_queue)
        .await
        .with_context(|| format!("cannot reach the broker at {}", config.amqp_urls))?;
    let result = match command {
        Command::Send { phones, correlation_id, wait, timeout } => {
            let id = correlation_id.unwrap_or_else(now_micros);
            let report = producer::send_one(&client, id, &phones, wait.then(|| Duration::from_secs(timeout))).await?;
            match report {
                None => eprintln!("sent task {id} to {}", config.task_queue),
                Some(body) => {
                    let json: sonic_rs::Value = sonic_rs::from_slice(&body).context("the report is not JSON")?;
                    println!("{}", sonic_rs::to_string_pretty(&json)?);
                    if producer::is_error_report(&body) {
                        bail!("the service answered with an error report");
                    }
                }
            }
            Ok(())
        }
        Command::Seed => {
            // Each task published, as a JSON line on stdout (the summary goes to stderr),
            // flushed as it goes: through a pipe (`docker compose run -T`) stdout is
            // buffered, and the summary would otherwise appear among the tasks.
            let mut out = std::io::stdout();
            for (i, phones) in SAMPLE_TASKS.iter().enumerate() {
                let id = FIRST_SAMPLE_ID + i as u64;
                producer::send_one(&client, id, phones, None).await?;
                writeln!(out, "{}", String::from_utf8_lossy(&producer::task_body(id, phones)))?;
                out.flush()?;
            }
            eprintln!(
                "published {} sample tasks to {}; their reports go to {}",
                SAMPLE_TASKS.len(),
                config.task_queue,
                config.report_queue
            );
            Ok(())
        }
        Command::Load {
            tasks,
            concurrency,
            phones_per_task,
            phone_max,
            phone_base,
            hot_set,
            disjoint,
            timeout,
            seed,
            json,
        } => {
            let options = LoadOptions {
                tasks,
                concurrency,
                phones_per_task,
                phone_max,
                phone_base,
                hot_set,
                disjoint,
                idle_timeout: Duration::from_secs(timeout),
                seed,
            };
            let bar = ProgressBar::with_draw_target(Some(tasks), ProgressDrawTarget::stderr());
            bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} answered  {per_sec}  eta {eta}  {msg}")?);
            let summary = producer::load(&client, options, &|progress| show_progress(&bar, progress)).await?;
            bar.finish_and_clear();
            if json {
                println!("{}", sonic_rs::to_string(&summary)?);
            } else {
                println!("{summary}");
            }
            if !summary.passed() {
                bail!(
                    "{} unanswered, {} not sent, {} error reports",
                    summary.unanswered,
                    summary.not_sent,
                    summary.error_reports
                );
            }
            Ok(())
        }
        Command::Freshness { segment, into, phone, timeout } => {
            let options = producer::FreshnessOptions { segment, into, phone, timeout: Duration::from_secs(timeout) };
            let measured = producer::freshness(&client, &options).await?;
            println!(
                "first report including the segment {:.1} ms after the rename ({} tasks; phone {phone}: {} -> {} records)",
                measured.millis, measured.tasks, measured.records_before, measured.records_after
            );
            Ok(())
        }
        Command::Echo { prefetch, reply_bytes } => {
            let stop = tokio_util::sync::CancellationToken::new();
            report_service::platform::shutdown::cancel_on_signals(stop.clone())?;
            eprintln!("echoing tasks on {} until SIGINT/SIGTERM", config.task_queue);
            let answered = producer::echo(&client, prefetch, reply_bytes, stop).await?;
            eprintln!("answered {answered} tasks");
            Ok(())
        }
    };
    client.close().await;
    result
}

/// The bar at `progress`: answered tasks, and the broker's refusals once there are any
/// (during a node's restart a quorum queue refuses publishes until its leader moves).
fn show_progress(bar: &ProgressBar, progress: producer::Progress) {
    bar.set_position(progress.answered);
    if progress.republished + progress.refused > 0 {
        bar.set_message(format!(
            "refused publishes: {} sent again, {} given up",
            progress.republished, progress.refused
        ));
    }
}

fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}
