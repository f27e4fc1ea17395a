//! Kubernetes discovery against kube's mock client: a scripted API server (tower_test's
//! mock service) answers the watcher's list and watch requests, and the tests check what
//! the gateway would route to after each step.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use http::{Request, Response, StatusCode};
use http_body_util::StreamBody;
use hyper::body::Frame;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use serde_json::{Value, json};
use shop_gateway::upstream::discovery::{self, SERVICE_LABEL, Status, Target};
use shop_gateway::upstream::{Breaker, RetryBudget, Upstream};
use shop_platform::Shutdown;
use shop_platform::config::Env;
use tokio::sync::mpsc;
use tower_test::mock;

const NAMESPACE: &str = "shop";
const WAIT: Duration = Duration::from_secs(5);

type WatchBody = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;
type Handle = mock::Handle<Request<kube::client::Body>, Response<WatchBody>>;

/// The API server side of the mock: each method expects the client's next request to be of
/// one kind, checks it, and answers it.
struct ApiServer {
    handle: Handle,
    service: String,
}

/// An open watch response: events are sent one at a time, like a real server streams them.
struct Watch(mpsc::UnboundedSender<Bytes>);

impl Watch {
    fn send(&self, kind: &str, object: Value) {
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
        line.push(b'\n');
        self.0.send(line.into()).expect("watch still open");
    }
}

fn body(bytes: Vec<u8>) -> WatchBody {
    StreamBody::new(futures_util::stream::iter([Ok(Frame::data(bytes.into()))]).boxed())
}

impl ApiServer {
    fn client(service: &str) -> (kube::Client, Self) {
        let (mock_service, handle) =
            mock::pair::<Request<kube::client::Body>, Response<WatchBody>>();
        let server = Self {
            handle,
            service: service.to_owned(),
        };
        (kube::Client::new(mock_service, NAMESPACE), server)
    }

    async fn next(&mut self, watch: bool) -> mock::SendResponse<Response<WatchBody>> {
        let (request, send) = tokio::time::timeout(WAIT, self.handle.next_request())
            .await
            .expect("the client sends its next request in time")
            .expect("the client is alive");
        let uri = request.uri();
        assert_eq!(
            uri.path(),
            format!("/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices")
        );
        let query = uri.query().unwrap_or_default();
        let selector = format!(
            "labelSelector={}%3D{}",
            SERVICE_LABEL.replace('/', "%2F"),
            self.service
        );
        assert!(query.contains(&selector), "selects by service label: {uri}");
        assert_eq!(query.contains("watch=true"), watch, "{uri}");
        send
    }

    /// Answers the next request, a list, with these slices at this resource version.
    async fn list(&mut self, slices: &[Value], version: &str) {
        let send = self.next(false).await;
        let list = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSliceList",
            "metadata": {"resourceVersion": version},
            "items": slices,
        });
        send.send_response(Response::new(body(serde_json::to_vec(&list).unwrap())));
    }

    /// Answers the next request, a watch, with a stream left open for events.
    async fn watch(&mut self) -> Watch {
        let send = self.next(true).await;
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
        });
        send.send_response(Response::new(StreamBody::new(frames.boxed())));
        Watch(tx)
    }

    /// Answers the next request with an error status, as an API server that is failing.
    async fn fail(&mut self, watch: bool, status: StatusCode) {
        let send = self.next(watch).await;
        let status_body = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "etcdserver: request timed out", "reason": "InternalError",
            "code": status.as_u16(),
        });
        let mut response = Response::new(body(serde_json::to_vec(&status_body).unwrap()));
        *response.status_mut() = status;
        send.send_response(response);
    }

    /// No request arrives for a while (the client is backing off or watching).
    async fn quiet(&mut self, period: Duration) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(period, self.handle.next_request()).await
        {
            panic!("unexpected request {}", request.uri());
        }
    }
}

/// An endpoint: (address, ready, terminating).
type Ep<'a> = (&'a str, bool, bool);

fn slice(name: &str, version: &str, port: u16, endpoints: &[Ep]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "resourceVersion": version,
            "labels": {SERVICE_LABEL: "product"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|(ip, ready, terminating)| json!({
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": ready | terminating, "terminating": terminating},
        })).collect::<Vec<_>>(),
    })
}

