//! datagen: writes a data.json of the reference shape (or a harder layout).

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use report_service::atomic_file::{self, AtomicFile};
use report_service::datagen::{self, Layout, Options};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
    // Leftovers of a run killed before it could clean up (SIGKILL, a crash).
    atomic_file::remove_stale_temporaries(&cli.out, Duration::from_secs(60));
    let stop = stop_on_signals()?;
    let options = Options {
        phones: cli.phones,
        per_phone: cli.per_phone,
        phone_base: cli.phone_base,
        seed: cli.seed,
        layout: cli.layout,
        shuffle: cli.shuffle,
        max_duration_s: cli.max_duration,
    };
    // Written beside the target and renamed over it, as the service expects data.json
    // to be replaced (README, "Data reload").
    let file = AtomicFile::create(&cli.out).with_context(|| format!("cannot write beside {}", cli.out.display()))?;
    eprintln!("writing {} records to {}", options.phones * options.per_phone, cli.out.display());
    let bar = ProgressBar::new(estimated_bytes(&options));
    bar.set_style(ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")?);
    let mut out = BufWriter::with_capacity(8 << 20, Stoppable { inner: file.file(), stop: &stop });
    let written = match datagen::generate(&options, &mut out, &|bytes| bar.set_position(bytes)) {
        Ok(written) => written,
        // The partial file is removed as `file` drops.
        Err(_) if stop.load(Ordering::SeqCst) => bail!("interrupted; nothing written to {}", cli.out.display()),
        Err(error) => return Err(error.into()),
    };
    out.flush()?;
    drop(out);
    bar.finish();
    file.readable_by_all()?;
    file.commit().with_context(|| format!("cannot write {}", cli.out.display()))?;
    eprintln!("wrote {} records, {written} bytes, to {}", options.phones * options.per_phone, cli.out.display());
    Ok(())
}

/// A flag set by SIGTERM or SIGINT. datagen may run as PID 1 in a container, where a
/// signal without a handler is ignored; with this one, `docker compose down` during a
/// generation stops it at once and leaves no partial file.
fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut terminate, mut interrupt) = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        Ok::<_, std::io::Error>((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
    })?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        });
        flag.store(true, Ordering::SeqCst);
    });
    Ok(stop)
}

/// A writer that fails once `stop` is set, ending the generation at its next write.
struct Stoppable<'a, W> {
    inner: W,
    stop: &'a AtomicBool,
}

impl<W: Write> Write for Stoppable<'_, W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.stop.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("stopped by a signal"));
        }
        self.inner.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn parse_layout(name: &str) -> Result<Layout, String> {
    Layout::from_name(name).ok_or_else(|| format!("expected one of {}", Layout::NAMES.join(", ")))
}

/// A size estimate for the progress bar (compact: ~64 bytes + the phone's digits).
fn estimated_bytes(options: &Options) -> u64 {
    let digits = (options.phone_base + options.phones).max(1).ilog10() as u64 + 1;
    let per_record = if options.layout == Layout::Pretty { 190 } else { 64 + digits };
    options.phones * options.per_phone * per_record
}
