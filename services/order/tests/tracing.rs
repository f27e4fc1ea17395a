//! Trace propagation through the real `order` binary: an inbound `traceparent` continues
//! into the calls it makes, and its log lines carry the same trace id.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::routing::{get, post};
use serde_json::{Value, json};
use shop_platform::testing::ServiceProcess;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

type Seen = Arc<Mutex<Vec<(String, HeaderMap)>>>;

/// Stands in for the user and product services, remembering each call's path and headers.
async fn recording_peer(seen: Seen) -> String {
    let app = Router::new()
        .route(
            "/users/{id}",
            get(|| async {
                axum::Json(
                    json!({"id": "1", "name": "T", "email": "t@example.com", "created_at": "x"}),
                )
            }),
        )
        .route(
            "/reservations",
            post(|| async {
                let body = json!({"id": "r1", "items": [
                    {"product_id": "1", "name": "Laptop", "quantity": 1, "unit_price": 999.99}
                ]});
                (StatusCode::CREATED, axum::Json(body))
            }),
        )
        .layer(axum::middleware::from_fn(
            move |request: Request, next: Next| {
                let seen = seen.clone();
                async move {
                    let kind = request
                        .uri()
                        .path()
                        .split('/')
                        .nth(1)
                        .unwrap_or_default()
                        .to_owned();
                    seen.lock().unwrap().push((kind, request.headers().clone()));
                    next.run(request).await
                }
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test(flavor = "multi_thread")]
async fn traceparent_flows_to_peers_and_into_logs() {
    let seen: Seen = Arc::default();
    let peer = recording_peer(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let service = ServiceProcess::spawn(
        Command::new(env!("CARGO_BIN_EXE_order"))
            .env_clear()
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("AUTH_MODE", "demo")
            .env("DATA_DIR", dir.path())
            .env("PRODUCT_URL", &peer)
            .env("USER_URL", &peer)
            .env("SHUTDOWN_DELAY", "0s"),
    );
    let addr = service.addr;
    let logs = &service.logs;

    let response = reqwest::Client::new()
        .post(format!("http://{addr}/orders"))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_SPAN}-01"))
        .header("x-request-id", "trace-test-1")
        .json(&json!({"user_id": "1", "products": ["1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-request-id"], "trace-test-1");

    let calls = seen.lock().unwrap().clone();
    let kinds: Vec<&str> = calls.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        kinds.contains(&"users") && kinds.contains(&"reservations"),
        "{kinds:?}"
    );
    let mut parents = std::collections::HashSet::new();
    for (kind, headers) in &calls {
        let traceparent = headers["traceparent"].to_str().unwrap();
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts[1], TRACE_ID, "{kind}: {traceparent}");
        assert_ne!(
            parts[2], PARENT_SPAN,
            "{kind}: each call is a new child span"
        );
        parents.insert(parts[2].to_owned());
        assert_eq!(headers["x-request-id"], "trace-test-1", "{kind}");
    }
    assert_eq!(parents.len(), calls.len(), "one client span per call");

    // The request's log lines carry the inbound trace id.
    let deadline = Instant::now() + Duration::from_secs(5);
    let completed = loop {
        let line = logs
            .recv_timeout(deadline - Instant::now())
            .expect("request log line");
        let entry: Value = serde_json::from_str(&line).expect("JSON log line");
        if entry["message"] == "request completed" {
            break entry;
        }
    };
    assert_eq!(completed["trace_id"], TRACE_ID, "{completed}");
    assert_eq!(
        completed["span_id"].as_str().unwrap().len(),
        16,
        "{completed}"
    );
    assert_eq!(completed["request_id"], "trace-test-1");
    assert_eq!(completed["http.route"], "/orders");
    assert_eq!(completed["status"], 201);

    let mut service = service;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(service.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(service.child.wait().unwrap().success());
}
