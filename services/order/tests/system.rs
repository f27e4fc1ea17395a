//! The three services running for real on port 0, talking HTTP: persistence across a
//! restart, readiness following dependencies, and the metrics every binary exports.

mod common;

use std::collections::{BTreeSet, HashSet};

use common::Peers;
use serde_json::{Value, json};
use shop_platform::testing::{Backend, RunningApp, TestDatabase, parse_exposition};

async fn start_order(peers: &Peers, dir: &TestDatabase) -> RunningApp {
    RunningApp::start(shop_order::build(peers.order_config(dir)).await.unwrap())
}

async fn orders_survive_a_restart_on_the_same_data_dir(backend: Backend) {
    let peers = Peers::start(backend).await;
    let dir = peers.order_db().await;
    let order = start_order(&peers, &dir).await;
    let created: Value = peers
        .http
        .post(format!("{}/orders", order.url))
        .json(&json!({"id": "keep-me", "user_id": "1", "products": ["1", "2"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    order.stop().await.unwrap();

    let order = start_order(&peers, &dir).await;
    let fetched: Value = peers
        .http
        .get(format!("{}/orders/keep-me", order.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched, created);
    order.stop().await.unwrap();
}

async fn readiness_names_each_failing_dependency(backend: Backend) {
    let peers = Peers::start(backend).await;
    let dir = peers.order_db().await;
    let order = start_order(&peers, &dir).await;
    let ready = peers
        .http
        .get(format!("{}/ready", order.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    let Peers {
        product,
        user,
        http,
        ..
    } = peers;
    user.stop().await.unwrap();
    let ready = http
        .get(format!("{}/ready", order.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["user"]["status"], "failing", "{body}");
    assert_eq!(body["checks"]["product"]["status"], "ok", "{body}");
    assert_eq!(body["checks"]["database"]["status"], "ok", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("user"),
        "{body}"
    );
    // Liveness does not follow dependencies.
    assert_eq!(
        http.get(format!("{}/health", order.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    order.stop().await.unwrap();
    product.stop().await.unwrap();
}

async fn metrics_use_route_templates_and_the_shared_names(backend: Backend) {
    let peers = Peers::start(backend).await;
    let dir = peers.order_db().await;
    let order = start_order(&peers, &dir).await;
    let http = &peers.http;
    let placed = http
        .post(format!("{}/orders", order.url))
        .json(&json!({"id": "m1", "user_id": "1", "products": ["1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 201);
    let refused = http
        .post(format!("{}/orders", order.url))
        .json(&json!({"user_id": "1", "products": ["1"], "total": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    for path in [
        "/orders/m1",
        "/orders/nope",
        "/random/a1",
        "/random/b2",
        "/x/../y",
    ] {
        http.get(format!("{}{path}", order.url))
            .send()
            .await
            .unwrap();
    }

    let text = http
        .get(format!("{}/metrics", order.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metrics = parse_exposition(&text).unwrap();
    let families: HashSet<&str> = metrics.types.keys().map(String::as_str).collect();
    for family in [
        "http_server_requests_total",
        "http_server_request_duration_seconds",
        "http_server_requests_in_flight",
        "http_client_requests_total",
        "http_client_request_duration_seconds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "build_info",
        "orders_created_total",
        "orders_failed_total",
    ] {
        assert!(families.contains(family), "{family} missing");
    }
    let routes = metrics.label_values("http_server_requests_total", "route");
    let expected: BTreeSet<String> = ["/orders", "/orders/{id}", "unmatched"]
        .map(String::from)
        .into();
    assert_eq!(routes, expected, "raw paths must never become label values");
    assert_eq!(
        metrics.label_values("http_server_requests_total", "service"),
        BTreeSet::from(["order".to_owned()])
    );
    assert_eq!(
        metrics.label_values("http_server_request_duration_seconds_count", "status_class"),
        ["2xx", "4xx"].map(String::from).into()
    );
    assert_eq!(
        metrics.label_values("http_client_requests_total", "peer"),
        ["product", "user"].map(String::from).into()
    );
    assert_eq!(
        metrics.types["http_server_request_duration_seconds"],
        "histogram"
    );
    let created = metrics.samples_of("orders_created_total").next().unwrap();
    assert_eq!(created.value, 1.0);
    let failed = metrics
        .samples_of("orders_failed_total")
        .find(|s| s.labels.get("reason").map(String::as_str) == Some("validation_failed"))
        .expect("refusal counted by reason");
    assert_eq!(failed.value, 1.0);
    let build = metrics.samples_of("build_info").next().unwrap();
    assert_eq!(build.labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(!build.labels["revision"].is_empty());
    let in_flight = metrics
        .samples_of("http_server_requests_in_flight")
        .next()
        .unwrap();
    assert_eq!(in_flight.value, 1.0, "only the scrape itself is in flight");
    order.stop().await.unwrap();
}

/// Replicas of each service starting at the same moment against an empty database:
/// one applies the migrations while the other waits for the lock, and both serve.
async fn two_replicas_start_together_on_an_empty_database(backend: Backend) {
    let peers = Peers::start(backend).await;
    let (product_db, user_db, order_db) = (
        TestDatabase::new(backend).await,
        TestDatabase::new(backend).await,
        TestDatabase::new(backend).await,
    );
    let product = || {
        shop_product::build(shop_product::Config {
            server: shop_platform::ServerConfig::ephemeral(),
            storage: product_db.storage(),
            seed_products: true,
            catalogue_resync: std::time::Duration::from_secs(1),
            auth: shop_platform::AuthConfig::demo(),
            events: Default::default(),
        })
    };
    let user = || shop_user::build(common::user_config(&user_db));
    let order = || shop_order::build(peers.order_config(&order_db));
    let (p1, p2, u1, u2, o1, o2) =
        tokio::join!(product(), product(), user(), user(), order(), order());
    let replicas: Vec<RunningApp> = [p1, p2, u1, u2, o1, o2]
        .into_iter()
        .map(|built| RunningApp::start(built.expect("every replica starts")))
        .collect();
    for replica in &replicas {
        let ready = peers
            .http
            .get(format!("{}/ready", replica.url))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 200, "{}", replica.url);
    }
    for replica in &replicas[..2] {
        let products: Value = peers
            .http
            .get(format!("{}/products", replica.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            products.as_array().unwrap().len(),
            2,
            "seeded once: {products}"
        );
    }
    for replica in replicas {
        replica.stop().await.unwrap();
    }
}

shop_platform::backend_tests!(
    two_replicas_start_together_on_an_empty_database,
    orders_survive_a_restart_on_the_same_data_dir,
    readiness_names_each_failing_dependency,
    metrics_use_route_templates_and_the_shared_names,
);
