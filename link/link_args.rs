// Included by the four binaries' build scripts (`include!`): how their executables are
// linked on Linux with glibc.
//
// - Packed relative relocations (DT_RELR, glibc 2.36+, as in Debian 12 and the distroless
//   cc-debian12 image): the loader reads a few kilobytes of relocations at start instead of
//   ~800 KB, which would stay resident otherwise.
// - In release builds on x86_64, where Rust links with its bundled LLD (GNU ld has no such
//   option): the functions listed in `link/symbol-order/<binary>.txt` (what start-up, the
//   probes and the request path run; written by `scripts/symbol-order`) are placed side by
//   side, so the code an idle service has touched fills a few 64 KiB fault-around blocks
//   instead of the whole text. Names the file has and the binary lacks are skipped.
fn link_binaries(symbol_order: &str) {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" {
        return;
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    let order = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join(symbol_order);
    println!("cargo:rerun-if-changed={}", order.display());
    if var("PROFILE") == "release" && var("CARGO_CFG_TARGET_ARCH") == "x86_64" && order.exists() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
