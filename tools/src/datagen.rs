//! Deterministic data.json generation in the reference shape and its harder variants.
//!
//! Output depends only on the options (not on thread count): records are produced in
//! blocks, each from its own generator seeded by (seed, block number), formatted in
//! parallel on rayon and written in order.

use rayon::prelude::*;
use report_service::platform::atomic_file::{self, AtomicFile};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How records are laid out in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The reference file: compact, grouped by phone.
    Sorted,
    /// Compact, records in random order.
    Shuffled,
    /// Indented, key order varied per record, extra fields of every JSON type (including
    /// strings with `{}[],"` and escapes), grouped by phone.
    Pretty,
    /// A dialer's phone book: compact, `phones x per_phone` records, each of a phone drawn
    /// uniformly from the `phones` numbers, so most numbers have a few calls scattered over
    /// the file (10 M numbers x 2 gives 20 M records over about 8.6 M distinct phones).
    ManyPhones,
}

impl Layout {
    /// The names the `datagen --layout` flag takes.
    pub const NAMES: [&'static str; 4] = ["sorted", "shuffled", "pretty", "many-phones"];

    /// The layout named `name` (one of [`Layout::NAMES`]).
    pub fn from_name(name: &str) -> Option<Layout> {
        match name {
            "sorted" => Some(Layout::Sorted),
            "shuffled" => Some(Layout::Shuffled),
            "pretty" => Some(Layout::Pretty),
            "many-phones" => Some(Layout::ManyPhones),
            _ => None,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// How many phones.
    pub phones: u64,
    /// How many records each phone has.
    pub per_phone: u64,
    /// The first phone number; phones are `phone_base..phone_base + phones`.
    pub phone_base: u64,
    /// The random seed: the same options write the same bytes.
    pub seed: u64,
    /// How records are ordered and formatted.
    pub layout: Layout,
    /// Shuffle record order whatever the layout (Shuffled implies it).
    pub shuffle: bool,
    /// Durations are whole seconds uniform in `0..=max_duration_s`.
    pub max_duration_s: u64,
    /// Calls of one UTC day (days since 1970-01-01), as a segment of a data directory
    /// holds; `None`: the reference file's 30 days from 2023-05-13. The day is mixed into
    /// the seed, so each day's calls differ while its phones are the same numbers.
    pub day: Option<i64>,
}

impl Default for Options {
    /// The public reference file: 200 phones x 100,000 records, ~1.31 GB.
    fn default() -> Self {
        Options {
            phones: 200,
            per_phone: 100_000,
            phone_base: 0,
            seed: 42,
            layout: Layout::Sorted,
            shuffle: false,
            max_duration_s: 120,
            day: None,
        }
    }
}

impl Options {
    /// Records to write.
    pub fn records(&self) -> u64 {
        self.phones * self.per_phone
    }

    /// About how many bytes the file will have (for a progress bar): compact records are
    /// ~64 bytes plus the phone's digits.
    pub fn estimated_bytes(&self) -> u64 {
        let digits = (self.phone_base + self.phones).max(1).ilog10() as u64 + 1;
        let per_record = if self.layout == Layout::Pretty { 190 } else { 64 + digits };
        self.records() * per_record
    }
}

/// Why [`write_file`] left the target as it was.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// `stop` was set; the partial file is removed.
    #[error("interrupted; nothing written to {}", .0.display())]
    Interrupted(PathBuf),
    /// Writing or renaming failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The target.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Writes the file `options` describe to `target`: into a temporary file beside it,
/// renamed over it once complete and readable by all, so readers (the service's reload
/// watcher) only ever see a whole file. Temporaries a killed run left behind are removed
/// first. Stops at its next write once `stop` is set. Returns the bytes written.
pub fn write_file(
    options: &Options,
    target: &Path,
    progress: &dyn Fn(u64),
    stop: &AtomicBool,
) -> Result<u64, WriteError> {
    let failed = |source| WriteError::Io { path: target.to_owned(), source };
    atomic_file::remove_stale_temporaries(target, Duration::from_secs(60));
    let file = AtomicFile::create(target).map_err(failed)?;
    let mut out = BufWriter::with_capacity(8 << 20, Stoppable { inner: file.file(), stop });
    let written = match generate(options, &mut out, progress).and_then(|written| out.flush().map(|()| written)) {
        Ok(written) => written,
        // The partial file is removed as `file` drops.
        Err(_) if stop.load(Ordering::SeqCst) => return Err(WriteError::Interrupted(target.to_owned())),
        Err(error) => return Err(failed(error)),
    };
    drop(out);
    file.readable_by_all().map_err(failed)?;
    file.commit().map_err(failed)?;
    Ok(written)
}

/// A writer that fails once `stop` is set, ending the generation at its next write.
struct Stoppable<'a, W> {
    inner: W,
    stop: &'a AtomicBool,
}

impl<W: Write> Write for Stoppable<'_, W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.stop.load(Ordering::SeqCst) {
            return Err(io::Error::other("stopped by a signal"));
        }
        self.inner.write(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Records per block (the unit of parallel formatting).
const BLOCK: u64 = 1 << 15;
/// Start dates fall in the 30 days from 2023-05-13 (as in the reference file).
const FIRST_START_MS: i64 = 1_684_000_000_000;
const START_WINDOW_MS: u64 = 30 * DAY_MS as u64;
const DAY_MS: i64 = 24 * 3600 * 1000;

impl Options {
    /// The first start date and the window start dates fall in.
    fn start_dates(&self) -> (i64, u64) {
        match self.day {
            Some(day) => (day * DAY_MS, DAY_MS as u64),
            None => (FIRST_START_MS, START_WINDOW_MS),
        }
    }

    /// The seed the records are drawn with.
    fn effective_seed(&self) -> u64 {
        match self.day {
            Some(day) => self.seed ^ (day as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            None => self.seed,
        }
    }
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` date (proleptic Gregorian), or `None` if `text`
/// is not one.
pub fn parse_day(text: &str) -> Option<i64> {
    let mut parts = text.splitn(3, '-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if y.len() != 4
        || m.len() != 2
        || d.len() != 2
        || !(y.bytes().chain(m.bytes()).chain(d.bytes()).all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let (y, m, d): (i64, i64, i64) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month[(m - 1) as usize] {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// SplitMix64: tiny, fast, and stable across crate versions (output must never change
/// for a given seed, or fixtures and benchmark figures stop being comparable).
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is below 2^-40 for our ranges.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes the data file described by `options` to `out`, calling `progress` with the
/// number of bytes written after each batch. Returns the total bytes written.
pub fn generate(options: &Options, out: &mut impl Write, progress: &dyn Fn(u64)) -> io::Result<u64> {
    let total = options.phones * options.per_phone;
    let shuffle = (options.shuffle || options.layout == Layout::Shuffled) && options.layout != Layout::ManyPhones;
    let order = shuffle.then(|| shuffled_order(options));
    let blocks = total.div_ceil(BLOCK);
    let batch = (rayon::current_num_threads() as u64 * 4).max(1);
    let mut written = 0u64;
    let opening: &[u8] = if options.layout == Layout::Pretty { b"[\n" } else { b"[" };
    out.write_all(opening)?;
    written += opening.len() as u64;
    let mut first = 0;
    while first < blocks {
        let last = (first + batch).min(blocks);
        let buffers: Vec<Vec<u8>> =
            (first..last).into_par_iter().map(|block| format_block(options, order.as_deref(), block, total)).collect();
        for buffer in buffers {
            out.write_all(&buffer)?;
            written += buffer.len() as u64;
        }
        progress(written);
        first = last;
    }
    let closing: &[u8] = if options.layout == Layout::Pretty { b"\n]\n" } else { b"]\n" };
    out.write_all(closing)?;
    written += closing.len() as u64;
    progress(written);
    Ok(written)
}

/// The phone (as an offset from `phone_base`) of every record position, shuffled.
fn shuffled_order(options: &Options) -> Vec<u32> {
    let phones = u32::try_from(options.phones).unwrap_or(u32::MAX);
    let mut order: Vec<u32> = (0..phones).flat_map(|p| std::iter::repeat_n(p, options.per_phone as usize)).collect();
    let mut rng = SplitMix64(options.effective_seed() ^ 0x005E_ED0F_0DE5);
    for i in (1..order.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

fn format_block(options: &Options, order: Option<&[u32]>, block: u64, total: u64) -> Vec<u8> {
    let mut rng = SplitMix64(options.effective_seed().wrapping_mul(0x2545_F491_4F6C_DD1D) ^ block);
    let (first_start, window) = options.start_dates();
    let first = block * BLOCK;
    let last = (first + BLOCK).min(total);
    let mut buf = Vec::with_capacity(((last - first) * 72) as usize);
    let mut num = itoa::Buffer::new();
    for i in first..last {
        let phone_offset = match order {
            Some(order) => u64::from(order[i as usize]),
            None if options.layout == Layout::ManyPhones => rng.below(options.phones.max(1)),
            None => i / options.per_phone,
        };
        let phone = options.phone_base + phone_offset;
        let start = first_start + rng.below(window) as i64;
        let end = start + rng.below(options.max_duration_s + 1) as i64 * 1000;
        if i > 0 {
            buf.extend_from_slice(if options.layout == Layout::Pretty { b",\n" } else { b"," });
        }
        if options.layout == Layout::Pretty {
            pretty_record(&mut buf, &mut rng, phone, start, end);
        } else {
            buf.extend_from_slice(b"{\"phone\":");
            buf.extend_from_slice(num.format(phone).as_bytes());
            buf.extend_from_slice(b",\"start_date\":");
            buf.extend_from_slice(num.format(start).as_bytes());
            buf.extend_from_slice(b",\"end_date\":");
            buf.extend_from_slice(num.format(end).as_bytes());
            buf.push(b'}');
        }
    }
    buf
}

/// Extra fields a producer might add: every JSON type, and strings full of the bytes a
/// naive scanner would trip on.
const EXTRAS: [&str; 6] = [
    r#""note": "he said \"},{\" and left: [1, 2], {\"phone\": 1}""#,
    r#""meta": {"carrier": "Mega\\Fon", "tags": ["a,b", {"x": [null, true, false]}], "score": -12.5e-3}"#,
    r#""operator": "Tele2 \u00e9\u00e8 \ud83d\udcde \/ \b\f\n\r\t""#,
    r#""flags": [[], {}, [[[]]], 0, -0.0, 1E+2]"#,
    r#""empty": """#,
    r#""phone_note": "phone:1,start_date:2,end_date:3}""#,
];

fn pretty_record(buf: &mut Vec<u8>, rng: &mut SplitMix64, phone: u64, start: i64, end: i64) {
    let mut fields: Vec<String> =
        vec![format!("\"phone\": {phone}"), format!("\"start_date\": {start}"), format!("\"end_date\": {end}")];
    let extras = rng.below(3);
    for _ in 0..extras {
        fields.push(EXTRAS[rng.below(EXTRAS.len() as u64) as usize].to_owned());
    }
    // Fisher-Yates on the fields: every key order appears.
    for i in (1..fields.len()).rev() {
        fields.swap(i, rng.below(i as u64 + 1) as usize);
    }
    buf.extend_from_slice(b"  {\n");
    for (i, field) in fields.iter().enumerate() {
        buf.extend_from_slice(b"    ");
        buf.extend_from_slice(field.as_bytes());
        buf.extend_from_slice(if i + 1 < fields.len() { b",\n" } else { b"\n" });
    }
    buf.extend_from_slice(b"  }");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated(options: &Options) -> Vec<u8> {
        let mut out = Vec::new();
        let written = generate(options, &mut out, &|_| {}).expect("in-memory write");
        assert_eq!(written, out.len() as u64);
        out
    }

    fn records(bytes: &[u8]) -> Vec<serde_json::Value> {
        serde_json::from_slice(bytes).expect("datagen writes valid JSON")
    }

    #[test]
    fn the_reference_record_shape_is_compact_and_grouped_by_phone() {
        let options = Options { phones: 3, per_phone: 4, ..Options::default() };
        let out = generated(&options);
        assert!(out.starts_with(b"[{\"phone\":0,\"start_date\":"), "{}", String::from_utf8_lossy(&out[..40]));
        let phones: Vec<u64> = records(&out).iter().map(|r| r["phone"].as_u64().unwrap()).collect();
        assert_eq!(phones, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
    }

    #[test]
    fn durations_are_whole_seconds_within_the_maximum() {
        let out = generated(&Options { phones: 2, per_phone: 500, ..Options::default() });
        for r in records(&out) {
            let ms = r["end_date"].as_i64().unwrap() - r["start_date"].as_i64().unwrap();
            assert!(ms % 1000 == 0 && (0..=120_000).contains(&ms), "{ms}");
        }
    }

    #[test]
    fn output_depends_only_on_the_options() {
        let options = Options { phones: 5, per_phone: 20_000, layout: Layout::Shuffled, ..Options::default() };
        let a = generated(&options);
        let b = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| generated(&options));
        assert_eq!(a, b);
        assert_ne!(a, generated(&Options { seed: 7, ..options }));
    }

    #[test]
    fn shuffled_and_pretty_layouts_keep_per_phone_counts() {
        for layout in [Layout::Shuffled, Layout::Pretty] {
            let out = generated(&Options {
                phones: 4,
                per_phone: 50,
                phone_base: 79_161_234_560,
                layout,
                ..Options::default()
            });
            let mut counts = std::collections::BTreeMap::new();
            for r in records(&out) {
                *counts.entry(r["phone"].as_u64().unwrap()).or_insert(0) += 1;
            }
            assert_eq!(
                counts.into_iter().collect::<Vec<_>>(),
                (79_161_234_560..79_161_234_564).map(|p| (p, 50)).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn a_day_is_parsed_exactly_and_its_calls_start_within_it() {
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(parse_day("2026-11-28"), Some(20_785));
        assert_eq!(parse_day("2000-02-29"), Some(11_016));
        for bad in ["2026-02-29", "2026-13-01", "2026-11-31", "26-11-28", "2026-1-28", "data", "2026-11-28x"] {
            assert_eq!(parse_day(bad), None, "{bad}");
        }
        let day = parse_day("2026-11-28").unwrap();
        let options = Options { phones: 3, per_phone: 50, day: Some(day), ..Options::default() };
        let mut bytes = Vec::new();
        generate(&options, &mut bytes, &|_| {}).unwrap();
        let all = records(&bytes);
        assert_eq!(all.len(), 150);
        for r in &all {
            let start = r["start_date"].as_i64().unwrap();
            assert!((day * DAY_MS..(day + 1) * DAY_MS).contains(&start), "{start}");
        }
        let mut next_day = Vec::new();
        generate(&Options { day: Some(day + 1), ..options }, &mut next_day, &|_| {}).unwrap();
        let phones = |rs: &[serde_json::Value]| {
            let mut p: Vec<u64> = rs.iter().map(|r| r["phone"].as_u64().unwrap()).collect();
            p.dedup();
            p
        };
        assert_eq!(phones(&all), phones(&records(&next_day)), "the same phones every day");
        assert_ne!(bytes, next_day, "but other calls");
    }
}
