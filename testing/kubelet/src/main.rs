//! Test harness for scripts/test-k8s (docs/KUBERNETES.md):
//!
//! - `mini-kubelet node ...`: owns one Node of a real control plane. It runs every Pod the
//!   scheduler binds to it as a local process (the workspace binary its image names), probes
//!   it as the spec says, reports status, and terminates it as a kubelet does. It also plays
//!   kube-proxy (userspace mode) and cluster DNS (an /etc/hosts file) for Services.
//! - `mini-kubelet load ...`: a steady mix of product reads and order creations through the
//!   gateway until told to stop, then a check that every acknowledged order is stored once.
//!
//! Meant to run inside a private network and mount namespace (`unshare --net --mount`):
//! it creates the pod network there (a bridge, a network namespace per pod) and adds
//! Service addresses to that namespace's loopback device.

mod container;
mod load;
mod network;
mod node;
mod pod;
mod proxy;

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

/// `--name value` pairs after the subcommand.
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

const USAGE: &str = "usage:
  mini-kubelet node --name NODE --bin-dir DIR --work DIR --apiserver HOST:PORT --hosts FILE
                    [--pod-network 10.244] [--external-service NS/NAME=HOST:PORT]
  mini-kubelet load --url URL --admin-email EMAIL --admin-password-file FILE --stop-file FILE
                    --report FILE [--concurrency N] [--retry-failed true]";

#[tokio::main]
async fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let command = argv.next().unwrap_or_default();
    let result = match Args::parse(argv) {
        Err(e) => Err(e),
        Ok(args) => match command.as_str() {
            "node" => node::run(args).await,
            "load" => load::run(args).await,
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("mini-kubelet: {e:#}");
            ExitCode::FAILURE
        }
    }
}