/// One upstream followed by `discovery::follow` with short backoffs, as the gateway runs it.
struct Followed {
    upstream: Arc<Upstream>,
    status: Arc<Status>,
    errors: prometheus::IntCounter,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Followed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn follow(client: kube::Client) -> Followed {
    let errors = prometheus::IntCounter::new("errors", "errors").unwrap();
    let status = Arc::new(Status::new(
        Target {
            service: "product".into(),
            port_name: "http".into(),
        },
        errors.clone(),
    ));
    let upstream = Arc::new(Upstream::new(
        "product".into(),
        Vec::new(),
        Breaker::new(5, Duration::from_secs(5)),
        RetryBudget::new(0.2),
        Duration::from_secs(1),
        prometheus::IntCounter::new("x", "x").unwrap(),
    ));
    let api = Api::<EndpointSlice>::namespaced(client, NAMESPACE);
    let task = tokio::spawn({
        let (upstream, status) = (upstream.clone(), status.clone());
        async move {
            let short = || std::iter::repeat(Duration::from_millis(50));
            discovery::follow(api, &upstream, &status, short).await;
        }
    });
    Followed {
        upstream,
        status,
        errors,
        task,
    }
}

impl Followed {
    fn endpoints(&self) -> Vec<String> {
        self.upstream
            .endpoints()
            .iter()
            .map(|e| e.authority.to_string())
            .collect()
    }

