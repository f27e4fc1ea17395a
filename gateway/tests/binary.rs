//! The real `gateway` binary: streaming with flat memory, and graceful shutdown.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use common::stub;
use futures_util::StreamExt;
use serde_json::Value;

const FIFTY_MB: usize = 50 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

struct Gateway {
    child: Child,
    url: String,
}

impl Gateway {
    fn start(env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .env_clear()
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("ACCESS_LOG", "false")
            .env("AUTH_MODE", "demo")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let address = loop {
            let line = lines.next().expect("gateway logs its address").unwrap();
            let entry: Value = serde_json::from_str(&line).unwrap();
            if entry["message"] == "listening" {
                break entry["address"].as_str().unwrap().to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            url: format!("http://{address}"),
        }
    }

    /// (current, peak) resident memory in KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap()
                .parse()
                .unwrap()
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn generated_body() -> Body {
    let chunks =
        futures_util::stream::iter((0..FIFTY_MB / CHUNK).map(|i| {
            Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![(i % 251) as u8; CHUNK]))
        }));
    Body::from_stream(chunks)
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_megabytes_stream_through_both_ways_with_flat_memory() {
    let upstream = stub(
        Router::new()
            .route("/products", get(|| async { generated_body() }))
            .route(
                "/products/upload",
                post(|body: Body| async move {
                    let mut stream = body.into_data_stream();
                    let mut total = 0usize;
                    while let Some(chunk) = stream.next().await {
                        total += chunk.unwrap().len();
                    }
                    total.to_string()
                }),
            ),
    )
    .await;
    let gateway = Gateway::start(&[("PRODUCT_URL", &upstream), ("BODY_LIMIT", "64MiB")]);
    let http = reqwest::Client::new();
    // Warm up so the baseline includes the pools and buffers of a working gateway.
    for _ in 0..20 {
        http.get(format!("{}/health", gateway.url))
            .send()
            .await
            .unwrap();
    }
    let (baseline, _) = gateway.memory_kib();

    let response = http
        .get(format!("{}/api/v1/products", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut received = 0usize;
    while let Some(chunk) = stream.next().await {
        received += chunk.unwrap().len();
    }
    assert_eq!(received, FIFTY_MB);

    let upload = reqwest::Body::wrap_stream(futures_util::stream::iter(
        (0..FIFTY_MB / CHUNK).map(|_| Ok::<_, std::io::Error>(vec![7u8; CHUNK])),
    ));
    let response = http
        .post(format!("{}/api/v1/products/upload", gateway.url))
        .body(upload)
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), FIFTY_MB.to_string());

    let (_, peak) = gateway.memory_kib();
    let growth_mib = (peak.saturating_sub(baseline)) as f64 / 1024.0;
    println!(
        "gateway RSS baseline {:.1} MiB, peak {:.1} MiB",
        baseline as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    assert!(
        growth_mib < 8.0,
        "peak grew {growth_mib:.1} MiB while moving 100 MB: bodies were buffered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_requests_finish() {
    let upstream = stub(Router::new().route(
        "/products",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            "finished"
        }),
    ))
    .await;
    let mut gateway = Gateway::start(&[
        ("PRODUCT_URL", &upstream),
        ("SHUTDOWN_DELAY", "500ms"),
        ("SHUTDOWN_TIMEOUT", "10s"),
    ]);
    let http = reqwest::Client::new();
    let slow = tokio::spawn({
        let url = format!("{}/api/v1/products", gateway.url);
        let http = http.clone();
        async move { http.get(url).send().await.unwrap().text().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = http
        .get(format!("{}/ready", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    // Draining: keep-alive connections are closed after their next response.
    assert_eq!(ready.headers()["connection"], "close");
    assert_eq!(slow.await.unwrap(), "finished");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = gateway.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "gateway did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}
