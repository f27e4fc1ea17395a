//! Router tests: every endpoint through the production middleware stack, via `oneshot`.

use std::sync::Arc;

use axum::Router;
use axum::http::{Method, StatusCode, header};
use serde_json::{Value, json};
use shop_platform::server::stack;
use shop_platform::testing::{Backend, TestBody, TestDatabase, TestResponse, call};
use shop_platform::{Metrics, ServerConfig};
use shop_product::storage::MIGRATIONS;
use shop_product::{AppState, Catalogue, SqlProductStore, app, seed_demo_products};

struct Harness {
    router: Router,
    database: shop_platform::Database,
    _db: TestDatabase,
}

impl Harness {
    async fn new(backend: Backend) -> Self {
        let db = TestDatabase::new(backend).await;
        let database = db.storage().open("product", &MIGRATIONS).await.unwrap();
        let store = Arc::new(SqlProductStore::new(
            &database,
            shop_platform::events::Outbox::default(),
        ));
        seed_demo_products(store.as_ref()).await.unwrap();
        let metrics = Metrics::new("product");
        let catalogue = Arc::new(Catalogue::load(store.as_ref(), &metrics).await.unwrap());
        let router = stack(
            app(AppState::new(store, catalogue, &metrics))
                .layer(axum::Extension(shop_platform::Authenticator::demo())),
            &ServerConfig::ephemeral(),
            metrics,
        );
        Self {
            router,
            database,
            _db: db,
        }
    }

    async fn get(&self, uri: &str) -> TestResponse {
        call(&self.router, Method::GET, uri, ()).await
    }

    async fn post(&self, uri: &str, body: impl Into<TestBody>) -> TestResponse {
        call(&self.router, Method::POST, uri, body).await
    }

    async fn patch(&self, uri: &str, body: impl Into<TestBody>) -> TestResponse {
        call(&self.router, Method::PATCH, uri, body).await
    }

    async fn stock(&self, id: &str) -> i64 {
        self.get(&format!("/products/{id}")).await.body["quantity"]
            .as_i64()
            .unwrap()
    }

    async fn count(&self) -> usize {
        self.get("/products").await.body.as_array().unwrap().len()
    }
}

async fn lists_the_seed_products_with_exact_prices(backend: Backend) {
    let h = Harness::new(backend).await;
    let r = h.get("/products").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.body,
        json!([
            {"id": "1", "name": "Laptop", "price": 999.99, "quantity": 10},
            {"id": "2", "name": "Mouse", "price": 24.99, "quantity": 100}
        ])
    );
    assert!(r.headers.get(header::LINK).is_none());
}

async fn pages_with_cursor_and_link_header(backend: Backend) {
    let h = Harness::new(backend).await;
    let first = h.get("/products?limit=1").await;
    assert_eq!(first.body.as_array().unwrap().len(), 1);
    assert_eq!(first.body[0]["id"], "1");
    let link = first.headers[header::LINK].to_str().unwrap().to_owned();
    assert!(link.ends_with("; rel=\"next\""), "{link}");
    let cursor = first.headers["x-next-cursor"].to_str().unwrap();
    let second = h.get(&format!("/products?limit=1&cursor={cursor}")).await;
    assert_eq!(second.body[0]["id"], "2");
    assert!(
        second.headers.get(header::LINK).is_none(),
        "no page after the last"
    );
    // The Link target itself is followable.
    let next = link.trim_start_matches('<').split('>').next().unwrap();
    assert_eq!(h.get(next).await.body, second.body);
}

async fn rejects_bad_list_parameters(backend: Backend) {
    let h = Harness::new(backend).await;
    let r = h.get("/products?limit=0").await;
    assert_eq!(
        (r.status, r.error_field()),
        (StatusCode::UNPROCESSABLE_ENTITY, "limit")
    );
    assert_eq!(
        h.get("/products?limit=500").await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let r = h.get("/products?limit=lots").await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_query")
    );
    let r = h.get("/products?cursor=forged").await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_cursor")
    );
}

