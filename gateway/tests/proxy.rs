//! The gateway against stub upstreams: routing, headers, failure handling, resilience.

mod common;

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{any, get, post};
use common::{Hits, RunningGateway, client, closed_port_url, stub};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Echoes the method, path, query and headers it received.
async fn echo_upstream() -> String {
    stub(Router::new().fallback(any(|request: Request| async move {
        let headers: serde_json::Map<String, Value> = request
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value::String(v.to_str().unwrap_or("").to_owned()),
                )
            })
            .collect();
        axum::Json(json!({
            "method": request.method().as_str(),
            "uri": request.uri().to_string(),
            "headers": headers,
        }))
    })))
    .await
}

#[tokio::test]
async fn routes_rewrite_paths_and_keep_queries() {
    let upstream = echo_upstream().await;
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream), ("USER_URL", &upstream)]);
    let http = client();
    for (path, expected) in [
        ("/api/products", "/products"),
        ("/api/product?id=2", "/product?id=2"),
        ("/api/v1/products", "/products"),
        ("/api/v1/products/7?x=1&y=2", "/products/7?x=1&y=2"),
        ("/api/users?id=1", "/users?id=1"),
        ("/api/v1/users/1", "/users/1"),
    ] {
        let body: Value = http
            .get(format!("{}{path}", gw.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["uri"], expected, "{path}");
    }
    // Sent raw: HTTP client libraries normalise dot segments before sending.
    for (path, status) in [
        ("/api/v1/reservations", 404),
        ("/api/products/1", 404),
        ("/api/v1/productsX", 404),
        ("/nothing", 404),
        ("/api/v1/products/../orders", 400),
        ("/api/v1/products/../../api/v1/users/1", 400),
        ("/api/v1/products/%2e%2e/orders", 400),
        ("/api/v1/products%2F..%2Forders", 400),
        ("/api/v1/products/%252e%252e", 400),
        ("/api/v1/products//1", 400),
    ] {
        let (code, body) = raw_get(gw.addr, path).await;
        assert_eq!(code, status, "{path}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert!(body["error"]["code"].is_string(), "{path}: {body}");
    }
    gw.stop().await;
}

async fn raw_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    let code = response[9..12].parse().unwrap();
    (
        code,
        response
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test]
async fn forwards_the_right_headers_and_strips_hop_by_hop_ones() {
    let upstream = echo_upstream().await;
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream)]);
    let response = client()
        .get(format!("{}/api/v1/products/1", gw.url))
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must not pass")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-request-id", "req-42")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("x-custom", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-42");
    let body: Value = response.json().await.unwrap();
    let seen = &body["headers"];
    for hop in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(seen.get(hop).is_none(), "{hop} leaked: {seen}");
    }
    assert_eq!(seen["x-custom"], "kept");
    assert_eq!(seen["x-request-id"], "req-42");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], gw.addr.to_string());
    assert_eq!(seen["host"], upstream.trim_start_matches("http://"));
    let traceparent = seen["traceparent"].as_str().unwrap();
    assert!(
        traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{traceparent}"
    );
    assert!(
        !traceparent.contains("00f067aa0ba902b7"),
        "the gateway hop is a new span"
    );

    // Without ids, the gateway makes them.
    let body: Value = client()
        .get(format!("{}/api/v1/products/1", gw.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["headers"]["x-request-id"].as_str().unwrap().len(), 36);
    assert!(
        body["headers"]["traceparent"]
            .as_str()
            .unwrap()
            .starts_with("00-")
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_upstream_that_is_down_is_a_quick_503_and_opens_the_circuit() {
    let gw = RunningGateway::start(&[
        ("PRODUCT_URL", &closed_port_url()),
        ("BREAKER_FAILURES", "3"),
        ("BREAKER_COOLDOWN", "1s"),
        ("EJECT_BACKOFF", "10ms"),
    ]);
    let http = client();
    for _ in 0..3 {
        let started = Instant::now();
        let response = http
            .post(format!("{}/api/v1/products", gw.url))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(started.elapsed() < Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let response = http
        .get(format!("{}/api/v1/products", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "circuit_open");
    assert_eq!(
        gw.metric("gateway_circuit_state", &[("upstream", "product")])
            .await,
        1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_circuit_half_opens_after_the_cooldown_and_closes_on_success() {
    let hits = Hits::default();
    let h = hits.clone();
    // Fails (503) for the first three requests, then recovers.
    let upstream = stub(Router::new().route(
        "/products",
        post(move || {
            let n = h.bump();
            async move {
                if n <= 3 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::CREATED
                }
            }
        }),
    ))
    .await;
    let gw = RunningGateway::start(&[
        ("PRODUCT_URL", &upstream),
        ("BREAKER_FAILURES", "3"),
        ("BREAKER_COOLDOWN", "300ms"),
    ]);
    let http = client();
    let post = || {
        http.post(format!("{}/api/v1/products", gw.url))
            .body("{}")
            .send()
    };
    for _ in 0..3 {
        assert_eq!(
            post().await.unwrap().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    let rejected = post().await.unwrap();
    assert_eq!(rejected.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        rejected.json::<Value>().await.unwrap()["error"]["code"],
        "circuit_open"
    );
    assert_eq!(hits.get(), 3, "an open circuit sends nothing upstream");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        post().await.unwrap().status(),
        StatusCode::CREATED,
        "the half-open trial"
    );
    assert_eq!(
        gw.metric("gateway_circuit_state", &[("upstream", "product")])
            .await,
        0.0
    );
    assert_eq!(post().await.unwrap().status(), StatusCode::CREATED);
    gw.stop().await;
}

#[tokio::test]
async fn gets_are_retried_on_another_endpoint_and_the_dead_one_is_ejected() {
    let hits = Hits::default();
    let h = hits.clone();
    let alive = stub(Router::new().route(
        "/products",
        get(move || {
            h.bump();
            async { "ok" }
        }),
    ))
    .await;
    let dead = closed_port_url();
    let gw = RunningGateway::start(&[
        ("PRODUCT_URL", &format!("{dead},{alive}")),
        ("EJECT_BACKOFF", "30s"),
    ]);
    let http = client();
    for _ in 0..40 {
        let response = http
            .get(format!("{}/api/v1/products", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(hits.get(), 40);
    let refused = gw
        .metric(
            "gateway_upstream_requests_total",
            &[("upstream", "product"), ("status", "connect_error")],
        )
        .await;
    assert_eq!(
        refused, 1.0,
        "after one refusal the dead endpoint gets nothing"
    );
    assert_eq!(
        gw.metric(
            "gateway_upstream_endpoints",
            &[("upstream", "product"), ("state", "ejected")]
        )
        .await,
        1.0
    );
    gw.stop().await;
}

/// The order service deduplicates retried orders by `Idempotency-Key`; the gateway
/// must hand it on untouched, body and all.
#[tokio::test]
async fn idempotency_key_reaches_the_order_service() {
    let upstream = echo_upstream().await;
    let gw = RunningGateway::start(&[("ORDER_URL", &upstream)]);
    let response = client()
        .post(format!("{}/api/v1/orders", gw.url))
        .header("idempotency-key", "3f1c9a52-order-retry-1")
        .json(&json!({"user_id": "1", "products": ["1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["method"], "POST");
    assert_eq!(body["uri"], "/orders");
    assert_eq!(body["headers"]["idempotency-key"], "3f1c9a52-order-retry-1");
    gw.stop().await;
}

#[tokio::test]
async fn a_post_is_never_sent_twice_but_a_get_is_retried_on_503() {
    let posts = Hits::default();
    let gets = Hits::default();
    let (p, g) = (posts.clone(), gets.clone());
    let upstream = stub(
        Router::new().route(
            "/orders",
            post(move || {
                p.bump();
                async { StatusCode::SERVICE_UNAVAILABLE }
            })
            .get(move || {
                let n = g.bump();
                async move {
                    if n == 1 {
                        (StatusCode::SERVICE_UNAVAILABLE, "busy")
                    } else {
                        (StatusCode::OK, "fine")
                    }
                }
            }),
        ),
    )
    .await;
    // Two endpoints, both the same stub, so a retry has somewhere to go.
    let gw = RunningGateway::start(&[(
        "ORDER_URL",
        &format!("{upstream},{}", upstream.replace("127.0.0.1", "localhost")),
    )]);
    let http = client();
    let response = http
        .post(format!("{}/api/v1/orders", gw.url))
        .json(&json!({"user_id": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(posts.get(), 1, "a POST is never repeated");
    let response = http
        .get(format!("{}/api/v1/orders", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "fine");
    assert_eq!(gets.get(), 2, "the GET was retried once");
    gw.stop().await;
}

/// With one endpoint a retry has nowhere to go: the upstream's own 503 (body and
/// `Retry-After`) reaches the client, after exactly one attempt.
#[tokio::test]
async fn a_single_endpoint_503_is_passed_back_untouched() {
    let gets = Hits::default();
    let g = gets.clone();
    let upstream = stub(Router::new().route(
        "/orders",
        get(move || {
            g.bump();
            async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("retry-after", "7")],
                    r#"{"error":{"code":"draining","message":"busy"}}"#,
                )
            }
        }),
    ))
    .await;
    let gw = RunningGateway::start(&[("ORDER_URL", &upstream)]);
    let response = client()
        .get(format!("{}/api/v1/orders", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "7");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "draining");
    assert_eq!(gets.get(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn load_is_spread_across_endpoints() {
    let (a, b) = (Hits::default(), Hits::default());
    let (ha, hb) = (a.clone(), b.clone());
    let up_a = stub(Router::new().route(
        "/products",
        get(move || {
            ha.bump();
            async { "a" }
        }),
    ))
    .await;
    let up_b = stub(Router::new().route(
        "/products",
        get(move || {
            hb.bump();
            async { "b" }
        }),
    ))
    .await;
    let gw = RunningGateway::start(&[("PRODUCT_URL", &format!("{up_a},{up_b}"))]);
    let http = client();
    for _ in 0..200 {
        http.get(format!("{}/api/v1/products", gw.url))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(a.get() + b.get(), 200);
    assert!(a.get() > 40 && b.get() > 40, "a={} b={}", a.get(), b.get());
    gw.stop().await;
}

#[tokio::test]
async fn a_slow_upstream_is_a_504_after_the_timeout() {
    let upstream = stub(Router::new().route(
        "/products",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "late"
        }),
    ))
    .await;
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream), ("REQUEST_TIMEOUT", "300ms")]);
    let started = Instant::now();
    let response = client()
        .get(format!("{}/api/v1/products", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "upstream_timeout"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_reset_mid_response_reaches_the_client_as_a_broken_stream_and_is_counted() {
    // Promises 100000 bytes, sends 10, then closes the connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\ncontent-type: text/plain\r\n\r\n0123456789")
                .await;
            drop(socket);
        }
    });
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream)]);
    let response = client()
        .get(format!("{}/api/v1/products", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "headers were already sent"
    );
    assert!(
        response.bytes().await.is_err(),
        "the client must see a broken body, not a short one"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        gw.metric(
            "gateway_upstream_stream_errors_total",
            &[("upstream", "product")]
        )
        .await,
        1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn oversize_bodies_are_413_whether_declared_or_streamed() {
    let hits = Hits::default();
    let h = hits.clone();
    let upstream = stub(Router::new().route(
        "/products",
        post(move |body: axum::body::Bytes| {
            h.bump();
            async move { body.len().to_string() }
        }),
    ))
    .await;
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream), ("BODY_LIMIT", "1KiB")]);
    let http = client();
    let small = http
        .post(format!("{}/api/v1/products", gw.url))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(small.text().await.unwrap(), "1000");
    let declared = http
        .post(format!("{}/api/v1/products", gw.url))
        .body(vec![b'x'; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(declared.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        hits.get(),
        1,
        "a declared oversize body never goes upstream"
    );
    let chunks = futures_stream(vec![vec![b'x'; 800], vec![b'y'; 800]]);
    let streamed = http
        .post(format!("{}/api/v1/products", gw.url))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        streamed.json::<Value>().await.unwrap()["error"]["code"],
        "payload_too_large"
    );
    gw.stop().await;
}

fn futures_stream(
    chunks: Vec<Vec<u8>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::iter(chunks.into_iter().map(Ok))
}

#[tokio::test]
async fn clients_over_the_rate_limit_get_429_with_retry_after() {
    let upstream = echo_upstream().await;
    let gw = RunningGateway::start(&[
        ("PRODUCT_URL", &upstream),
        ("RATE_LIMIT", "1"),
        ("RATE_LIMIT_BURST", "5"),
    ]);
    let http = client();
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let response = http
            .get(format!("{}/api/v1/products", gw.url))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(response.headers().contains_key("retry-after"));
        }
    }
    assert_eq!(&statuses[..5], &[200; 5]);
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    assert_eq!(gw.metric("gateway_rate_limited_total", &[]).await, 3.0);
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let gw = RunningGateway::start(&[("HEADER_READ_TIMEOUT", "300ms")]);
    let mut socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    socket
        .write_all(b"GET /api/v1/products HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), socket.read_to_end(&mut buf))
        .await
        .expect("connection closed by the gateway");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    gw.stop().await;
}

#[tokio::test]
async fn admin_endpoints_and_metrics() {
    let upstream = echo_upstream().await;
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream)]);
    let http = client();
    http.get(format!("{}/api/v1/products/3", gw.url))
        .send()
        .await
        .unwrap();
    http.get(format!("{}/random/path", gw.url))
        .send()
        .await
        .unwrap();
    // An invented method must not become a label value of its own.
    http.request(
        reqwest::Method::from_bytes(b"PURGE").unwrap(),
        format!("{}/api/v1/products/3", gw.url),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(
        http.get(format!("{}/health", gw.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let ready: Value = http
        .get(format!("{}/ready", gw.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["upstreams"]["product"]["healthy"], 1);
    assert_eq!(
        http.post(format!("{}/health", gw.url))
            .send()
            .await
            .unwrap()
            .status(),
        405
    );

    let text = http
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metrics = shop_platform::testing::parse_exposition(&text).unwrap();
    for family in [
        "http_server_requests_total",
        "http_server_request_duration_seconds",
        "http_server_requests_in_flight",
        "gateway_upstream_requests_total",
        "gateway_upstream_request_duration_seconds",
        "gateway_upstream_endpoints",
        "gateway_circuit_state",
        "gateway_rate_limited_total",
        "build_info",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.types.contains_key(family), "{family} missing");
    }
    let methods = metrics.label_values("http_server_requests_total", "method");
    assert!(
        methods.contains("_OTHER") && !methods.contains("PURGE"),
        "{methods:?}"
    );
    let routes = metrics.label_values("http_server_requests_total", "route");
    assert!(
        routes.contains("/api/v1/products/*") && routes.contains("unmatched"),
        "{routes:?}"
    );
    assert!(
        !routes
            .iter()
            .any(|r| r.contains("random") || r.contains("/3")),
        "{routes:?}"
    );
    assert_eq!(
        gw.metric(
            "gateway_upstream_requests_total",
            &[("upstream", "product"), ("status", "200")]
        )
        .await,
        2.0,
        "the GET and the PURGE reached the product upstream"
    );
    gw.stop().await;
}

#[tokio::test]
async fn request_and_response_headers_from_upstream_are_passed_back() {
    let upstream = stub(Router::new().route(
        "/products",
        get(|headers: HeaderMap| async move {
            let mut out = HeaderMap::new();
            out.insert("x-upstream", "yes".parse().unwrap());
            out.insert("connection", "close".parse().unwrap());
            out.insert("etag", "\"v1\"".parse().unwrap());
            (
                out,
                headers
                    .get("accept")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default(),
            )
        }),
    ))
    .await;
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream)]);
    let response = client()
        .get(format!("{}/api/v1/products", gw.url))
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-upstream"], "yes");
    assert_eq!(response.headers()["etag"], "\"v1\"");
    assert!(
        response
            .headers()
            .get("connection")
            .is_none_or(|v| v != "close"),
        "hop-by-hop header leaked back"
    );
    assert_eq!(response.text().await.unwrap(), "text/csv");
    gw.stop().await;
}

#[tokio::test]
async fn cacheable_gets_are_served_from_memory_with_etag_revalidation() {
    let hits = Hits::default();
    let h = hits.clone();
    let upstream = stub(
        Router::new()
            .route(
                "/products/1",
                get(move || {
                    h.bump();
                    async { ([("cache-control", "public, max-age=60")], "laptop") }
                }),
            )
            .route(
                "/products/2",
                get(|| async { ([("cache-control", "private, max-age=60")], "mine") }),
            ),
    )
    .await;
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream), ("CACHE_SIZE", "1MiB")]);
    let http = client();
    let url = format!("{}/api/v1/products/1", gw.url);
    let first = http.get(&url).send().await.unwrap();
    assert_eq!(first.headers()["x-cache"], "miss");
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(first.text().await.unwrap(), "laptop");
    let second = http.get(&url).send().await.unwrap();
    assert_eq!(second.headers()["x-cache"], "hit");
    assert_eq!(second.headers()["etag"], etag.as_str());
    assert_eq!(second.text().await.unwrap(), "laptop");
    assert_eq!(hits.get(), 1, "the second answer came from the cache");

    let revalidated = http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED);
    assert!(revalidated.bytes().await.unwrap().is_empty());
    let authorized = http
        .get(&url)
        .header("authorization", "Bearer x")
        .send()
        .await
        .unwrap();
    assert!(
        authorized.headers().get("x-cache").is_none(),
        "requests with credentials bypass the shared cache"
    );
    assert_eq!(hits.get(), 2);

    for _ in 0..2 {
        let private = http
            .get(format!("{}/api/v1/products/2", gw.url))
            .send()
            .await
            .unwrap();
        assert!(
            private.headers().get("x-cache").is_none(),
            "private responses are never cached"
        );
    }
    assert_eq!(
        gw.metric("gateway_cache_requests_total", &[("result", "hit")])
            .await,
        1.0
    );
    assert_eq!(
        gw.metric("gateway_cache_requests_total", &[("result", "revalidated")])
            .await,
        1.0
    );
    gw.stop().await;
}

#[tokio::test]
async fn upstream_connections_are_reused_and_closed_after_the_idle_timeout() {
    let ports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = ports.clone();
    let upstream = stub(Router::new().route(
        "/products",
        get(
            move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<
                std::net::SocketAddr,
            >| {
                seen.lock().unwrap().push(peer.port());
                async { "ok" }
            },
        ),
    ))
    .await;
    let gw = RunningGateway::start(&[
        ("PRODUCT_URL", &upstream),
        ("GATEWAY_WORKERS", "1"),
        ("UPSTREAM_IDLE_TIMEOUT", "300ms"),
    ]);
    let http = client();
    let get = || http.get(format!("{}/api/v1/products", gw.url)).send();
    get().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    get().await.unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    get().await.unwrap();
    let ports = ports.lock().unwrap().clone();
    assert_eq!(ports[0], ports[1], "kept alive and reused");
    assert_ne!(
        ports[1], ports[2],
        "the idle connection was closed, a new one opened"
    );
    gw.stop().await;
}

/// A stub service whose `/openapi.json` documents `paths` (GET each, operation id given).
async fn documented_upstream(paths: &[(&str, &str)]) -> String {
    let mut doc =
        json!({"openapi": "3.1.0", "info": {"title": "stub", "version": "1"}, "paths": {}});
    for (path, id) in paths {
        doc["paths"][*path] =
            json!({"get": {"operationId": id, "responses": {"200": {"description": "ok"}}}});
    }
    stub(Router::new().route(
        "/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc) }
        }),
    ))
    .await
}

#[tokio::test]
async fn serves_the_merged_api_document_and_a_self_contained_docs_page() {
    let product = documented_upstream(&[("/products/{id}", "get_product")]).await;
    let order = documented_upstream(&[("/orders", "list_orders")]).await;
    let user = documented_upstream(&[("/.well-known/jwks.json", "jwks")]).await;
    let gw = RunningGateway::start(&[
        ("PRODUCT_URL", &product),
        ("ORDER_URL", &order),
        ("USER_URL", &user),
    ]);
    let http = client();
    let response = http
        .get(format!("{}/api/openapi.json", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(
        paths["/api/v1/products/{id}"]["get"]["operationId"],
        "get_product"
    );
    assert_eq!(
        paths["/api/orders"]["get"]["operationId"],
        "list_orders_seed"
    );
    assert_eq!(paths["/api/v1/orders"]["get"]["x-required-role"], "user");
    assert!(
        paths["/.well-known/jwks.json"]["get"]
            .get("security")
            .is_none()
    );
    for own in ["/api/openapi.json", "/api/docs", "/health"] {
        assert!(paths.contains_key(own), "{own}");
    }

    let page = http
        .get(format!("{}/api/docs", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    let html = page.text().await.unwrap();
    for asset in ["/api/docs/docs.js", "/api/docs/docs.css"] {
        assert!(html.contains(asset), "{asset}");
        let r = http.get(format!("{}{asset}", gw.url)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{asset}");
    }
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no CDN"
    );

    let r = http
        .post(format!("{}/api/openapi.json", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    gw.stop().await;

    // A service that cannot send its document: a JSON 503, not a partial document.
    let gw = RunningGateway::start(&[
        ("PRODUCT_URL", &closed_port_url()),
        ("ORDER_URL", &order),
        ("USER_URL", &user),
    ]);
    let r = http
        .get(format!("{}/api/openapi.json", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "docs_unavailable");
    gw.stop().await;
}

#[tokio::test]
async fn refuses_get_bodies_and_more_headers_than_upstreams_parse_as_json() {
    let upstream = echo_upstream().await;
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream)]);
    let http = client();
    let r = http
        .get(format!("{}/api/v1/products", gw.url))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "body_not_allowed");

    let mut headers = HeaderMap::new();
    for i in 0..=shop_gateway::proxy::MAX_HEADERS {
        headers.insert(
            axum::http::HeaderName::try_from(format!("x-h{i}")).unwrap(),
            "1".parse().unwrap(),
        );
    }
    let r = http
        .get(format!("{}/api/v1/products", gw.url))
        .headers(headers)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_headers");

    // A few headers fewer pass through.
    let r = http
        .get(format!("{}/api/v1/products", gw.url))
        .header("x-one", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    gw.stop().await;
}

/// Reads one request (head and a `Content-Length` body) from a raw upstream connection;
/// `None` when the gateway closed it.
async fn read_request(socket: &mut tokio::net::TcpStream, pending: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            while pending.len() < end + 4 + length {
                let mut buf = [0u8; 4096];
                let n = socket.read(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                pending.extend_from_slice(&buf[..n]);
            }
            pending.drain(..end + 4 + length);
            return Some(head);
        }
        let mut buf = [0u8; 4096];
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

/// The keep-alive race: the upstream closes a connection just as the gateway reuses it
/// (the request is written, the answer is EOF). A GET goes again on a fresh connection;
/// a POST may have been acted on, so it is never sent twice.
#[tokio::test]
async fn a_reused_connection_closed_by_the_upstream_is_retried_for_a_get_never_for_a_post() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                // Answers the first request of each connection, takes the second and
                // closes without a word.
                let first = read_request(&mut socket, &mut pending).await.unwrap();
                log.lock()
                    .unwrap()
                    .push(first.lines().next().unwrap().to_owned());
                socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
                if let Some(second) = read_request(&mut socket, &mut pending).await {
                    log.lock()
                        .unwrap()
                        .push(second.lines().next().unwrap().to_owned());
                }
            });
        }
    });
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream), ("GATEWAY_WORKERS", "1")]);
    let http = client();
    let url = format!("{}/api/v1/products", gw.url);
    for _ in 0..2 {
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), "ok");
    }
    let post = http.post(&url).body("{}").send().await.unwrap();
    assert_eq!(post.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        post.json::<Value>().await.unwrap()["error"]["code"],
        "bad_gateway"
    );
    let post = http.post(&url).body("{}").send().await.unwrap();
    assert_eq!(post.status(), StatusCode::OK, "a fresh connection answers");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            "get /products http/1.1",
            "get /products http/1.1",
            "get /products http/1.1",
            "post /products http/1.1",
            "post /products http/1.1",
        ],
        "the second GET went twice (the first time unanswered); each POST once"
    );
    gw.stop().await;
}

