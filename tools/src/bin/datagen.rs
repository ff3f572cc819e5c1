//! datagen: writes a data.json of the reference shape (or a harder layout), or one day's
//! calls as a segment of a data directory.

use anyhow::Result;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use report_service::platform::shutdown;
use report_tools::datagen::{self, Layout, Options};
use std::path::PathBuf;

/// Defaults write the public reference file: 200 phones x 100,000 records, ~1.31 GB.
#[derive(Debug, Parser)]
#[command(version, about = "Write a call-records data.json")]
struct Cli {
    #[arg(long, default_value_t = 200)]
    phones: u64,
    #[arg(long, default_value_t = 100_000)]
    per_phone: u64,
    /// The first phone number (phones are consecutive from it).
    #[arg(long, default_value_t = 0)]
    phone_base: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, value_parser = parse_layout, default_value = "sorted")]
    layout: Layout,
    /// Shuffle record order in any layout.
    #[arg(long)]
    shuffle: bool,
    /// Durations are whole seconds in 0..=MAX_DURATION.
    #[arg(long, default_value_t = 120)]
    max_duration: u64,
    /// Calls of this UTC day only (YYYY-MM-DD), as a new segment of a data directory;
    /// taken from the output's file name (`--out data/calls/2026-11-28.json`) when that
    /// is a date. Each day's calls differ; the phones are the same numbers every day.
    #[arg(long, value_parser = parse_day)]
    day: Option<i64>,
    #[arg(long, default_value = "data/data.json")]
    out: PathBuf,
    /// Do nothing when the output file already exists.
    #[arg(long)]
    if_missing: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.if_missing && cli.out.exists() {
        eprintln!("{} exists; leaving it as it is", cli.out.display());
        return Ok(());
    }
    let stop = shutdown::flag_on_signals()?;
    let options = Options {
        phones: cli.phones,
        per_phone: cli.per_phone,
        phone_base: cli.phone_base,
        seed: cli.seed,
        layout: cli.layout,
        shuffle: cli.shuffle,
        max_duration_s: cli.max_duration,
        day: cli.day.or_else(|| cli.out.file_stem().and_then(|stem| datagen::parse_day(&stem.to_string_lossy()))),
    };
    eprintln!("writing {} records to {}", options.records(), cli.out.display());
    let bar = ProgressBar::new(options.estimated_bytes());
    bar.set_style(ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")?);
    let written = datagen::write_file(&options, &cli.out, &|bytes| bar.set_position(bytes), &stop)?;
    bar.finish();
    eprintln!("wrote {} records, {written} bytes, to {}", options.records(), cli.out.display());
    Ok(())
}

fn parse_day(text: &str) -> Result<i64, String> {
    datagen::parse_day(text).ok_or_else(|| "expected a date, YYYY-MM-DD".to_owned())
}

fn parse_layout(name: &str) -> Result<Layout, String> {
    Layout::from_name(name).ok_or_else(|| format!("expected one of {}", Layout::NAMES.join(", ")))
}
