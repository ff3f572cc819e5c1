//! datagen: writes a data.json of the reference shape (or a harder layout).

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use report_service::atomic_file::AtomicFile;
use report_service::datagen::{self, Layout, Options};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LayoutArg {
    Sorted,
    Shuffled,
    Pretty,
}

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
    #[arg(long, value_enum, default_value = "sorted")]
    layout: LayoutArg,
    /// Shuffle record order in any layout.
    #[arg(long)]
    shuffle: bool,
    /// Durations are whole seconds in 0..=MAX_DURATION.
    #[arg(long, default_value_t = 120)]
    max_duration: u64,
    #[arg(long, default_value = "data/data.json")]
    out: PathBuf,
    /// Do nothing when the output file already exists.
    #[arg(long)]
    if_missing: bool,
}

fn main() -> Result<()> {
    report_service::cpu::ensure_supported()?;
    let cli = Cli::parse();
    if cli.if_missing && cli.out.exists() {
        eprintln!("{} exists; leaving it as it is", cli.out.display());
        return Ok(());
    }
    let layout = match cli.layout {
        LayoutArg::Sorted => Layout::Sorted,
        LayoutArg::Shuffled => Layout::Shuffled,
        LayoutArg::Pretty => Layout::Pretty,
    };
    let options = Options {
        phones: cli.phones,
        per_phone: cli.per_phone,
        phone_base: cli.phone_base,
        seed: cli.seed,
        layout,
        shuffle: cli.shuffle,
        max_duration_s: cli.max_duration,
    };
    // Written beside the target and renamed over it, as the service expects data.json
    // to be replaced (README, "Data reload").
    let file = AtomicFile::create(&cli.out).with_context(|| format!("cannot write beside {}", cli.out.display()))?;
    let bar = ProgressBar::new(estimated_bytes(&options));
    bar.set_style(ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")?);
    let mut out = BufWriter::with_capacity(8 << 20, file.file());
    let written = datagen::generate(&options, &mut out, &|bytes| bar.set_position(bytes))?;
    out.flush()?;
    drop(out);
    bar.finish();
    file.readable_by_all()?;
    file.commit().with_context(|| format!("cannot write {}", cli.out.display()))?;
    eprintln!("wrote {} records, {written} bytes, to {}", options.phones * options.per_phone, cli.out.display());
    Ok(())
}

/// A size estimate for the progress bar (compact: ~64 bytes + the phone's digits).
fn estimated_bytes(options: &Options) -> u64 {
    let digits = (options.phone_base + options.phones).max(1).ilog10() as u64 + 1;
    let per_record = if options.layout == Layout::Pretty { 190 } else { 64 + digits };
    options.phones * options.per_phone * per_record
}
