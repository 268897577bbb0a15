//! Returning freed memory to the system. glibc keeps what a burst of short-lived allocations freed (parsing a
//! config of 100 000 tenants, a routing-table fold, a routes snapshot), per thread arena, so without a trim the
//! proxy's RSS only ever grows by such bursts.

/// Gives the heap's free pages back to the system (all arenas). A few milliseconds at most; call it off the
/// serving threads, after a burst.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim takes no pointers and may be called at any time from any thread.
        unsafe {
            malloc_trim(0);
        }
    }
}
