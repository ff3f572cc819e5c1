//! data.json: the mapped bytes, the record grammar and the phone index.
//!
//! A [`Dataset`] is one version of the data file, mapped and indexed once. It answers
//! "which byte spans hold phone P's records" and "aggregate the records in this span";
//! it does not decide what to compute or cache, and never schedules threads itself
//! beyond the pool it is handed.

mod dataset;
mod error;
mod identity;
mod index;
pub mod index_files;
mod mmap;
mod number;
pub mod prefetch;
pub mod scan;
pub mod segments;
pub mod stats;
#[cfg(test)]
pub(crate) mod testdata;

pub use dataset::{Dataset, IndexOrigin, READ_AHEAD, StaleData};
pub use error::DataError;
pub use identity::{DataIdentity, FileIdentity};
pub use index::{
    BuildShape, INDEX_FORMAT_VERSION, IndexSummary, MAX_FILE_LEN, MAX_RECORD_LEN, MAX_SPAN_LEN, PhoneIndex, Span,
    StoreError,
};
pub use index_files::{IndexFiles, Stored};
pub use scan::{Expected, Field, Found, Malformed, PhonePrefix};
pub use segments::{Located, Segment, Segments};
pub use stats::{CallStats, Tally};
