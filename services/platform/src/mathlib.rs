//! The C math functions the binaries call, defined here so glibc's libm is not loaded.
//!
//! Two calls need it: tokio's scheduler (`pow`, for its average poll time) and SQLite's
//! FTS5 ranking (`log`). For those, every process mapped libm.so.6, and the loader's work
//! on it (symbol tables, IFUNC resolvers) left about 0.5 MiB of it resident: measured on
//! an idle product service, 320 KiB of its code and 196 KiB of its read-only data. The
//! `libm` crate (rust-lang's port of musl's) provides both; with the symbols defined in
//! the program the linker drops the library (`--as-needed`).
//!
//! If a dependency starts calling another libm function, libm.so.6 comes back, which
//! costs memory, never correctness: `readelf -d` on a release binary shows it (NEEDED), and
//! scripts/check-image fails when the running image maps it.
//!
//! glibc on Linux only (declared so in lib.rs): elsewhere the platform's libm is left alone.

#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[unsafe(no_mangle)]
pub extern "C" fn log(x: f64) -> f64 {
    libm::log(x)
}

#[cfg(test)]
mod tests {
    use std::f64::consts::{E, LN_2, LN_10};

    /// Values with exact or correctly rounded answers: these symbols replace glibc's for
    /// the whole process, so `f64::powf` here would only call them back.
    #[test]
    fn give_the_standard_answers() {
        assert_eq!(super::pow(2.0, 10.0), 1024.0);
        assert_eq!(super::pow(10.0, -2.0), 0.01);
        assert_eq!(super::pow(0.0, 0.0), 1.0);
        assert_eq!(super::pow(-2.0, 3.0), -8.0);
        assert!(super::pow(-2.0, 0.5).is_nan());
        for x in [0.5, 2.0, 3.0, 1e10, 7.25] {
            assert_eq!(super::pow(x, 0.5), x.sqrt());
        }
        assert_eq!(super::log(1.0), 0.0);
        assert_eq!(super::log(E), 1.0);
        assert_eq!(super::log(2.0), LN_2);
        assert_eq!(super::log(10.0), LN_10);
        assert_eq!(super::log(0.0), f64::NEG_INFINITY);
        assert!(super::log(-1.0).is_nan());
    }
}
