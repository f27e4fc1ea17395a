//! Its own test binary: resident memory is per process, and no other test may allocate
//! while this one measures.

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// What a password hash does: a 19 MiB block, written, then freed. With glibc's default
/// dynamic threshold the second and later blocks stay resident after they are freed.
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn freed_large_blocks_leave_no_resident_memory() {
    shop_platform::memory::release_large_blocks();
    let before = resident_kib();
    for round in 0..4u8 {
        let block = vec![round | 1; 19 << 20];
        std::hint::black_box(&block);
    }
    let after = resident_kib();
    assert!(
        after < before + 4 * 1024,
        "resident memory grew from {before} KiB to {after} KiB after four 19 MiB blocks were freed"
    );
}
