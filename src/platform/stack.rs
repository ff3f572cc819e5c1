//! Thread stacks deep enough for the AMQP client's decoding.
//!
//! lapin decodes (and Rust clones and drops) a message's header table recursively, one
//! stack frame per nesting level, on its own I/O thread and then on whichever thread
//! holds the delivery. A client may nest tables 21,800 deep, or arrays 26,000 deep,
//! within one 128 KiB frame (the most `broker::FRAME_MAX` allows); a default 2 MiB
//! stack overflows at about 1,000 levels and the process aborts. Measured on the
//! release build: both maxima are answered with 32 MiB stacks. So every thread gets
//! [`THREAD_STACK_BYTES`], twice that: reserved address space, of which only the pages a
//! thread really touches are ever committed. (An unoptimised debug build needs about
//! 12 KiB per level, far more; the tests use headers 2,000 deep.)

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
