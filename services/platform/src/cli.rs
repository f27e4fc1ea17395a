//! The `main` of every binary: `--help` from the declared variables, configuration errors
//! as one line and exit status 2, telemetry, signal handling, and the final flush.
//!
//! Subcommands exist for containers without a shell: `healthcheck` (compose and Docker
//! `HEALTHCHECK`), `sleep` (a `preStop` hook on clusters without the native sleep action),
//! `describe` (ports, probe paths and variables as JSON, so packaging is checked against
//! the binary itself) and `smoke` (the Helm test).

use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

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

/// Longest a `healthcheck` waits: readiness checks are bounded at 2 s each, run concurrently.
const PROBE_TIMEOUT: Duration = Duration::from_secs(4);

/// One `GET path` over HTTP/1.1 without a runtime; returns the status and body.
fn probe(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    // One write: `write!` on a bare socket sends each formatted piece as its own segment.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP/1.1 response"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_owned()))
}

/// `sleep SECONDS`: a `preStop` hook for images without a shell.
fn sleep(name: &str, args: &[String]) -> ExitCode {
    match args.first().map(|s| crate::config::parse_duration(s)) {
        Some(Ok(duration)) if args.len() == 1 => {
            std::thread::sleep(duration);
            ExitCode::SUCCESS
        }
        Some(Err(reason)) => {
            eprintln!("{name} sleep: {reason}");
            ExitCode::from(2)
        }
        _ => {
            eprintln!("{name} sleep: expected one duration, e.g. `sleep 5s`");
            ExitCode::from(2)
        }
    }
}

impl Binary {
    pub fn help(&self) -> String {
        let mut groups: Vec<(&str, &[Var])> = self.vars.to_vec();
        groups.push(("Telemetry", TELEMETRY_VARS));
        help_text(self.name, self.about, &groups)
    }

    /// `PORT` as this binary reads it: the environment, else the declared default.
    fn port(&self, env: &Env) -> Result<u16, ConfigError> {
        let var = self
            .all_vars()
            .find(|var| var.name == "PORT")
            .copied()
            .unwrap_or(Var::new("PORT", "0", ""));
        env.parse(&var)
    }

    fn all_vars(&self) -> impl Iterator<Item = &Var> {
        self.vars
            .iter()
            .flat_map(|(_, vars)| vars.iter())
            .chain(TELEMETRY_VARS)
    }

    /// What packaging needs to know about this binary, from the same declarations it runs
    /// on: port, probe paths, shutdown defaults and every variable it reads.
    pub fn describe(&self) -> serde_json::Value {
        let mut groups: Vec<(&str, &[Var])> = self.vars.to_vec();
        groups.push(("Telemetry", TELEMETRY_VARS));
        let vars: Vec<serde_json::Value> = groups
            .iter()
            .flat_map(|(group, vars)| {
                vars.iter().map(move |var| {
                    serde_json::json!({"name": var.name, "default": var.default, "group": group})
                })
            })
            .collect();
        let default_of = |name: &str| self.all_vars().find(|v| v.name == name)?.default;
        serde_json::json!({
            "name": self.name,
            "version": crate::metrics::VERSION,
            "port": default_of("PORT").and_then(|p| p.parse::<u16>().ok()),
            "probes": {
                "liveness": crate::probes::HEALTH_PATH,
                "readiness": crate::probes::READY_PATH,
                "metrics": crate::probes::METRICS_PATH,
            },
            "shutdown": {
                "delay": default_of("SHUTDOWN_DELAY"),
                "timeout": default_of("SHUTDOWN_TIMEOUT"),
            },
            "vars": vars,
        })
    }

