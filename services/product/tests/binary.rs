//! The real `product` binary as an operator runs it: signals, exit codes, configuration
//! errors, `--help`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shop_platform::testing::ServiceProcess;

struct Service {
    process: ServiceProcess,
    _dir: tempfile::TempDir,
}

fn start(env: &[(&str, &str)]) -> Service {
    let dir = tempfile::tempdir().unwrap();
    let process = ServiceProcess::spawn(
        Command::new(env!("CARGO_BIN_EXE_product"))
            .env_clear()
            .env("PORT", "0")
            .env("AUTH_MODE", "demo")
            .env("HOST", "127.0.0.1")
            .env("DATA_DIR", dir.path())
            .envs(env.iter().copied())
            .stderr(Stdio::inherit()),
    );
    Service { process, _dir: dir }
}

impl Service {
    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.process.child.id() as i32), signal).unwrap();
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.process.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn status_of(&self, path: &str) -> u16 {
        let mut stream = TcpStream::connect(self.process.addr).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response[9..12].parse().unwrap()
    }

    fn drain_logs(&self) -> Vec<String> {
        self.process.logs.try_iter().collect()
    }
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let mut service = start(&[("SHUTDOWN_DELAY", "1500ms"), ("SHUTDOWN_TIMEOUT", "10s")]);
    assert_eq!(service.status_of("/ready"), 200);

    // A slow client: headers and half the body now, the rest after SIGTERM.
    let body = br#"{"id":"late","name":"Slow Lamp","price":12.5,"quantity":3}"#;
    let (first, rest) = body.split_at(body.len() / 2);
    let mut slow = TcpStream::connect(service.process.addr).unwrap();
    write!(
        slow,
        "POST /products HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    slow.write_all(first).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let signalled = Instant::now();
    service.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        service.status_of("/ready"),
        503,
        "not ready from the first moment of shutdown"
    );
    assert_eq!(
        service.status_of("/health"),
        200,
        "still alive while draining"
    );

    // Finish the request after the delay, while the server is draining.
    std::thread::sleep(Duration::from_millis(1500));
    slow.write_all(rest).unwrap();
    let mut response = String::new();
    slow.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");

    let status = service.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(10));
    let logs = service.drain_logs().join("\n");
    assert!(logs.contains("\"signal\":\"SIGTERM\""), "{logs}");
    assert!(logs.contains("draining"), "{logs}");
}

#[test]
fn a_second_signal_exits_at_once_with_failure() {
    let mut service = start(&[("SHUTDOWN_DELAY", "30s")]);
    service.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    service.signal(Signal::SIGINT);
    let status = service.wait_exit(Duration::from_secs(3));
    assert_eq!(status.code(), Some(130));
}

#[test]
fn an_invalid_setting_exits_2_with_one_line_naming_it() {
    for (var, value) in [
        ("PORT", "http"),
        ("SHUTDOWN_TIMEOUT", "soon"),
        ("LOG_FORMAT", "xml"),
        ("DATABASE_URL", "mysql://x"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_product"))
            .env_clear()
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{var}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&format!("invalid {var}=")), "{stderr}");
    }
}

#[test]
fn help_documents_every_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_product"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for var in [
        "HOST",
        "PORT",
        "SHUTDOWN_DELAY",
        "SHUTDOWN_TIMEOUT",
        "REQUEST_TIMEOUT",
        "BODY_LIMIT",
        "DATA_DIR",
        "DATABASE_URL",
        "SEED_PRODUCTS",
        "CATALOGUE_RESYNC",
        "LOG_FORMAT",
        "RUST_LOG",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        assert!(help.contains(var), "{var} missing from --help");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_product"))
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}
