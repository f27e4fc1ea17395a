//! Links the gateway binary with packed relative relocations (DT_RELR, glibc 2.36+, as in
//! Debian 12 and the distroless cc-debian12 image): the loader reads a few kilobytes of
//! relocations at start instead of ~800 KB, which stays resident otherwise.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
