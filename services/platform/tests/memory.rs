//! Its own test binary: resident memory is per process, and no other test may allocate
//! while one of these measures.

/// Resident memory is per process: one test measures at a time.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
    let _measuring = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
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

/// What start-up leaves: 8 MiB of small blocks freed below one that stays, which it
/// returns.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn free_8_mib_below_a_live_block() -> Vec<u8> {
    let blocks: Vec<Vec<u8>> = (0..512u32).map(|i| vec![i as u8 | 1; 16 << 10]).collect();
    let pinned = vec![1u8; 16 << 10];
    std::hint::black_box(&pinned);
    drop(blocks);
    pinned
}

/// glibc keeps the freed blocks' pages until they are reused; returning free memory gives
/// them back.
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn free_memory_below_a_live_block_is_returned() {
    let _measuring = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let pinned = free_8_mib_below_a_live_block();
    let freed = resident_kib();
    shop_platform::memory::return_free_memory();
    let returned = resident_kib();
    assert!(
        returned + 4 * 1024 < freed,
        "8 MiB freed below a live block: resident {freed} KiB before returning it, {returned} KiB after"
    );
    drop(pinned);
}

/// The service's first ready answer returns start-up's freed memory (`probes.rs`).
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn the_first_ready_answer_returns_free_memory() {
    let _measuring = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let readiness = shop_platform::probes::Readiness::default();
    readiness.set_started();
    let pinned = free_8_mib_below_a_live_block();
    let freed = resident_kib();
    let (ready, _) = runtime.block_on(readiness.evaluate());
    let returned = resident_kib();
    assert!(ready);
    assert!(
        returned + 4 * 1024 < freed,
        "8 MiB freed below a live block: resident {freed} KiB before the first ready answer, {returned} KiB after"
    );
    drop(pinned);
}
