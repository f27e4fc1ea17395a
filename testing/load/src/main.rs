//! Load generator for scripts/test-k8s (docs/KUBERNETES.md): a steady mix of product reads
//! and order creations through the gateway until a stop file appears, then a check that
//! every acknowledged order is stored once.

mod load;

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

pub fn log(message: std::fmt::Arguments<'_>) {
    eprintln!("{} {message}", chrono::Utc::now().format("%H:%M:%S%.3f"));
}

#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::log(format_args!($($arg)*)) };
}

/// `--name value` pairs.
pub struct Args(HashMap<String, String>);

impl Args {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self> {
        let mut map = HashMap::new();
        let mut args = args.peekable();
        while let Some(flag) = args.next() {
            let Some(name) = flag.strip_prefix("--") else {
                bail!("unexpected argument {flag:?}");
            };
            let value = args
                .next()
                .with_context(|| format!("{flag} needs a value"))?;
            map.insert(name.to_owned(), value);
        }
        Ok(Self(map))
    }

    pub fn get(&self, name: &str) -> Result<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .with_context(|| format!("--{name} is required"))
    }

    pub fn get_or<'a>(&'a self, name: &str, default: &'a str) -> &'a str {
        self.0.get(name).map(String::as_str).unwrap_or(default)
    }
}

const USAGE: &str = "usage: shop-load --url URL --admin-email EMAIL --admin-password-file FILE \
--stop-file FILE --report FILE [--concurrency N] [--rate N] [--retry-failed true]";

#[tokio::main]
async fn main() -> ExitCode {
    let args = std::env::args().skip(1);
    let result = match Args::parse(args) {
        Ok(args) => load::run(args).await,
        Err(e) => {
            eprintln!("{e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("shop-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}
