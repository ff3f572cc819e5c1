//! The data being served: one file, or every segment of a data directory.
//!
//! `DATA_PATH` names a file (one segment, as data.json always was) or a directory, in
//! which every regular `*.json` file whose name does not start with `.` is a segment (a
//! JSON array of records, the grammar of data.json); temporaries such as datagen's
//! `.name.json.tmp-*` are not. A report covers all segments. Each segment is mapped and
//! indexed on its own, so adding one indexes only it, and [`Segments`] is an immutable
//! set: a change makes a new set sharing the unchanged segments, swapped in whole.

use super::dataset::{Dataset, IndexOrigin};
use super::error::DataError;
use super::identity::{DataIdentity, FileIdentity};
use super::index::{IndexSummary, Span};
use super::index_files::IndexFiles;
use crate::platform::pool::WorkerPool;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// One segment: a data file, mapped and indexed, and its name in the data directory
/// (empty for a single data file).
#[derive(Debug)]
pub struct Segment {
    name: String,
    dataset: Dataset,
}

impl Segment {
    /// Maps and indexes `dir/name` (or the file `dir` itself when `name` is empty).
    pub fn open(dir: &Path, name: &str, pool: &WorkerPool) -> Result<Segment, DataError> {
        Segment::open_from(dir, name, pool, None)
    }

    /// [`Segment::open`], its index read from `files` when they hold it.
    pub fn open_persisted(dir: &Path, name: &str, pool: &WorkerPool, files: &IndexFiles) -> Result<Segment, DataError> {
        Segment::open_from(dir, name, pool, Some(files))
    }

    fn open_from(dir: &Path, name: &str, pool: &WorkerPool, files: Option<&IndexFiles>) -> Result<Segment, DataError> {
        let path = segment_path(dir, name);
        let opened = match files {
            Some(files) => Dataset::open_persisted(&path, pool, files),
            None => Dataset::open(&path, pool),
        };
        let dataset = opened.map_err(|error| {
            // A single file's errors name it already (or are about it alone).
            if name.is_empty() { error } else { DataError::Segment { path, source: Box::new(error) } }
        })?;
        Ok(Segment { name: name.to_owned(), dataset })
    }

    /// A segment of `dataset`, named `name`.
    pub fn new(name: &str, dataset: Dataset) -> Segment {
        Segment { name: name.to_owned(), dataset }
    }

    /// Its file name in the data directory; empty for a single data file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The mapped, indexed file.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// Whether a change adding `added` and removing `removed` takes this segment out.
    fn goes(&self, added: &[Arc<Segment>], removed: &[String]) -> bool {
        removed.contains(&self.name) || added.iter().any(|a| a.name == self.name)
    }
}

/// The segments being served, in name order, and their combined identity.
#[derive(Debug, Clone)]
pub struct Segments {
    parts: Vec<Arc<Segment>>,
    identity: DataIdentity,
    summary: IndexSummary,
}

impl Segments {
    /// Maps and indexes the data at `path`: a file, or every segment of a directory.
    pub fn open(path: &Path, pool: &WorkerPool) -> Result<Segments, DataError> {
        Segments::open_from(path, pool, None)
    }

    /// [`Segments::open`], each segment's index read from `files` when they hold it.
    pub fn open_persisted(path: &Path, pool: &WorkerPool, files: &IndexFiles) -> Result<Segments, DataError> {
        Segments::open_from(path, pool, Some(files))
    }

    fn open_from(path: &Path, pool: &WorkerPool, files: Option<&IndexFiles>) -> Result<Segments, DataError> {
        let listing = list_path(path).map_err(|source| DataError::Open { path: path.to_owned(), source })?;
        let mut parts = Vec::new();
        for (name, _) in listing {
            parts.push(Arc::new(Segment::open_from(path, &name, pool, files)?));
        }
        Ok(Segments::of(parts))
    }

    /// Stores the index of every segment that was not read from `files`: each data file's
    /// path and whether it was written (or why not).
    pub fn persist(&self, files: &IndexFiles) -> Vec<(PathBuf, std::io::Result<bool>)> {
        self.parts.iter().map(|p| (p.dataset.path().to_owned(), p.dataset.persist(files))).collect()
    }

    /// This set with every segment whose index was built here read through its stored
    /// index file instead (see [`Dataset::with_stored_index`]); `None` when no segment
    /// has such a file. The same files, so the same identity and the same answers.
    pub fn with_stored_indexes(&self, files: &IndexFiles) -> Option<Segments> {
        let mut swapped = false;
        let parts = self
            .parts
            .iter()
            .map(|part| match part.dataset.with_stored_index(files) {
                Some(dataset) => {
                    swapped = true;
                    Arc::new(Segment::new(&part.name, dataset))
                }
                None => Arc::clone(part),
            })
            .collect();
        swapped.then(|| Segments::of(parts))
    }

