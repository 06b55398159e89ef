//! The process allocator: mimalloc, told to keep the memory it frees.
//!
//! candle allocates a fresh buffer for every op's output. mimalloc reuses freed blocks, but by default it hands
//! unused memory back to the kernel ("purges" it) a second after it was freed, and the next large allocation then
//! faults the pages in again, each one zeroed by the kernel. A GRPO round frees and re-allocates the rollouts'
//! and the backward pass's buffers at every update: on the 2-core CPU `perf` put 86% of a round's first update
//! in the kernel's `clear_page_erms`, and the embedded `train grpo` default spent 24.8 of its 43 CPU-minutes in
//! the kernel. With purging off the same 8-step run took 229 s instead of 412 s (57 s of system time instead
//! of 173 s). The cost: the process keeps its peak memory until it exits.
//!
//! Binaries (and tests that run whole trainings) install [`MiMalloc`] as the global allocator and call
//! [`retain_freed_memory`] first thing. A user's `MIMALLOC_PURGE_DELAY` wins.

use std::os::raw::{c_int, c_long};

pub use mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the v3 sources `libmimalloc-sys` builds): the delay in
/// ms before freed memory is returned to the OS; −1 never.
const MI_OPTION_PURGE_DELAY: c_int = 15;

extern "C" {
    // mimalloc's C API, linked statically by `libmimalloc-sys` (a dependency of `mimalloc`).
    fn mi_option_set(option: c_int, value: c_long);
    fn mi_option_get(option: c_int) -> c_long;
}

/// Turn mimalloc's purging off (see the module docs), unless `MIMALLOC_PURGE_DELAY` is set in the environment.
pub fn retain_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain setter of mimalloc's option table; the index is checked against the header's value
        // by the test below (a wrong index would leave the purge delay at its default).
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
    }
}

/// mimalloc's current purge delay in ms (−1: never).
pub fn purge_delay() -> i64 {
    // SAFETY: a plain getter of mimalloc's option table.
    unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) as i64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purging_is_turned_off_unless_the_user_set_it() {
        let before = purge_delay();
        retain_freed_memory();
        match std::env::var("MIMALLOC_PURGE_DELAY") {
            Ok(v) => assert_eq!(purge_delay().to_string(), v.trim()),
            Err(_) => {
                // mimalloc's (v3) default is 1000 ms: the option read is the purge delay, not another one.
                assert_eq!(before, 1000);
                assert_eq!(purge_delay(), -1);
            }
        }
    }
}
