//! The standard middleware stack and probes, on a router built only for these tests.

use std::time::Duration;

use axum::Router;
use axum::http::{Method, StatusCode};
use axum::routing::{get, post};
use serde_json::{Value, json};
use shop_platform::server::stack;
use shop_platform::testing::{RunningApp, call, parse_exposition};
use shop_platform::{ApiJson, Metrics, ServerConfig, ServiceParts};

fn routes() -> Router {
    Router::new()
        .route("/panic", get(panics))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "done"
            }),
        )
        .route(
            "/echo",
            post(|ApiJson(v): ApiJson<Value>| async move { axum::Json(v) }),
        )
        .route("/request-id", get(seen_request_id))
}

/// The request id the handler sees, and the room left in the request's header map.
async fn seen_request_id(headers: axum::http::HeaderMap) -> axum::Json<Value> {
    axum::Json(json!({
        "id": headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        "capacity": headers.capacity(),
    }))
}

async fn panics() -> &'static str {
    panic!("secret detail: hunter2")
}

fn router(config: ServerConfig) -> (Router, Metrics) {
    let metrics = Metrics::new("test");
    (stack(routes(), &config, metrics.clone()), metrics)
}

#[tokio::test]
async fn a_panic_is_a_500_json_error_without_details() {
    let (router, metrics) = router(ServerConfig::ephemeral());
    let r = call(&router, Method::GET, "/panic", ()).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::INTERNAL_SERVER_ERROR, "internal")
    );
    assert!(!r.body.to_string().contains("hunter2"));
    assert!(r.headers.contains_key("x-request-id"));
    let text = metrics.render();
    assert!(
        text.contains(r#"route="/panic""#) && text.contains(r#"status="500""#),
        "{text}"
    );
    // The panic did not poison anything: the next request is served.
    let r = call(&router, Method::POST, "/echo", json!({"ok": true})).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn a_request_over_the_timeout_is_a_504_json_error() {
    let config = ServerConfig {
        request_timeout: Duration::from_millis(100),
        ..ServerConfig::ephemeral()
    };
    let (router, metrics) = router(config);
    let started = std::time::Instant::now();
    let r = call(&router, Method::GET, "/slow", ()).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let exposition = parse_exposition(&metrics.render()).unwrap();
    let in_flight = exposition
        .samples_of("http_server_requests_in_flight")
        .next()
        .unwrap();
    assert_eq!(
        in_flight.value, 0.0,
        "an abandoned request leaves the in-flight gauge"
    );
}

#[tokio::test]
async fn the_body_limit_is_configurable_and_answers_413_json() {
    let config = ServerConfig {
        body_limit: 64,
        ..ServerConfig::ephemeral()
    };
    let (router, _) = router(config);
    let small = call(&router, Method::POST, "/echo", json!({"a": 1})).await;
    assert_eq!(small.status, StatusCode::OK);
    let big = call(
        &router,
        Method::POST,
        "/echo",
        json!({"a": "x".repeat(100)}),
    )
    .await;
    assert_eq!(
        (big.status, big.error_code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
}

#[tokio::test]
async fn an_invalid_inbound_request_id_is_replaced() {
    let (router, _) = router(ServerConfig::ephemeral());
    let request = axum::http::Request::get("/nowhere")
        .header("x-request-id", "x".repeat(500))
        .body(axum::body::Body::empty())
        .unwrap();
    let response = tower::ServiceExt::oneshot(router, request).await.unwrap();
    let id = response.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36, "a fresh UUID, not the oversized value");
}

#[tokio::test]
async fn a_forwarded_request_id_is_kept_in_place() {
    let (router, _) = router(ServerConfig::ephemeral());
    let mut request = axum::http::Request::get("/request-id")
        .header("x-request-id", "from-the-gateway")
        .body(axum::body::Body::empty())
        .unwrap();
    // Full, as hyper leaves a map sized to the lines it parsed: an insert would regrow it.
    let lines = request.headers().capacity() - request.headers().len();
    for n in 0..lines {
        request.headers_mut().insert(
            axum::http::HeaderName::try_from(format!("x-filler-{n}")).unwrap(),
            axum::http::HeaderValue::from_static("1"),
        );
    }
    let capacity = request.headers().capacity();
    assert_eq!(request.headers().len(), capacity);

    let response = tower::ServiceExt::oneshot(router, request).await.unwrap();
    assert_eq!(response.headers()["x-request-id"], "from-the-gateway");
    let body = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        seen,
        json!({"id": "from-the-gateway", "capacity": capacity})
    );
}

#[tokio::test]
async fn readiness_reports_each_check_and_health_stays_up() {
    let metrics = Metrics::new("test");
    let app = ServiceParts::new("test", ServerConfig::ephemeral(), metrics)
        .readiness_check("always", || async { Ok(()) })
        .readiness_check("flaky", || async { Err("connection refused".to_owned()) })
        .readiness_check("stuck", || async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        })
        .bind(routes())
        .await
        .unwrap();
    let running = RunningApp::start(app);
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    let ready = http
        .get(format!("{}/ready", running.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a stuck check is bounded"
    );
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["always"]["status"], "ok");
    assert_eq!(body["checks"]["flaky"]["error"], "connection refused");
    assert_eq!(body["checks"]["stuck"]["status"], "failing");
    assert_eq!(body["error"]["code"], "not_ready");
    let health = http
        .get(format!("{}/health", running.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn while_draining_responses_close_their_keep_alive_connection() {
    let mut config = ServerConfig::ephemeral();
    config.shutdown_delay = Duration::from_millis(800);
    let app = ServiceParts::new("test", config, Metrics::new("test"))
        .bind(routes())
        .await
        .unwrap();
    let running = RunningApp::start(app);
    let http = reqwest::Client::new();
    let before = http
        .get(format!("{}/health", running.url))
        .send()
        .await
        .unwrap();
    assert!(before.headers().get("connection").is_none());
    running.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let draining = http
        .get(format!("{}/health", running.url))
        .send()
        .await
        .unwrap();
    assert_eq!(draining.status(), 200, "still serving during the delay");
    assert_eq!(draining.headers()["connection"], "close");
    running.stop().await.unwrap();
}
