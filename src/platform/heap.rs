//! The process's heap: its page size (transparent huge pages or not), giving the index
//! build's peak back to the operating system, and how much of it is resident.
//!
//! Transparent huge pages ([`HugePages`]): mimalloc asks the kernel for huge pages on
//! its arenas (`madvise(MADV_HUGEPAGE)`), so under the common `madvise` policy every
//! fresh page of an index build is a 2 MiB page the kernel zeroes on first touch. On this
//! project's 2-core VMs, whose host takes back memory the guest frees, a huge page
//! touched for the first time after a few idle seconds cost 4-5x a small page (1 GiB:
//! 2.1-2.8 s against 0.5-0.7 s), and a first build of a time-ordered file took 1.1-1.7 s
//! instead of 0.44-0.62 s (README, "Performance"). Served afterwards, the index is a
//! mapped file and the heap small; the worker's CPU per task was the same either way.
//! So by default the process opts out (`PR_SET_THP_DISABLE`: inherited by threads, and
//! by children across `exec`), before any thread starts.
//!
//! Building the index of a time-ordered file or a phone book holds each span's phone
//! beside it until its bucket is grouped: a peak of about 24 bytes per record. Freed, that
//! memory stays with glibc's allocator (its arenas keep chunks for reuse) and counts as
//! the process's resident heap: on 20 M records over 8.6 M phones a glibc build sat at
//! 565 MB resident after startup where the index keeps 299 MB; trimming after the build
//! returned it (293 MB).
//!
//! The binaries allocate with mimalloc (`src/bin/report-service.rs`), which `malloc_trim`
//! does not reach, and which keeps the pages a thread frees of another thread's until the
//! owner collects. The build's pages belong to the pool threads that built it, idle under
//! a load of light tasks: a first start on the phone book held 212-321 MiB under load,
//! where a restart held 81-135 MiB, and 511 MiB idle once it served the stored index,
//! against a restart's 87 MiB (README, "Memory"). So a binary whose allocator needs it
//! registers its collection ([`set_collector`]), and [`release_free_memory`] runs it on
//! the calling thread and on every thread of the pool that built, once after each build,
//! when the build's peak and any built copy it no longer serves are freed
//! (`engine::reload::persist_indexes`, on the reload thread: never on the way to
//! readiness, nor in the one-shot `report`).

use crate::platform::pool::WorkerPool;
use std::sync::OnceLock;

/// Whether the process uses transparent huge pages (`TRANSPARENT_HUGE_PAGES`, default
/// `off`): see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    /// The process opts out: its heap and mappings are in small pages.
    Off,
    /// The system's policy applies (`/sys/kernel/mm/transparent_hugepage/enabled`),
    /// and mimalloc asks for huge pages where that policy lets it.
    System,
}

/// Applies `policy` to the whole process. Call it before any thread starts, so every
/// page the process touches is covered (the setting holds for pages faulted in after
/// it). `System` changes nothing: a process started with huge pages disabled (a parent's
/// choice, inherited) stays so. Outside Linux there is nothing to set.
pub fn apply_huge_pages(policy: HugePages) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    if policy == HugePages::Off {
        // SAFETY: `PR_SET_THP_DISABLE` takes integers only and changes a flag of this
        // process's memory map; no memory of ours is read or written.
        let done = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if done != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = policy;
    Ok(())
}

static COLLECTOR: OnceLock<fn()> = OnceLock::new();

/// Registers how the process's global allocator gives the calling thread's free memory
/// back to the operating system (mimalloc: `mi_collect(true)`). Set once, by the binary
/// that chose the allocator; returns false if one was set already (that one is kept).
pub fn set_collector(collect: fn()) -> bool {
    COLLECTOR.set(collect).is_ok()
}

/// Returns the allocator's free memory to the operating system: glibc's trim, then the
/// registered collector (see [`set_collector`]) on this thread and on each of `pool`'s.
/// Blocks until every thread of `pool` has run it, each after the job it is running: call
/// it off the async runtime. Best effort, and cheap next to the build it follows.
pub fn release_free_memory(pool: &WorkerPool) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only hands free pages back to the kernel; glibc documents
    // it as thread-safe (it takes each arena's lock), and no pointer of ours is involved.
    unsafe {
        libc::malloc_trim(0);
    }
    if let Some(collect) = COLLECTOR.get().copied() {
        collect();
        pool.threads().broadcast(|_| collect());
    }
}

/// Resident anonymous memory of this process (`RssAnon` in `/proc/self/status`: the
/// heap, not the mapped data), if the system says.
pub fn resident_anonymous_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status.lines().find_map(|l| l.strip_prefix("RssAnon:"))?.trim().strip_suffix("kB")?.trim();
    kib.parse::<u64>().ok().map(|kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// The threads the test collector ran on.
    static COLLECTED_ON: Mutex<Vec<String>> = Mutex::new(Vec::new());

    fn record_thread() {
        let name = std::thread::current().name().unwrap_or("unnamed").to_owned();
        COLLECTED_ON.lock().push(name);
    }

    /// mimalloc keeps another thread's freed pages until that thread collects, so the
    /// collector must run on every thread that built, not only on the one that asks.
    #[test]
    fn the_collector_runs_on_the_calling_thread_and_on_every_thread_of_the_pool() {
        assert!(set_collector(record_thread), "the first collector is registered");
        assert!(!set_collector(|| {}), "and kept");
        let pool = WorkerPool::new("heap-test", 3).unwrap();
        let asking = std::thread::Builder::new()
            .name("heap-asking".to_owned())
            .spawn(move || release_free_memory(&pool))
            .unwrap();
        asking.join().unwrap();
        let mut ran_on: Vec<String> = COLLECTED_ON.lock().iter().filter(|n| n.starts_with("heap-")).cloned().collect();
        ran_on.sort();
        assert_eq!(ran_on, ["heap-asking", "heap-test-0", "heap-test-1", "heap-test-2"]);
    }
}
