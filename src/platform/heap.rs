//! The process's heap: giving the index build's peak back to the operating system, and
//! how much of it is resident.
//!
//! Building the index of a time-ordered file or a phone book holds each span's phone
//! beside it until its bucket is grouped: a peak of about 24 bytes per record. Freed, that
//! memory stays with glibc's allocator (its arenas keep chunks for reuse) and counts as
//! the process's resident heap: on 20 M records over 8.6 M phones a glibc build sat at
//! 565 MB resident after startup where the index keeps 299 MB; trimming after the build
//! returned it (293 MB).
//!
//! The binaries allocate with mimalloc (`src/bin/report-service.rs`), which this call does
//! not reach: mimalloc returns free pages on its own, seconds after the build. Once the
//! built index is stored, the service serves the stored file and frees the built copy
//! (`Engine::use_stored_indexes`); mimalloc still keeps part of the build: on the same
//! phone book a first start holds 258-321 MiB under load against 81-135 MiB after a
//! restart (README, "Memory"). The call stays for glibc builds of the library (the tests,
//! the benches, other binaries).

/// Returns the allocator's free memory to the operating system (glibc; elsewhere a
/// no-op). Best effort, and cheap next to the build it follows.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only hands free pages back to the kernel; glibc documents
    // it as thread-safe (it takes each arena's lock), and no pointer of ours is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident anonymous memory of this process (`RssAnon` in `/proc/self/status`: the
/// heap, not the mapped data), if the system says.
pub fn resident_anonymous_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status.lines().find_map(|l| l.strip_prefix("RssAnon:"))?.trim().strip_suffix("kB")?.trim();
    kib.parse::<u64>().ok().map(|kib| kib * 1024)
}