    /// Why each segment whose index file could not be used was indexed anew.
    pub fn refused_indexes(&self) -> Vec<(PathBuf, String)> {
        self.parts
            .iter()
            .filter_map(|p| match p.dataset.index_origin() {
                IndexOrigin::Rebuilt(why) => Some((p.dataset.path().to_owned(), why.clone())),
                _ => None,
            })
            .collect()
    }

    /// How many segments' indexes were read from their files, built (no file), and
    /// rebuilt (a file that could not be used).
    pub fn index_origins(&self) -> (usize, usize, usize) {
        let count =
            |want: fn(&IndexOrigin) -> bool| self.parts.iter().filter(|p| want(p.dataset.index_origin())).count();
        (
            count(|o| *o == IndexOrigin::Loaded),
            count(|o| *o == IndexOrigin::Built),
            count(|o| matches!(o, IndexOrigin::Rebuilt(_))),
        )
    }

    /// The set of `parts` (sorted here by name).
    pub fn of(mut parts: Vec<Arc<Segment>>) -> Segments {
        parts.sort_by(|a, b| a.name.cmp(&b.name));
        let identity = DataIdentity::of(parts.iter().map(|p| (p.name.as_str(), p.dataset.identity())));
        let summary = summarise(&parts);
        Segments { parts, identity, summary }
    }

    /// One data file, served alone.
    pub fn single(dataset: Dataset) -> Segments {
        Segments::of(vec![Arc::new(Segment::new("", dataset))])
    }

    /// This set without the segments named in `removed` and with `added` (a name in
    /// both is a replacement).
    pub fn changed(&self, added: &[Arc<Segment>], removed: &[String]) -> Segments {
        let mut parts: Vec<Arc<Segment>> = self.parts.iter().filter(|p| !p.goes(added, removed)).cloned().collect();
        parts.extend(added.iter().cloned());
        Segments::of(parts)
    }

    /// The segments that [`Segments::changed`] with the same arguments leaves out:
    /// removed, or replaced by an added one of the same name.
    pub fn going(&self, added: &[Arc<Segment>], removed: &[String]) -> Vec<Arc<Segment>> {
        self.parts.iter().filter(|p| p.goes(added, removed)).cloned().collect()
    }

    /// The segments, in name order.
    pub fn parts(&self) -> &[Arc<Segment>] {
        &self.parts
    }

    /// The segment named `name`, if served.
    pub fn get(&self, name: &str) -> Option<&Arc<Segment>> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// Which data this is (every segment's name and file identity).
    pub fn identity(&self) -> DataIdentity {
        self.identity
    }

    /// Whether any segment has records of `phone`.
    pub fn has_records(&self, phone: u64) -> bool {
        self.parts.iter().any(|p| !p.dataset.index().spans(phone).is_empty())
    }

    /// Where the records of each of `phones` are: per segment (in [`Segments::parts`]
    /// order), the spans of each phone, as [`Dataset::spans_of_each`] finds them (side by
    /// side, their first records loading on the way). What a task's misses need first:
    /// whether a phone has records at all, and then what to read.
    pub fn locate(&self, phones: &[u64]) -> Located<'_> {
        Located { per_part: self.parts.iter().map(|part| part.dataset.spans_of_each(phones)).collect() }
    }

    /// Records, spans and index memory summed over all segments; phones counted once
    /// however many segments hold them.
    pub fn summary(&self) -> IndexSummary {
        self.summary
    }

    /// How long indexing the segments took, in all.
    pub fn build_time(&self) -> Duration {
        self.parts.iter().map(|p| p.dataset.build_time()).sum()
    }

    /// Whether every segment still has the size and modification time it was indexed
    /// with (see [`Dataset::still_intact`]).
    pub fn still_intact(&self) -> bool {
        self.parts.iter().all(|p| p.dataset.still_intact())
    }
}

/// The spans of a list of phones in every segment (see [`Segments::locate`]).
#[derive(Debug, Clone, Default)]
pub struct Located<'a> {
    /// `per_part[part][slot]`: the spans of the `slot`-th phone in segment `part`.
    per_part: Vec<Vec<&'a [Span]>>,
}

impl<'a> Located<'a> {
    /// Whether any segment has records of the `slot`-th phone.
    pub fn has_records(&self, slot: usize) -> bool {
        self.per_part.iter().any(|part| !part[slot].is_empty())
    }

