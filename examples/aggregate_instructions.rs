//! Instruction count of the aggregation hot loop, immune to machine noise:
//!
//!     cargo build --release --example aggregate_instructions
//!     valgrind --tool=callgrind target/release/examples/aggregate_instructions
//!
//! Aggregates 1,000,000 compact records (one phone's 200,000, five times) on one thread;
//! `Dataset::aggregate`'s count divided by 10^6 is instructions per record.

use report_service::data::{Dataset, PhonePrefix};
use report_tools::datagen::{self, Options};

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("data.json");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    datagen::generate(&Options { phones: 2, per_phone: 200_000, ..Options::default() }, &mut out, &|_| {})?;
    drop(out);
    let pool = report_service::platform::pool::WorkerPool::new("example", 1)?;
    let dataset = Dataset::open(&path, &pool)?;
    let phone = PhonePrefix::new(1);
    let mut records = 0;
    for _ in 0..5 {
        records += dataset.aggregate(dataset.index().spans(1), &phone)?.records;
    }
    println!("{records} records aggregated");
    Ok(())
}
