//! Why a data file cannot be used: what startup, a reload and a segment join report.

use super::scan::{Expected, Found, Malformed};
use std::path::PathBuf;

/// Why a data file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file cannot be opened or mapped.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a JSON array of records.
    #[error("malformed data at byte {offset}: expected {expected}, found {found}")]
    Malformed {
        /// Where scanning stopped.
        offset: u64,
        /// What would have been valid there.
        expected: Expected,
        /// What is there.
        found: Found,
    },
    /// A record longer than a span can hold.
    #[error("the record at byte {offset} is {len} bytes; records over {max} bytes are not supported")]
    RecordTooLarge {
        /// Where it starts.
        offset: u64,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A segment of a data directory cannot be used.
    #[error("in {path}: {source}")]
    Segment {
        /// The segment's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<DataError>,
    },
    /// A file longer than an index offset can address.
    #[error("the file is {len} bytes; files over {max} bytes are not supported")]
    FileTooLarge {
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
}

impl From<Malformed> for DataError {
    fn from(m: Malformed) -> Self {
        DataError::Malformed { offset: m.offset as u64, expected: m.expected, found: m.found }
    }
}