async fn gets_one_product_by_path_or_seed_query(backend: Backend) {
    let h = Harness::new(backend).await;
    assert_eq!(h.get("/products/2").await.body["name"], "Mouse");
    assert_eq!(h.get("/product?id=1").await.body["name"], "Laptop");
    let r = h.get("/products/404").await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    assert_eq!(h.get("/product?id=404").await.status, StatusCode::NOT_FOUND);
    let r = h.get("/product").await;
    assert_eq!((r.status, r.error_field()), (StatusCode::BAD_REQUEST, "id"));
}

async fn creates_a_product(backend: Backend) {
    let h = Harness::new(backend).await;
    let r = h
        .post(
            "/products",
            json!({"name": " Keyboard ", "price": 49.9, "quantity": 5}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body["name"], "Keyboard");
    assert_eq!(r.body["price"], json!(49.9));
    let id = r.body["id"].as_str().unwrap();
    assert_eq!(r.headers[header::LOCATION], format!("/products/{id}"));
    assert_eq!(h.get(&format!("/products/{id}")).await.body, r.body);

    let r = h
        .post(
            "/products",
            json!({"id": "kb-2", "name": "Pad", "price": "0.10"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.body["price"], json!(0.1));
    assert_eq!(r.body["quantity"], 0);
    let r = h
        .post(
            "/products",
            json!({"id": "kb-2", "name": "Again", "price": 1}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "product_exists")
    );
}

async fn bad_product_input_is_refused_and_writes_nothing(backend: Backend) {
    let h = Harness::new(backend).await;
    let cases: Vec<(TestBody, StatusCode, &str)> = vec![
        ("{\"name\": \"x\", ".into(), StatusCode::BAD_REQUEST, ""),
        ("[1, 2]".into(), StatusCode::UNPROCESSABLE_ENTITY, "body"),
        (
            json!({"name": "x", "price": "abc"}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "price",
        ),
        (
            json!({"name": "x", "price": 1.005}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "price",
        ),
        (
            json!({"name": "x", "price": -1}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "price",
        ),
        (
            json!({"name": "   ", "price": 1}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "name",
        ),
        (
            json!({"name": 5, "price": 1}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "name",
        ),
        (
            json!({"price": 1}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "name",
        ),
        (
            json!({"name": "x", "price": 1, "quantity": -2}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "quantity",
        ),
        (
            json!({"name": "x", "price": 1, "quantity": 1.5}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "quantity",
        ),
        (
            json!({"name": "x", "price": 1, "colour": "red"}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "colour",
        ),
        ("".into(), StatusCode::BAD_REQUEST, ""),
        (
            json!({"id": "has space", "name": "x", "price": 1}).into(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "id",
        ),
        (
            TestBody::Raw(Some("text/plain"), b"{}".to_vec()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "",
        ),
        (
            TestBody::Raw(None, b"{}".to_vec()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "",
        ),
    ];
    for (body, status, field) in cases {
        let r = h.post("/products", body).await;
        assert_eq!(r.status, status, "{:?}", r.body);
        assert!(r.body["error"]["message"].is_string(), "{:?}", r.body);
        if !field.is_empty() {
            assert_eq!(r.error_field(), field, "{:?}", r.body);
        }
    }
    assert_eq!(h.count().await, 2, "nothing was written");
}

async fn oversize_body_is_413_json(backend: Backend) {
    let h = Harness::new(backend).await;
    let huge = format!("{{\"name\":\"{}\",\"price\":1}}", "x".repeat(2 << 20));
    let r = h.post("/products", huge.as_str()).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );
}

async fn patches_a_product(backend: Backend) {
    let h = Harness::new(backend).await;
    let r = h
        .patch("/products/2", json!({"price": 19.99, "quantity": 7}))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.body,
        json!({"id": "2", "name": "Mouse", "price": 19.99, "quantity": 7})
    );
    let r = h.patch("/products/2", json!({})).await;
    assert_eq!(
        (r.status, r.error_field()),
        (StatusCode::UNPROCESSABLE_ENTITY, "body")
    );
    let r = h.patch("/products/2", json!({"quantity": -1})).await;
    assert_eq!(
        (r.status, r.error_field()),
        (StatusCode::UNPROCESSABLE_ENTITY, "quantity")
    );
    let r = h.patch("/products/2", json!({"id": "3"})).await;
    assert_eq!(
        r.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "id is immutable"
    );
    assert_eq!(
        h.patch("/products/nope", json!({"name": "x"})).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(h.stock("2").await, 7);
}

async fn reserves_all_lines_or_none_and_releases_once(backend: Backend) {
    let h = Harness::new(backend).await;
    let r = h
        .post(
            "/reservations",
            json!({"order_id": "o1", "items": [
            {"product_id": "1", "quantity": 2}, {"product_id": "2", "quantity": 3}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["items"][0]["unit_price"], json!(999.99));
    let reservation = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!((h.stock("1").await, h.stock("2").await), (8, 97));

    // The second line cannot be met: the first must not be taken either.
    let r = h
        .post(
            "/reservations",
            json!({"items": [
            {"product_id": "2", "quantity": 1}, {"product_id": "1", "quantity": 9}]}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "insufficient_stock")
    );
    assert_eq!((h.stock("1").await, h.stock("2").await), (8, 97));

    let r = h
        .post(
            "/reservations",
            json!({"items": [{"product_id": "ghost", "quantity": 1}]}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_field()),
        (StatusCode::UNPROCESSABLE_ENTITY, "items[0].product_id")
    );
    let r = h.post("/reservations", json!({"items": []})).await;
    assert_eq!(
        (r.status, r.error_field()),
        (StatusCode::UNPROCESSABLE_ENTITY, "items")
    );
    let r = h
        .post(
            "/reservations",
            json!({"items": [{"product_id": "1", "quantity": 0}]}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_field()),
        (StatusCode::UNPROCESSABLE_ENTITY, "items[0].quantity")
    );

    let uri = format!("/reservations/{reservation}");
    assert_eq!(
        call(&h.router, Method::DELETE, &uri, ()).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!((h.stock("1").await, h.stock("2").await), (10, 100));
    assert_eq!(
        call(&h.router, Method::DELETE, &uri, ()).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        (h.stock("1").await, h.stock("2").await),
        (10, 100),
        "released only once"
    );
    // Releasing an id that never held stock closes it: a reserve arriving late under
    // that id (a retry after a timeout, say) must not take stock nobody will release.
    let r = call(&h.router, Method::DELETE, "/reservations/late-1", ()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = h
        .post(
            "/reservations",
            json!({"id": "late-1", "items": [{"product_id": "1", "quantity": 1}]}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "reservation_released")
    );
    assert_eq!(h.stock("1").await, 10);
    let r = call(&h.router, Method::DELETE, "/reservations/bad%20id", ()).await;
    assert_eq!(
        (r.status, r.error_field()),
        (StatusCode::UNPROCESSABLE_ENTITY, "id")
    );
}

async fn a_retried_reservation_takes_stock_once(backend: Backend) {
    let h = Harness::new(backend).await;
    let body = json!({"id": "r-1", "order_id": "o-1", "items": [
        {"product_id": "2", "quantity": 2}, {"product_id": "1", "quantity": 1}]});
    let first = h.post("/reservations", body.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    let again = h.post("/reservations", body).await;
    assert_eq!(
        again.status,
        StatusCode::OK,
        "a retry is answered, not repeated"
    );
    assert_eq!(again.body, first.body);
    assert_eq!((h.stock("1").await, h.stock("2").await), (9, 98));

    // Same id, different items: refused, and nothing taken.
    let r = h
        .post(
            "/reservations",
            json!({"id": "r-1", "items": [{"product_id": "1", "quantity": 5}]}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "reservation_exists")
    );
    assert_eq!((h.stock("1").await, h.stock("2").await), (9, 98));

    // Concurrent retries under one id still take the stock once.
    let attempts: Vec<_> = (0..10)
        .map(|_| {
            let router = h.router.clone();
            tokio::spawn(async move {
                call(
                    &router,
                    Method::POST,
                    "/reservations",
                    json!({"id": "r-2", "items": [{"product_id": "1", "quantity": 3}]}),
                )
                .await
                .status
            })
        })
        .collect();
    let statuses = futures_join(attempts.into_iter()).await;
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count(),
        1,
        "{statuses:?}"
    );
    assert!(statuses.iter().all(|s| s.is_success()), "{statuses:?}");
    assert_eq!(h.stock("1").await, 6);

    // A retry after the stock ran out is still answered with what it took.
    let everything = json!({"id": "r-3", "items": [{"product_id": "1", "quantity": 6}]});
    let first = h.post("/reservations", everything.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    let again = h.post("/reservations", everything).await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    assert_eq!(again.body, first.body);
    assert_eq!(h.stock("1").await, 0);
}

async fn concurrent_reservations_never_oversell(backend: Backend) {
    let h = Harness::new(backend).await;
    let attempts = (0..30).map(|_| {
        let router = h.router.clone();
        tokio::spawn(async move {
            call(
                &router,
                Method::POST,
                "/reservations",
                json!({"items": [{"product_id": "1", "quantity": 1}]}),
            )
            .await
            .status
        })
    });
    let statuses: Vec<StatusCode> = futures_join(attempts).await;
    let won = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((won, refused), (10, 20), "{statuses:?}");
    assert_eq!(h.stock("1").await, 0);
}

/// One-line reservations arriving together (on PostgreSQL they share a statement): each
/// is answered as it would be alone, and every product's units are taken at most once.
async fn a_burst_of_one_line_reservations_is_answered_each_as_alone(backend: Backend) {
    let h = Harness::new(backend).await;
    let line = |id: String, product: &str, quantity: i64| json!({"id": id, "items": [{"product_id": product, "quantity": quantity}]});
    // Product 1 holds 10 units, product 2 holds 100.
    let mut bodies: Vec<(&str, Value)> = Vec::new();
    for n in 0..12 {
        bodies.push(("one", line(format!("one-{n}"), "1", 1)));
    }
    for n in 0..10 {
        bodies.push(("seven", line(format!("seven-{n}"), "2", 7)));
    }
    bodies.push(("too-many", line("too-many".into(), "2", 1000)));
    bodies.push(("unknown", line("unknown".into(), "nope", 1)));
    for _ in 0..4 {
        bodies.push(("same", line("same".into(), "2", 1)));
    }
    let calls: Vec<_> = bodies
        .iter()
        .map(|(_, body)| {
            let (router, body) = (h.router.clone(), body.clone());
            tokio::spawn(async move { call(&router, Method::POST, "/reservations", body).await })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    let statuses = |kind: &str| -> Vec<StatusCode> {
        bodies
            .iter()
            .zip(&answers)
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, r)| r.status)
            .collect()
    };
    let count =
        |kind: &str, status: StatusCode| statuses(kind).iter().filter(|s| **s == status).count();
    assert_eq!(
        count("one", StatusCode::CREATED),
        10,
        "{:?}",
        statuses("one")
    );
    assert_eq!(
        count("one", StatusCode::CONFLICT),
        2,
        "{:?}",
        statuses("one")
    );
    assert_eq!(
        count("seven", StatusCode::CREATED),
        10,
        "{:?}",
        statuses("seven")
    );
    assert_eq!(statuses("too-many"), [StatusCode::CONFLICT]);
    assert_eq!(statuses("unknown"), [StatusCode::UNPROCESSABLE_ENTITY]);
    assert_eq!(
        count("same", StatusCode::CREATED),
        1,
        "{:?}",
        statuses("same")
    );
    assert_eq!(count("same", StatusCode::OK), 3, "{:?}", statuses("same"));
    for ((kind, body), r) in bodies.iter().zip(&answers) {
        match r.status {
            StatusCode::CREATED | StatusCode::OK => {
                // Each answer is its own reservation, its line named and priced.
                assert_eq!(r.body["id"], body["id"], "{kind}");
                assert_eq!(r.body["status"], "held");
                let item = &r.body["items"][0];
                assert_eq!(item["product_id"], body["items"][0]["product_id"]);
                assert_eq!(item["quantity"], body["items"][0]["quantity"]);
                assert!(
                    item["name"].as_str().is_some_and(|n| !n.is_empty()),
                    "{item}"
                );
            }
            StatusCode::CONFLICT => assert_eq!(r.error_code(), "insufficient_stock", "{kind}"),
            _ => assert_eq!(r.error_code(), "validation_failed", "{kind}"),
        }
    }
    assert_eq!(h.stock("1").await, 0);
    assert_eq!(h.stock("2").await, 100 - 70 - 1);
    let groups = h.database.write_groups();
    let made_in_groups = (groups.calls("reservation"), groups.groups("reservation"));
    if backend == Backend::Postgres {
        assert!(
            made_in_groups.0 > made_in_groups.1,
            "grouped: {made_in_groups:?}"
        );
    }

    // Two calls under one new id in one group: the group cannot make both, so every
    // call of it runs alone; one is made, the other replays it, the rest are made.
    let calls: Vec<_> = ["twice", "twice", "a", "b", "c"]
        .into_iter()
        .map(|id| {
            let (router, body) = (h.router.clone(), line(id.into(), "2", 2));
            tokio::spawn(async move { call(&router, Method::POST, "/reservations", body).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(call.await.unwrap().status);
    }
    statuses[..2].sort();
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::CREATED,
            StatusCode::CREATED,
            StatusCode::CREATED,
            StatusCode::CREATED
        ]
    );
    assert_eq!(h.stock("2").await, 29 - 4 * 2);
    if backend == Backend::Postgres {
        assert!(
            groups.fallbacks("reservation") >= 1,
            "the group with the twin ran alone"
        );
    } else {
        assert_eq!(
            groups.calls("reservation"),
            0,
            "SQLite's batch thread groups them"
        );
    }

    // A clean burst (new ids, stock enough) is made in groups, none of which fails and
    // runs its calls alone: the grouped statement itself works.
    let (fallbacks, calls_before, groups_before) = (
        groups.fallbacks("reservation"),
        groups.calls("reservation"),
        groups.groups("reservation"),
    );
    let calls: Vec<_> = (0..10)
        .map(|n| {
            let (router, body) = (h.router.clone(), line(format!("clean-{n}"), "2", 1));
            tokio::spawn(async move { call(&router, Method::POST, "/reservations", body).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().status, StatusCode::CREATED);
    }
    assert_eq!(h.stock("2").await, 21 - 10);
    if backend == Backend::Postgres {
        assert_eq!(
            groups.fallbacks("reservation"),
            fallbacks,
            "a clean group failed"
        );
        assert!(
            groups.calls("reservation") - calls_before
                > groups.groups("reservation") - groups_before,
            "the clean burst was not grouped"
        );
    }
}

async fn futures_join(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<StatusCode>>,
) -> Vec<StatusCode> {
    let mut out = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        out.push(task.await.unwrap());
    }
    out
}

async fn framework_errors_are_json_and_request_ids_are_echoed(backend: Backend) {
    let h = Harness::new(backend).await;
    let r = h.get("/nowhere").await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    assert!(
        !r.headers["x-request-id"].is_empty(),
        "generated when missing"
    );
    let r = call(&h.router, Method::DELETE, "/products", ()).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    assert!(r.headers.contains_key(header::ALLOW));

    let request = axum::http::Request::get("/products/1")
        .header("x-request-id", "abc-123")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = tower::ServiceExt::oneshot(h.router.clone(), request)
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "abc-123");
}

shop_platform::backend_tests!(
    lists_the_seed_products_with_exact_prices,
    pages_with_cursor_and_link_header,
    rejects_bad_list_parameters,
    gets_one_product_by_path_or_seed_query,
    creates_a_product,
    bad_product_input_is_refused_and_writes_nothing,
    oversize_body_is_413_json,
    patches_a_product,
    reserves_all_lines_or_none_and_releases_once,
    concurrent_reservations_never_oversell,
    framework_errors_are_json_and_request_ids_are_echoed,
    a_retried_reservation_takes_stock_once,
    a_burst_of_one_line_reservations_is_answered_each_as_alone,
);

/// The router and the OpenAPI document describe the same routes, both ways.
#[tokio::test]
async fn the_router_and_the_openapi_document_agree() {
    let h = Harness::new(Backend::Sqlite).await;
    shop_platform::testing::assert_router_matches_document(
        &h.router,
        &shop_product::openapi(),
        include_str!("../src/routes.rs"),
    )
    .await;
}
