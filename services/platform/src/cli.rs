//! The `main` of every binary: `--help` from the declared variables, configuration errors
//! as one line and exit status 2, telemetry, signal handling, and the final flush.

use std::future::Future;
use std::process::ExitCode;

use crate::config::{ConfigError, Env, TELEMETRY_VARS, Var, help_text};
use crate::shutdown::Shutdown;
use crate::telemetry::{LogFormat, Telemetry};

/// A binary's identity and the variables it reads, grouped for `--help`.
pub struct Binary {
    pub name: &'static str,
    pub about: &'static str,
    pub vars: &'static [(&'static str, &'static [Var])],
    pub runtime: Runtime,
}

/// The runtime `main` runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// A worker thread per CPU: for servers that serve on it.
    MultiThread,
    /// One thread: for binaries that run their own worker threads (the gateway) and
    /// only wait for signals here.
    CurrentThread,
}

const LOG_FORMAT: Var = TELEMETRY_VARS[0];

impl Binary {
    pub fn help(&self) -> String {
        let mut groups: Vec<(&str, &[Var])> = self.vars.to_vec();
        groups.push(("Telemetry", TELEMETRY_VARS));
        help_text(self.name, self.about, &groups)
    }

    /// Parses arguments and configuration, then runs `serve` on a multi-threaded runtime
    /// until it returns (after a graceful shutdown).
    pub fn main<C, F, Fut>(
        &self,
        load: impl FnOnce(&Env) -> Result<C, ConfigError>,
        serve: F,
    ) -> ExitCode
    where
        F: FnOnce(C, Shutdown) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let args: Vec<String> = std::env::args().skip(1).collect();
        match args.first().map(String::as_str) {
            None => {}
            Some("-h" | "--help" | "help") => {
                print!("{}", self.help());
                return ExitCode::SUCCESS;
            }
            Some("-V" | "--version") => {
                println!(
                    "{} {} ({})",
                    self.name,
                    crate::metrics::VERSION,
                    crate::metrics::REVISION
                );
                return ExitCode::SUCCESS;
            }
            Some(other) => {
                eprintln!("{}: unknown argument {other:?}; see --help", self.name);
                return ExitCode::from(2);
            }
        }

        let env = Env::from_process();
        let loaded = env
            .parse::<LogFormat>(&LOG_FORMAT)
            .and_then(|format| load(&env).map(|config| (format, config)));
        let (format, config) = match loaded {
            Ok(loaded) => loaded,
            Err(err) => {
                eprintln!("{}: {err}", self.name);
                return ExitCode::from(2);
            }
        };

        let mut builder = match self.runtime {
            Runtime::MultiThread => tokio::runtime::Builder::new_multi_thread(),
            Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        };
        let runtime = match builder.enable_all().build() {
            Ok(runtime) => runtime,
            Err(err) => {
                eprintln!("{}: cannot start the async runtime: {err}", self.name);
                return ExitCode::FAILURE;
            }
        };
        let name = self.name;
        runtime.block_on(async move {
            let telemetry = match Telemetry::init(name, format) {
                Ok(telemetry) => telemetry,
                Err(err) => {
                    eprintln!("{name}: telemetry setup failed: {err:#}");
                    return ExitCode::FAILURE;
                }
            };
            let outcome = match Shutdown::on_signals() {
                Ok(shutdown) => serve(config, shutdown).await,
                Err(err) => Err(anyhow::anyhow!("cannot install signal handlers: {err}")),
            };
            if let Err(err) = &outcome {
                tracing::error!(error = format!("{err:#}"), "exiting after a fatal error");
            }
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        })
    }
}