    /// The spans of the `slot`-th phone in segment `part`.
    pub fn spans(&self, part: usize, slot: usize) -> &'a [Span] {
        self.per_part[part][slot]
    }

    /// The phones at `slots`, in that order, as a list of their own.
    pub fn select(&self, slots: &[usize]) -> Located<'a> {
        Located { per_part: self.per_part.iter().map(|part| slots.iter().map(|&k| part[k]).collect()).collect() }
    }

    /// Bytes of records the statistics of every phone read, over every segment.
    pub fn bytes(&self) -> usize {
        self.per_part.iter().flatten().flat_map(|spans| spans.iter()).map(|span| span.len()).sum()
    }

    /// How many phones.
    pub fn len(&self) -> usize {
        self.per_part.first().map_or(0, Vec::len)
    }

    /// Whether there are no phones.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The segments' summaries added up, with distinct phones counted by merging their
/// sorted phone lists.
fn summarise(parts: &[Arc<Segment>]) -> IndexSummary {
    let mut summary = IndexSummary::default();
    for part in parts {
        let one = part.dataset.index().summary();
        summary.records += one.records;
        summary.phones += one.phones;
        summary.spans += one.spans;
        summary.negative_durations += one.negative_durations;
        summary.heap_bytes += one.heap_bytes;
    }
    if parts.len() > 1 {
        let mut all: Vec<u64> = parts.iter().flat_map(|p| p.dataset.index().phones().iter().copied()).collect();
        all.sort_unstable();
        all.dedup();
        summary.phones = all.len();
    }
    summary
}

/// The segments `dir` holds now: each regular `*.json` file whose name does not start
/// with `.` (and is UTF-8), with its identity, in name order.
pub fn list(dir: &Path) -> std::io::Result<Vec<(String, FileIdentity)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        // Follows symlinks, as opening does; a file removed since the listing is skipped.
        match std::fs::metadata(entry.path()) {
            Ok(meta) if meta.is_file() => found.push((name, FileIdentity::of_metadata(&meta))),
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

/// What `DATA_PATH` names now: `("", identity)` for a file, the segments for a directory.
pub fn list_path(path: &Path) -> std::io::Result<Vec<(String, FileIdentity)>> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() { list(path) } else { Ok(vec![(String::new(), FileIdentity::of_metadata(&meta))]) }
}