/// Chunked and close-delimited upstream bodies pass through whole; a chunked one leaves
/// its connection reusable, a close-delimited one cannot.
#[tokio::test]
async fn chunked_and_close_delimited_responses_pass_through() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    let connections = Hits::default();
    let accepted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            accepted.bump();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                while let Some(head) = read_request(&mut socket, &mut pending).await {
                    if head.starts_with("get /products/closing") {
                        let _ = socket
                            .write_all(
                                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end",
                            )
                            .await;
                        return;
                    }
                    socket
                        .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n")
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    socket
                        .write_all(b"6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n")
                        .await
                        .unwrap();
                }
            });
        }
    });
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream), ("GATEWAY_WORKERS", "1")]);
    let http = client();
    for _ in 0..3 {
        let response = http
            .get(format!("{}/api/v1/products", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get("x-trailer").is_none());
        assert_eq!(response.text().await.unwrap(), "hello world");
    }
    assert_eq!(connections.get(), 1, "chunked bodies keep the connection");
    for _ in 0..2 {
        let response = http
            .get(format!("{}/api/v1/products/closing", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.text().await.unwrap(), "until the end");
    }
    assert_eq!(
        connections.get(),
        2,
        "the first close-delimited body used up the kept connection, the second a new one"
    );
    gw.stop().await;
}

/// An upstream that refuses an upload without reading it (and keeps the connection open)
/// is heard: its answer reaches the client instead of the upload stalling to a timeout.
#[tokio::test]
async fn an_upstream_answering_before_the_body_is_read_is_heard() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"n\":\"no\"}\n")
                    .await;
                tokio::time::sleep(Duration::from_secs(10)).await;
            });
        }
    });
    let gw = RunningGateway::start(&[
        ("PRODUCT_URL", &upstream),
        ("BODY_LIMIT", "64MiB"),
        ("UPSTREAM_TIMEOUT", "5s"),
    ]);
    let started = Instant::now();
    let response = client()
        .post(format!("{}/api/v1/products", gw.url))
        .body(vec![b'x'; 16 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(response.text().await.unwrap(), "{\"n\":\"no\"}\n");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    gw.stop().await;
}

/// `Expect: 100-continue` is met at the gateway; the upstream's own interim answer (had it
/// been asked) must not cut a large upload short. HEAD answers carry a length, no body,
/// and leave the connection usable.
#[tokio::test]
async fn large_uploads_with_expect_and_head_requests_pass_through() {
    let upstream = stub(
        Router::new().route(
            "/products",
            post(|body: axum::body::Body| async move {
                // Counted as it streams (axum's `Bytes` extractor stops at 2 MB).
                let mut stream = body.into_data_stream();
                let mut total = 0;
                while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
                    total += chunk.unwrap().len();
                }
                total.to_string()
            })
            .get(|| async { "twelve bytes" }),
        ),
    )
    .await;
    let gw = RunningGateway::start(&[
        ("PRODUCT_URL", &upstream),
        ("GATEWAY_WORKERS", "1"),
        ("BODY_LIMIT", "64MiB"),
    ]);
    let http = client();
    let response = http
        .post(format!("{}/api/v1/products", gw.url))
        .header("expect", "100-continue")
        .body(vec![b'x'; 8 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.text().await.unwrap(),
        (8 * 1024 * 1024).to_string()
    );
    for _ in 0..2 {
        let head = http
            .head(format!("{}/api/v1/products", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(head.headers()["content-length"], "12");
    }
    let get = http
        .get(format!("{}/api/v1/products", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(get.text().await.unwrap(), "twelve bytes");
    gw.stop().await;
}

/// An upstream's interim `100 Continue` in the middle of an upload does not stop it; the
/// final answer comes after the whole body.
#[tokio::test]
async fn an_interim_answer_during_an_upload_does_not_cut_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                let end = loop {
                    let n = socket.read(&mut buf).await.unwrap();
                    pending.extend_from_slice(&buf[..n]);
                    if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        break end + 4;
                    }
                };
                let head = String::from_utf8_lossy(&pending[..end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                socket
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await
                    .unwrap();
                let mut received = pending.len() - end;
                while received < length {
                    let n = socket.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the upload was cut at {received} of {length}");
                    received += n;
                }
                let body = received.to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(answer.as_bytes()).await.unwrap();
            });
        }
    });
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream), ("BODY_LIMIT", "64MiB")]);
    let response = client()
        .post(format!("{}/api/v1/products", gw.url))
        .body(vec![b'x'; 8 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.text().await.unwrap(),
        (8 * 1024 * 1024).to_string()
    );
    gw.stop().await;
}

