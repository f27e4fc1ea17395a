//! `cargo run`'s binary: every service comes up, answers, and stops on Ctrl-C.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn get(url: &str, path: &str) -> (u16, String) {
    let addr = url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

#[test]
fn starts_every_service_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shop"))
        .env_clear()
        .env("DATA_DIR", dir.path())
        .env("PRODUCT_PORT", "0")
        .env("ORDER_PORT", "0")
        .env("USER_PORT", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut urls = std::collections::HashMap::new();
    while urls.len() < 3 {
        let line = lines.next().expect("launcher prints its URLs").unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [name @ ("product" | "order" | "user"), url] = words[..] {
            urls.insert(name.to_owned(), url.to_owned());
        }
    }

    for url in urls.values() {
        assert_eq!(get(url, "/ready").0, 200, "{url}");
    }
    let (status, body) = get(&urls["product"], "/products/1");
    assert_eq!(status, 200);
    assert!(body.contains("\"Laptop\""), "{body}");
    // The order service was wired to the others' real ports.
    let (_, ready) = get(&urls["order"], "/ready");
    assert!(ready.contains("\"product\":{\"status\":\"ok\"}"), "{ready}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "launcher did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    for db in ["product.db", "order.db", "user.db"] {
        assert!(dir.path().join(db).exists(), "{db} missing");
    }
}
