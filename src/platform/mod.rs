//! Process plumbing with no knowledge of the service: the wall clock TTLs are measured
//! on, the shutdown signal and its deadline, the worker threads CPU work runs on, thread
//! stack sizes, returning freed memory to the OS, and replacing a file atomically.
//!
//! The lowest wing: it imports nothing from the crate.

pub mod atomic_file;
pub mod clock;
pub mod heap;
pub mod pool;
pub mod shutdown;
pub mod stack;
