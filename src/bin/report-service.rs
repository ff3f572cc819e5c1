//! The report-service binary: `report` prints one report without a broker.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use report_service::data::Dataset;
use report_service::message::{CorrelationId, PhoneReport, Report, dedup_phones};
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

#[derive(Debug, Parser)]
#[command(version, about = "Call-statistics report worker for RabbitMQ")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print one report as JSON on stdout, computed from a data file without a broker.
    Report {
        /// The call records.
        #[arg(long, default_value = "data/data.json")]
        data: PathBuf,
        /// Comma-separated phones, e.g. 1,2,3.
        #[arg(long, value_delimiter = ',', required = true)]
        phones: Vec<u64>,
        /// Echoed in the report (an integer).
        #[arg(long, default_value = "0", value_parser = parse_correlation_id)]
        correlation_id: CorrelationId,
        /// Threads used to index and aggregate (default: number of cores).
        #[arg(long)]
        threads: Option<usize>,
    },
}

fn parse_correlation_id(text: &str) -> Result<CorrelationId, String> {
    CorrelationId::integer(text).ok_or_else(|| format!("`{text}` is not an integer"))
}

fn main() -> Result<()> {
    report_service::cpu::ensure_supported()?;
    match Cli::parse().command {
        Command::Report { data, phones, correlation_id, threads } => {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.unwrap_or(0)).build()?;
            let dataset = Dataset::open(&data, &pool).with_context(|| format!("cannot use {}", data.display()))?;
            let (received, started) = (SystemTime::now(), Instant::now());
            let phones = dedup_phones(phones);
            let stats = report_service::compute::compute(&dataset, &phones, &pool)?;
            let data = phones.iter().zip(&stats).map(|(&phone, stats)| PhoneReport::new(phone, stats)).collect();
            let report = Report::complete(correlation_id, received, data, started.elapsed());
            println!("{}", String::from_utf8_lossy(&report.to_json()));
            Ok(())
        }
    }
}