    /// Probes this binary's own `/ready` on its configured port: exit 0 when ready, 1 when
    /// not (Docker's HEALTHCHECK convention), 2 on a configuration error.
    pub fn healthcheck(&self, env: &Env) -> ExitCode {
        let port = match self.port(env) {
            Ok(port) => port,
            Err(err) => {
                eprintln!("{} healthcheck: {err}", self.name);
                return ExitCode::from(2);
            }
        };
        // A wildcard listener is reached on loopback; a specific address only on itself.
        let host = match env
            .raw("HOST")
            .and_then(|h| h.trim().parse::<IpAddr>().ok())
        {
            Some(IpAddr::V4(v4)) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(IpAddr::V6(v6)) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            Some(addr) => addr,
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        match probe(SocketAddr::new(host, port), crate::probes::READY_PATH) {
            Ok((200, _)) => ExitCode::SUCCESS,
            Ok((status, body)) => {
                eprintln!("{} healthcheck: {status} {}", self.name, body.trim());
                ExitCode::FAILURE
            }
            Err(err) => {
                eprintln!("{} healthcheck: {host}:{port}: {err}", self.name);
                ExitCode::FAILURE
            }
        }
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
            Some("healthcheck") => return self.healthcheck(&Env::from_process()),
            Some("describe") => {
                println!("{}", self.describe());
                return ExitCode::SUCCESS;
            }
            Some("sleep") => return sleep(self.name, &args[1..]),
            Some("smoke") => return crate::smoke::main(self.name, &args[1..]),
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

        crate::memory::release_large_blocks();
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

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::config::ServerConfig;

    const PORT: Var = Var::new("PORT", "8089", "port");
    const EXTRA: Var = Var::optional("EXTRA_SETTING", "extra");
    const TEST: Binary = Binary {
        name: "test",
        about: "a test binary",
        vars: &[("Server", &ServerConfig::vars(PORT)), ("Extra", &[EXTRA])],
        runtime: Runtime::MultiThread,
    };

    /// Answers one connection with `status`, as a server's `/ready` would.
    fn answer_once(status: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "the request ended early");
                request.extend_from_slice(&chunk[..n]);
            }
            assert!(String::from_utf8_lossy(&request).starts_with("GET /ready HTTP/1.1\r\n"));
            let body = r#"{"status":"x"}"#;
            write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        });
        port
    }

    fn code(exit: ExitCode) -> String {
        format!("{exit:?}")
    }

    #[test]
    fn describe_lists_port_probes_and_every_variable() {
        let d = TEST.describe();
        assert_eq!(d["name"], "test");
        assert_eq!(d["port"], 8089);
        assert_eq!(d["probes"]["readiness"], "/ready");
        assert_eq!(d["probes"]["liveness"], "/health");
        assert_eq!(d["shutdown"]["delay"], "5s");
        let names: Vec<&str> = d["vars"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        for name in [
            "HOST",
            "PORT",
            "SHUTDOWN_TIMEOUT",
            "EXTRA_SETTING",
            "RUST_LOG",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        assert!(names.contains(&"OTEL_TRACES_SAMPLER_ARG"));
    }

    #[test]
    fn healthcheck_exits_zero_only_when_ready() {
        let ok = Env::from_pairs([("PORT", answer_once("200 OK").to_string())]);
        assert_eq!(code(TEST.healthcheck(&ok)), code(ExitCode::SUCCESS));

        let not_ready = Env::from_pairs([
            ("PORT", answer_once("503 Service Unavailable").to_string()),
            ("HOST", "0.0.0.0".to_owned()),
        ]);
        assert_eq!(code(TEST.healthcheck(&not_ready)), code(ExitCode::FAILURE));

        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let nobody = Env::from_pairs([("PORT", closed.to_string())]);
        assert_eq!(code(TEST.healthcheck(&nobody)), code(ExitCode::FAILURE));

        let invalid = Env::from_pairs([("PORT", "eighty")]);
        assert_eq!(code(TEST.healthcheck(&invalid)), code(ExitCode::from(2)));
    }

    #[test]
    fn sleep_takes_one_duration() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(code(sleep("t", &args(&["10ms"]))), code(ExitCode::SUCCESS));
        assert_eq!(code(sleep("t", &args(&[]))), code(ExitCode::from(2)));
        assert_eq!(code(sleep("t", &args(&["soon"]))), code(ExitCode::from(2)));
        assert_eq!(
            code(sleep("t", &args(&["1s", "2s"]))),
            code(ExitCode::from(2))
        );
    }
}
