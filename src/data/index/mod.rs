//! The phone index: phone -> byte spans of its records, built by one validating pass.
//!
//! A span covers consecutive records of one phone (the separators between them
//! included), capped at [`MAX_SPAN_LEN`] bytes so that one phone's records can be
//! aggregated by several threads. The index holds offsets only; it never borrows the
//! bytes it was built from.
//!
//! Layout (compressed sparse rows, no hash table): phones are split into buckets by a
//! multiplicative hash of the number; within a bucket they are sorted, each with the
//! range of its spans, in file order. A lookup hashes the phone to its bucket and binary-
//! searches the few phones there. The buckets are also what makes the build fast on
//! files whose records are in time order rather than grouped by phone (`build`).
//!
//! Memory, exactly: 8 bytes per span (40-bit offset, 24-bit length), 16 per phone (the
//! number and where its spans start), 8 per bucket. A file grouped by phone has about one
//! span per 256 KiB; a time-ordered one has one span per record. The build holds each
//! span once more until it is grouped: in a list of its phone's while a region has met
//! few phones (8 bytes, so the build peaks at about 18 bytes per span), else beside its
//! phone in a hash bucket (16 bytes: a peak of about 24 bytes per span plus 32 per
//! phone).

mod build;
mod spans;
pub(crate) mod store;
mod table;

pub use store::{FORMAT_VERSION as INDEX_FORMAT_VERSION, StoreError};

pub use build::BuildShape;
pub use spans::{IndexSummary, MAX_FILE_LEN, MAX_RECORD_LEN, MAX_SPAN_LEN, PhoneIndex, Span};