    /// Waits until the endpoint set is `expected` (discovery applies events asynchronously).
    async fn expect(&self, expected: &[&str]) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.endpoints() != expected {
            assert!(
                tokio::time::Instant::now() < deadline,
                "endpoints {:?}, expected {expected:?}",
                self.endpoints()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test]
async fn the_initial_list_merges_slices_and_balances_only_ready_endpoints() {
    let (client, mut api) = ApiServer::client("product");
    let followed = follow(client);
    assert!(!followed.status.is_synced());
    api.list(
        &[
            slice(
                "product-a",
                "10",
                8081,
                &[("10.0.0.1", true, false), ("10.0.0.2", true, false)],
            ),
            // 10.0.0.2 again (slices overlap while the controller rebalances) and one that
            // has not passed its readiness probe yet.
            slice(
                "product-b",
                "11",
                8081,
                &[("10.0.0.2", true, false), ("10.0.0.3", false, false)],
            ),
        ],
        "12",
    )
    .await;
    let _watch = api.watch().await;
    followed.expect(&["10.0.0.1:8081", "10.0.0.2:8081"]).await;
    assert!(followed.status.is_synced() && followed.status.is_watching());
    assert_eq!(followed.status.counts(), (2, 1, 0));
    let report = followed.status.report();
    assert_eq!(report["watch"], "ok");
    assert_eq!(report["service"], "product");
}

#[tokio::test]
async fn not_ready_and_terminating_endpoints_get_no_new_requests() {
    let (client, mut api) = ApiServer::client("product");
    let followed = follow(client);
    api.list(
        &[slice(
            "product-a",
            "10",
            8081,
            &[("10.0.0.1", true, false), ("10.0.0.2", true, false)],
        )],
        "10",
    )
    .await;
    let watch = api.watch().await;
    followed.expect(&["10.0.0.1:8081", "10.0.0.2:8081"]).await;
    let kept = followed.upstream.endpoints()[0].clone();

    // Its readiness probe fails: out of the set.
    watch.send(
        "MODIFIED",
        slice(
            "product-a",
            "11",
            8081,
            &[("10.0.0.1", true, false), ("10.0.0.2", false, false)],
        ),
    );
    followed.expect(&["10.0.0.1:8081"]).await;
    assert_eq!(followed.status.counts(), (1, 1, 0));
    assert!(
        Arc::ptr_eq(&followed.upstream.endpoints()[0], &kept),
        "an endpoint that stays keeps its state (in-flight count, ejection)"
    );

    // Back, and a surge pod arrives; then the old pod starts terminating (still serving
    // its in-flight requests, so `serving` stays true): no new requests.
    watch.send(
        "MODIFIED",
        slice(
            "product-a",
            "12",
            8081,
            &[
                ("10.0.0.1", true, false),
                ("10.0.0.2", true, false),
                ("10.0.0.3", true, false),
            ],
        ),
    );
    followed
        .expect(&["10.0.0.1:8081", "10.0.0.2:8081", "10.0.0.3:8081"])
        .await;
    watch.send(
        "MODIFIED",
        slice(
            "product-a",
            "13",
            8081,
            &[
                ("10.0.0.1", false, true),
                ("10.0.0.2", true, false),
                ("10.0.0.3", true, false),
            ],
        ),
    );
    followed.expect(&["10.0.0.2:8081", "10.0.0.3:8081"]).await;
    assert_eq!(followed.status.counts(), (2, 0, 1));
    for _ in 0..100 {
        let picked = followed.upstream.pick(None).unwrap();
        assert_ne!(picked.authority.as_str(), "10.0.0.1:8081");
    }
}

#[tokio::test]
async fn a_deleted_slice_takes_its_endpoints_with_it() {
    let (client, mut api) = ApiServer::client("product");
    let followed = follow(client);
    api.list(
        &[slice("product-a", "10", 8081, &[("10.0.0.1", true, false)])],
        "10",
    )
    .await;
    let watch = api.watch().await;
    followed.expect(&["10.0.0.1:8081"]).await;
    let b = slice("product-b", "11", 9000, &[("10.0.0.9", true, false)]);
    watch.send("ADDED", b.clone());
    followed.expect(&["10.0.0.1:8081", "10.0.0.9:9000"]).await;
    let mut deleted = b;
    deleted["metadata"]["resourceVersion"] = "12".into();
    watch.send("DELETED", deleted);
    followed.expect(&["10.0.0.1:8081"]).await;
    // And the last one: no endpoints at all (the gateway answers 503 no_endpoint).
    watch.send(
        "DELETED",
        slice("product-a", "13", 8081, &[("10.0.0.1", true, false)]),
    );
    followed.expect(&[]).await;
    assert_eq!(followed.status.counts(), (0, 0, 0));
}

#[tokio::test]
async fn watch_errors_keep_the_last_endpoints_back_off_and_resume() {
    let (client, mut api) = ApiServer::client("product");
    let followed = follow(client);
    api.list(
        &[slice("product-a", "10", 8081, &[("10.0.0.1", true, false)])],
        "10",
    )
    .await;
    let watch = api.watch().await;
    followed.expect(&["10.0.0.1:8081"]).await;

    // The watch breaks off with an error (its resource version expired) ...
    watch.send(
        "ERROR",
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": "too old resource version", "reason": "Expired", "code": 410}),
    );
    // ... and the API server stays away for two attempts, each after a backoff.
    api.fail(false, StatusCode::INTERNAL_SERVER_ERROR).await;
    api.fail(false, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(
        followed.endpoints(),
        ["10.0.0.1:8081"],
        "last known endpoints kept"
    );
    assert!(followed.status.is_synced() && !followed.status.is_watching());
    assert_eq!(followed.status.report()["watch"], "retrying");
    assert!(followed.errors.get() >= 2, "{}", followed.errors.get());
    assert!(followed.status.last_error().is_some());

    // Back: a fresh list brings what changed meanwhile, and watching resumes.
    api.list(
        &[slice(
            "product-a",
            "20",
            8081,
            &[("10.0.0.1", false, true), ("10.0.0.2", true, false)],
        )],
        "20",
    )
    .await;
    let watch = api.watch().await;
    followed.expect(&["10.0.0.2:8081"]).await;
    assert!(followed.status.is_watching());
    assert_eq!(followed.status.report()["watch"], "ok");
    watch.send(
        "ADDED",
        slice("product-b", "21", 8081, &[("10.0.0.3", true, false)]),
    );
    followed.expect(&["10.0.0.2:8081", "10.0.0.3:8081"]).await;
    api.quiet(Duration::from_millis(200)).await;
}

/// The whole gateway with kubernetes discovery: not ready until the Service is listed,
/// then routing to exactly the endpoints the slices call ready.
#[tokio::test]
async fn the_gateway_routes_to_what_discovery_finds() {
    let hits_a = common::Hits::default();
    let hits_b = common::Hits::default();
    let stub = |name: &'static str, hits: common::Hits| {
        Router::new().fallback(move || {
            hits.bump();
            async move { name }
        })
    };
    let a = common::stub(stub("a", hits_a.clone())).await;
    let b = common::stub(stub("b", hits_b.clone())).await;
    let port = |url: &str| url.rsplit(':').next().unwrap().parse::<u16>().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        "upstreams: {product: []}\nroutes: [{prefix: /api/products, upstream: product}]\n",
    )
    .unwrap();
    let config = shop_gateway::Config::from_env(&Env::from_pairs([
        ("HOST", "127.0.0.1"),
        ("PORT", "0"),
        ("SHUTDOWN_DELAY", "0s"),
        ("GATEWAY_WORKERS", "2"),
        ("ACCESS_LOG", "false"),
        ("GATEWAY_ROUTES", routes.to_str().unwrap()),
        ("DISCOVERY", "kubernetes"),
        ("PRODUCT_SERVICE", "product"),
        // Discovery is tested here; access control in tests/auth.rs at the root.
        ("AUTH_MODE", "demo"),
    ]))
    .unwrap();
    let (client, mut api) = ApiServer::client("product");
    let gateway = shop_gateway::build(config)
        .unwrap()
        .with_kube_client(client);
    let url = format!("http://{}", gateway.local_addr());
    let shutdown = Shutdown::new();
    let task = tokio::spawn(gateway.run(shutdown.clone()));
    let http = common::client();

    // Wait for the watcher's list request before answering it, to look at /ready first.
    let ready = http.get(format!("{url}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let report: Value = ready.json().await.unwrap();
    assert_eq!(
        report["checks"]["discovery"]["status"], "failing",
        "{report}"
    );
    assert_eq!(
        report["upstreams"]["product"]["discovery"]["watch"],
        "syncing"
    );

    // A request that arrives before the first list waits for it instead of failing.
    let early = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move {
            let response = http.get(format!("{url}/api/products")).send().await;
            response.unwrap().status()
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!early.is_finished(), "answered before the first list");

    // Two slices, one per pod, each with its own port number for the port named http.
    api.list(
        &[
            slice("product-a", "1", port(&a), &[("127.0.0.1", true, false)]),
            slice("product-b", "2", port(&b), &[("127.0.0.1", true, false)]),
        ],
        "2",
    )
    .await;
    let watch = api.watch().await;
    assert_eq!(early.await.unwrap(), 200);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = http
            .get(format!("{url}/ready"))
            .send()
            .await
            .unwrap()
            .status();
        if status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..40 {
        let response = http
            .get(format!("{url}/api/products"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    assert!(hits_a.get() > 0 && hits_b.get() > 0, "both balanced");

    // Pod b terminates: from the moment the slice says so, it gets nothing new.
    watch.send(
        "MODIFIED",
        slice("product-b", "3", port(&b), &[("127.0.0.1", false, true)]),
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let report: Value = http
            .get(format!("{url}/ready"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if report["upstreams"]["product"]["discovery"]["terminating"] == 1 {
            assert_eq!(report["upstreams"]["product"]["endpoints"], 1);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{report}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = hits_b.get();
    for _ in 0..40 {
        let response = http
            .get(format!("{url}/api/products"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.text().await.unwrap(), "a");
    }
    assert_eq!(hits_b.get(), before);

    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metrics = shop_platform::testing::parse_exposition(&text).unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| {
        metrics
            .samples_of(name)
            .find(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    };
    let endpoints = |state| {
        value(
            "gateway_upstream_endpoints",
            &[("upstream", "product"), ("state", state)],
        )
    };
    assert_eq!(endpoints("healthy"), Some(1.0));
    assert_eq!(endpoints("terminating"), Some(1.0));
    assert_eq!(endpoints("not_ready"), Some(0.0));
    assert_eq!(
        value("gateway_discovery_watch_up", &[("upstream", "product")]),
        Some(1.0)
    );
    assert_eq!(
        value(
            "gateway_discovery_watch_errors_total",
            &[("upstream", "product")]
        ),
        Some(0.0)
    );
    shutdown.trigger();
    task.await.unwrap().unwrap();
}
