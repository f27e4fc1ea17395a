//! Process-wide allocator settings, applied once at start by every binary.

/// Large blocks are mapped on their own and unmapped when freed.
///
/// glibc raises its mmap threshold each time a mapped block is freed, up to 32 MiB, so
/// after the first one every later block of that size is carved from a heap arena and
/// stays resident after `free`. Password hashing allocates 19 MiB per hash (argon2id's
/// memory cost), on whichever blocking thread runs it: measured with bench/services.py,
/// the user service sat at 31 MiB idle and 90 MiB under the order load; with a fixed
/// threshold of 1 MiB, 13 and 15 MiB. `MALLOC_MMAP_THRESHOLD_` in the environment (or a
/// glibc tunable) still wins: set, it is left alone.
pub fn release_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("mmap_threshold"))
        {
            return;
        }
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        /// From glibc's malloc.h.
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        // SAFETY: mallopt only changes allocator parameters; it is called before any
        // other thread exists, and a failure (0) leaves glibc's defaults in place.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 1 << 20);
        }
    }
}

/// Gives the heap's free pages back to the kernel.
///
/// glibc returns memory only from the top of each arena; what start-up frees below a
/// live block (configuration, migrations, the catalogue's first load, parsed key sets)
/// stays resident until reused. Measured on an idle product service: 2.5 -> 1.9 MiB of
/// anonymous memory. Called once, when the service first reports ready.
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes each arena's lock in turn; it is safe from any thread.
        unsafe {
            malloc_trim(0);
        }
    }
}
