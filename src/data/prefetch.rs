//! Prefetch hints: asking the CPU to start loading memory that is about to be read, so
//! that several cache and TLB misses (a record somewhere in a gigabyte, a phone in an
//! index of hundreds of megabytes) wait side by side instead of one after another. Only
//! hints: they never fault, change nothing, and past a slice's end do nothing.

/// Starts loading the two cache lines at `offset` of `bytes` (a compact record is 60-90
/// bytes). Public so that `examples/memory_floor.rs` measures with the aggregation's own
/// prefetch.
#[inline(always)]
pub fn bytes(bytes: &[u8], offset: usize) {
    if let Some(tail) = bytes.get(offset..) {
        let line = tail.as_ptr();
        hint(line);
        hint(line.wrapping_add(64));
    }
}

/// Starts loading the cache line of `items[i]`.
#[inline(always)]
pub(crate) fn item<T>(items: &[T], i: usize) {
    if let Some(item) = items.get(i) {
        hint(std::ptr::from_ref(item).cast());
    }
}

#[inline(always)]
fn hint(line: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE, which `_mm_prefetch` needs, is part of the x86-64 baseline every
    // build targets; a prefetch reads nothing and cannot fault, whatever the address.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(line.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = line;
}
