//! Thread stacks deep enough for the AMQP client's decoding.
//!
//! lapin decodes (and Rust drops) a message's header table recursively, one stack frame
//! per nesting level, on its own I/O thread and then on whichever thread holds the
//! delivery. A client may nest tables about 18,000 deep within one 128 KiB frame (the
//! size `broker` caps frames at); that overflows a default 2 MiB stack and aborts the
//! process (measured: a depth of 1,000 did, in a debug build; 21,000 needed 16 MiB in a
//! release build). So every thread gets [`THREAD_STACK_BYTES`]: reserved address space,
//! of which only the pages a thread really touches are ever committed.

/// The stack of every thread the service starts or lets its libraries start.
pub const THREAD_STACK_BYTES: usize = 64 << 20;

/// Makes threads spawned without an explicit stack size (lapin's I/O loop, rayon's
/// workers, the snapshot writer) get [`THREAD_STACK_BYTES`]. Call it first in `main`,
/// before any thread exists; a `RUST_MIN_STACK` the operator set is kept.
pub fn ensure_deep_stacks() {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: called at the start of `main`, before any other thread exists, so no
        // thread can read the environment concurrently.
        unsafe { std::env::set_var("RUST_MIN_STACK", THREAD_STACK_BYTES.to_string()) };
    }
}