/// Sends raw bytes to the gateway and reads until it closes the connection.
async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(bytes).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut response))
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// What no HTTP/1.1 parser should accept is refused with a bare 400 and a close, before
/// any handler runs: bytes that are not HTTP, a NUL in a header, and the ambiguous body
/// framings requests are smuggled with.
#[tokio::test]
async fn malformed_and_ambiguous_requests_are_refused_by_the_parser() {
    let upstream = echo_upstream().await;
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream)]);
    for bad in [
        &b"NOT HTTP AT ALL\r\n\r\n"[..],
        b"GET /api/v1/products HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
        b"POST /api/v1/products HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /api/v1/products HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST /api/v1/products HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST /api/v1/products HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        // A listed Content-Length, even of one value repeated.
        b"POST /api/v1/products HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
        // chunked not last, and a coding the gateway does not know.
        b"POST /api/v1/products HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        b"POST /api/v1/products HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
        // chunked on HTTP/1.0, which has no chunked coding.
        b"POST /api/v1/products HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        // obs-fold: a header line continued on the next.
        b"GET /api/v1/products HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
        // Whitespace between a field name and its colon.
        b"POST /api/v1/products HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello",
        b"GET /api/v1/products HTTP/1.1\r\nHost : x\r\n\r\n",
    ] {
        let response = raw_exchange(gw.addr, bad).await;
        assert!(
            response.starts_with("HTTP/1.1 400 "),
            "{:?}: {response:?}",
            String::from_utf8_lossy(bad)
        );
        assert!(response.contains("connection: close"), "{response:?}");
    }
    let many: String = (0..120).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let response = raw_exchange(
        gw.addr,
        format!("GET /api/v1/products HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 431 "), "{response:?}");
    gw.stop().await;
}