/// The path of segment `name` of the data at `path`.
pub fn segment_path(path: &Path, name: &str) -> PathBuf {
    if name.is_empty() { path.to_owned() } else { path.join(name) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> WorkerPool {
        WorkerPool::new("test", 2).unwrap()
    }

    #[test]
    fn a_directory_serves_its_json_segments_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.json"), br#"[{"phone":1,"start_date":0,"end_date":1000}]"#).unwrap();
        std::fs::write(
            dir.path().join("a.json"),
            br#"[{"phone":1,"start_date":0,"end_date":2000},
            {"phone":2,"start_date":0,"end_date":2000}]"#,
        )
        .unwrap();
        std::fs::write(dir.path().join(".c.json.tmp-x"), b"[").unwrap();
        std::fs::write(dir.path().join(".hidden.json"), b"[").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"[").unwrap();
        std::fs::create_dir(dir.path().join("sub.json")).unwrap();
        let segments = Segments::open(dir.path(), &pool()).unwrap();
        let names: Vec<&str> = segments.parts().iter().map(|p| p.name()).collect();
        assert_eq!(names, ["a.json", "b.json"]);
        assert_eq!((segments.summary().records, segments.summary().phones), (3, 2));
        assert!(segments.has_records(2) && !segments.has_records(3));
        assert_eq!(
            segments.identity(),
            DataIdentity::of(list(dir.path()).unwrap().iter().map(|(n, i)| (n.as_str(), *i)))
        );
    }

    /// Located phones, against the bytes of their records counted from the files.
    #[test]
    fn located_phones_have_the_spans_of_every_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (a1, a2) = (r#"{"phone":1,"start_date":0,"end_date":2000}"#, r#"{"phone":2,"start_date":0,"end_date":20}"#);
        let b1 = r#"{"phone":1,"start_date":0,"end_date":1000}"#;
        std::fs::write(dir.path().join("a.json"), format!("[{a1},{a2}]")).unwrap();
        std::fs::write(dir.path().join("b.json"), format!("[{b1}]")).unwrap();
        let segments = Segments::open(dir.path(), &pool()).unwrap();
        let located = segments.locate(&[2, 3, 1]);
        assert_eq!(located.len(), 3);
        assert_eq!([located.has_records(0), located.has_records(1), located.has_records(2)], [true, false, true]);
        let (a1, a2, b1) = (a1.len(), a2.len(), b1.len());
        assert_eq!(located.bytes(), a1 + a2 + b1);
        let ones = located.select(&[2]);
        assert_eq!((ones.len(), ones.bytes()), (1, a1 + b1));
        assert_eq!((ones.spans(0, 0).len(), ones.spans(1, 0).len()), (1, 1));
        assert_eq!(located.select(&[1]).bytes(), 0);
        assert!(Segments::open(tempfile::tempdir().unwrap().path(), &pool()).unwrap().locate(&[1]).is_empty());
    }

    #[test]
    fn a_malformed_segment_is_named_and_an_empty_directory_serves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Segments::open(dir.path(), &pool()).unwrap().parts().len(), 0);
        std::fs::write(dir.path().join("bad.json"), b"[{\"phone\":1}]").unwrap();
        let error = Segments::open(dir.path(), &pool()).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("in {}: malformed data at byte", dir.path().join("bad.json").display())),
            "{error}"
        );
    }

    #[test]
    fn a_change_keeps_the_unchanged_segments_and_replaces_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.json", "b.json"] {
            std::fs::write(dir.path().join(name), br#"[{"phone":1,"start_date":0,"end_date":1000}]"#).unwrap();
        }
        let segments = Segments::open(dir.path(), &pool()).unwrap();
        std::fs::write(dir.path().join("c.json"), br#"[]"#).unwrap();
        std::fs::write(dir.path().join("b.json"), br#"[{"phone":2,"start_date":0,"end_date":1000}]"#).unwrap();
        let added: Vec<Arc<Segment>> =
            ["b.json", "c.json"].iter().map(|n| Arc::new(Segment::open(dir.path(), n, &pool()).unwrap())).collect();
        let next = segments.changed(&added, &["a.json".to_owned()]);
        let names: Vec<&str> = next.parts().iter().map(|p| p.name()).collect();
        assert_eq!(names, ["b.json", "c.json"]);
        assert!(next.has_records(2) && !next.has_records(1));
        assert_ne!(next.identity(), segments.identity());
        assert!(Arc::ptr_eq(segments.get("a.json").unwrap(), &segments.parts()[0]));
    }

    #[test]
    fn built_indexes_are_swapped_for_their_stored_files_only_when_they_hold_this_version() {
        let dir = tempfile::tempdir().unwrap();
        let files = IndexFiles::new(dir.path().join("indexes"));
        for (name, phone) in [("a.json", 1), ("b.json", 2), ("c.json", 3)] {
            let records = format!(
                r#"[{{"phone":{phone},"start_date":0,"end_date":1000}},{{"phone":9,"start_date":0,"end_date":{phone}000}}]"#
            );
            std::fs::write(dir.path().join(name), records).unwrap();
        }
        let built = Segments::open_persisted(dir.path(), &pool(), &files).unwrap();
        assert!(built.with_stored_indexes(&files).is_none(), "nothing stored yet");
        assert!(built.persist(&files).iter().all(|(_, written)| matches!(written, Ok(true))));
        std::fs::remove_file(files.file_of(&dir.path().join("c.json"))).unwrap();
        // b.json replaced by rename, and the new version's index stored in its place.
        std::fs::write(dir.path().join("b.new"), br#"[{"phone":2,"start_date":0,"end_date":5000}]"#).unwrap();
        std::fs::rename(dir.path().join("b.new"), dir.path().join("b.json")).unwrap();
        Segment::open(dir.path(), "b.json", &pool()).unwrap().dataset().persist(&files).unwrap();

        let mapped = built.with_stored_indexes(&files).expect("a.json's index is stored");
        assert_eq!(mapped.identity(), built.identity());
        let origin = |s: &Segments, name: &str| s.get(name).unwrap().dataset().index_origin().clone();
        assert_eq!(origin(&mapped, "a.json"), IndexOrigin::Loaded);
        assert_eq!(origin(&mapped, "b.json"), IndexOrigin::Built, "another version's index is not used");
        assert!(Arc::ptr_eq(mapped.get("b.json").unwrap(), built.get("b.json").unwrap()));
        assert!(Arc::ptr_eq(mapped.get("c.json").unwrap(), built.get("c.json").unwrap()));
        let heap = |s: &Segments, name: &str| s.get(name).unwrap().dataset().index().summary().heap_bytes;
        assert!(heap(&built, "a.json") > 0);
        assert_eq!(heap(&mapped, "a.json"), 0, "read in place");
        assert_eq!(mapped.summary().heap_bytes, built.summary().heap_bytes - heap(&built, "a.json"));
        for phone in [1, 2, 3, 9, 4] {
            for name in ["a.json", "b.json", "c.json"] {
                let spans = |s: &Segments| s.get(name).unwrap().dataset().index().spans(phone).to_vec();
                assert_eq!(spans(&mapped), spans(&built), "phone {phone} in {name}");
            }
        }
        assert!(mapped.with_stored_indexes(&files).is_none(), "nothing left to swap");
    }
}