/// Series whose labels are known at start-up are there before the first request, so a
/// dashboard shows 0 rather than "No data".
#[tokio::test]
async fn per_upstream_series_are_exported_at_zero_from_start_up() {
    let gw = RunningGateway::start(&[
        ("PRODUCT_URL", "http://127.0.0.1:1"),
        ("CACHE_SIZE", "1MiB"),
    ]);
    let text = client()
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Label order is the exporter's; match the name, each label and the value.
    let at_zero = |name: &str, labels: &[&str]| {
        text.lines().any(|l| {
            l.starts_with(&format!("{name}{{"))
                && l.ends_with("} 0")
                && labels.iter().all(|label| l.contains(label))
        })
    };
    let product = r#"upstream="product""#;
    for (name, labels) in [
        (
            "gateway_upstream_request_duration_seconds_count",
            vec![product],
        ),
        ("gateway_upstream_stream_errors_total", vec![product]),
        (
            "gateway_cache_requests_total",
            vec![product, r#"result="hit""#],
        ),
        (
            "gateway_cache_requests_total",
            vec![product, r#"result="revalidated""#],
        ),
        (
            "gateway_cache_requests_total",
            vec![product, r#"result="stored""#],
        ),
    ] {
        assert!(
            at_zero(name, &labels),
            "{name} {labels:?} not at 0 in\n{text}"
        );
    }
    gw.stop().await;
}

/// RFC 9112 section 3.2: an HTTP/1.1 request has exactly one valid `Host`; an
/// absolute-form target's authority replaces it. Refusals are JSON and close.
#[tokio::test]
async fn host_rules_follow_rfc_9112() {
    let upstream = echo_upstream().await;
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream)]);
    for (bad, why) in [
        (&b"GET /api/v1/products HTTP/1.1\r\n\r\n"[..], "none"),
        (
            b"GET /api/v1/products HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
            "two",
        ),
        (
            b"GET /api/v1/products HTTP/1.1\r\nHost: a.example\r\nhost: a.example\r\n\r\n",
            "two, even equal",
        ),
        (
            b"GET /api/v1/products HTTP/1.1\r\nHost: user@a.example\r\n\r\n",
            "userinfo",
        ),
        (
            b"GET /api/v1/products HTTP/1.1\r\nHost: a.example/x\r\n\r\n",
            "a path",
        ),
        (
            b"GET /api/v1/products HTTP/1.1\r\nHost: a.example:8o\r\n\r\n",
            "a bad port",
        ),
        (
            b"GET /api/v1/products HTTP/1.1\r\nHost: a example\r\n\r\n",
            "a space",
        ),
        (
            b"GET /api/v1/products HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
            "two on 1.0",
        ),
        (
            b"GET http://user@a.example/api/v1/products HTTP/1.1\r\nHost: a.example\r\n\r\n",
            "userinfo in the target",
        ),
    ] {
        let response = raw_exchange(gw.addr, bad).await;
        assert!(response.starts_with("HTTP/1.1 400 "), "{why}: {response:?}");
        assert!(
            response.contains("connection: close"),
            "{why}: {response:?}"
        );
        assert!(
            response.contains("content-type: application/json"),
            "{why}: {response:?}"
        );
        let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "invalid_host", "{why}: {response:?}");
    }

    let forwarded_host = |response: &str| -> Value {
        assert!(response.starts_with("HTTP/1.1 200 "), "{response:?}");
        let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        body["headers"]["x-forwarded-host"].clone()
    };
    // HTTP/1.0 may leave Host out.
    let response = raw_exchange(gw.addr, b"GET /api/v1/products HTTP/1.0\r\n\r\n").await;
    assert_eq!(forwarded_host(&response), Value::Null);
    // The target's authority wins over a received Host.
    let response = raw_exchange(
        gw.addr,
        b"GET http://shop.example:8080/api/v1/products?x=1 HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(forwarded_host(&response), "shop.example:8080");
    assert!(
        response.contains(r#""uri":"/products?x=1""#),
        "{response:?}"
    );
    // IP literals are hosts too.
    let response = raw_exchange(
        gw.addr,
        b"GET /api/v1/products HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(forwarded_host(&response), "[::1]:8080");
    gw.stop().await;
}

/// Keep-alive with pipelined requests answered in order, `Connection: close` and HTTP/1.0
/// honoured, and `Expect: 100-continue` answered before the body is read.
#[tokio::test]
async fn pipelining_connection_close_http_1_0_and_expect_continue() {
    let upstream = stub(
        Router::new().route(
            "/products",
            post(|body: axum::body::Bytes| async move { format!("got {}", body.len()) })
                .get(|| async { "list" }),
        ),
    )
    .await;
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream)]);
    let response = raw_exchange(
        gw.addr,
        b"GET /api/v1/products HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /api/v1/products HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
          POST /api/v1/products HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n\
          GET /api/v1/products HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let statuses: Vec<&str> = response
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &response[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "200", "200"], "{response}");
    let at = |b: &str| {
        response
            .find(b)
            .unwrap_or_else(|| panic!("{b} in {response}"))
    };
    let bodies = [
        at("list"),
        at("got 3"),
        at("got 2"),
        response.rfind("list").unwrap(),
    ];
    assert!(
        bodies.windows(2).all(|w| w[0] < w[1]),
        "in order: {response}"
    );
    assert!(
        response.ends_with("list"),
        "closed after the last: {response}"
    );

    let old = raw_exchange(gw.addr, b"GET /api/v1/products HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert!(
        old.starts_with("HTTP/1.1 200 ") && old.ends_with("list"),
        "{old}"
    );

    let mut socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    socket
        .write_all(b"POST /api/v1/products HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut interim = [0u8; 25];
    socket.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    socket.write_all(b"wxyz").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = socket.read(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(
        text.starts_with("HTTP/1.1 200 ") && text.ends_with("got 4"),
        "{text}"
    );
    gw.stop().await;
}

/// A draining gateway closes idle keep-alive connections at once (it does not wait out
/// the shutdown timeout for them) and answers a request already under way, with
/// `Connection: close`.
#[tokio::test]
async fn draining_closes_idle_connections_and_finishes_busy_ones() {
    let upstream = stub(Router::new().route(
        "/products",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            "slow"
        }),
    ))
    .await;
    let gw = RunningGateway::start(&[
        ("PRODUCT_URL", &upstream),
        ("GATEWAY_WORKERS", "1"),
        ("SHUTDOWN_TIMEOUT", "10s"),
    ]);
    let mut idle = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 "));
    let mut busy = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    busy.write_all(b"GET /api/v1/products HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    gw.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        idle.read(&mut buf).await.unwrap(),
        0,
        "the idle connection was closed"
    );
    let mut answer = Vec::new();
    busy.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(
        answer.contains("connection: close") && answer.ends_with("slow"),
        "{answer}"
    );
}

/// An HTTP/1.0 client knows no chunked encoding: a body of unknown length reaches it
/// delimited by the close; one asking for keep-alive with a known length gets it.
#[tokio::test]
async fn http_1_0_clients_get_bodies_they_can_read() {
    let upstream = stub(
        Router::new()
            .route(
                "/products/stream",
                get(|| async {
                    axum::body::Body::from_stream(futures_util::stream::iter(
                        ["part one, ", "part two"].map(Ok::<_, std::io::Error>),
                    ))
                }),
            )
            .route("/products", get(|| async { "list" })),
    )
    .await;
    let gw = RunningGateway::start(&[("PRODUCT_URL", &upstream)]);
    let streamed = raw_exchange(
        gw.addr,
        b"GET /api/v1/products/stream HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    assert!(!streamed.contains("transfer-encoding"), "{streamed}");
    assert!(streamed.contains("connection: close"), "{streamed}");
    assert!(
        streamed.ends_with("\r\n\r\npart one, part two"),
        "{streamed}"
    );
    let mut socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    socket
        .write_all(b"GET /api/v1/products HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = socket.read(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(
        text.contains("connection: keep-alive") && text.ends_with("list"),
        "{text}"
    );
    gw.stop().await;
}
