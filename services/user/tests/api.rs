//! User service tests: every endpoint through the production middleware stack via
//! `oneshot`, what lands in the database (read back with sqlx), and the real binary setup
//! (`shop_user::build`) over HTTP for persistence and probes.

use std::sync::Arc;

use argon2::PasswordVerifier;
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use shop_platform::auth::TokenSigner;
use shop_platform::config::Env;
use shop_platform::events::Handled;
use shop_platform::server::stack;
use shop_platform::testing::{Backend, RunningApp, TestBody, TestDatabase, TestResponse, call};
use shop_platform::{Authenticator, Database, Metrics, ServerConfig};
use shop_user::consumers::OrderCountsConsumer;
use shop_user::domain::OrderCounts;
use shop_user::storage::MIGRATIONS;
use shop_user::{AppState, Config, SqlUserStore, UserStore, app};
use tower::ServiceExt;

/// The seed's walkthrough body, byte for byte.
const SEED_BODY: &str =
    r#"{"id":"1","name":"John Doe","email":"john@example.com","password":"secret"}"#;

struct Harness {
    router: Router,
    metrics: Metrics,
    dir: TestDatabase,
}

impl Harness {
    async fn new(backend: Backend) -> Self {
        let dir = TestDatabase::new(backend).await;
        let store = Arc::new(SqlUserStore::new(&open_db(&dir).await));
        let metrics = Metrics::new("user");
        let config = demo_config(&dir);
        let keys = config.key_pair().unwrap();
        let signer = TokenSigner::new(&keys, "shop", "shop", config.token_ttl);
        let router = stack(
            app(AppState::new(store, &metrics, &keys, signer, config.limits))
                .layer(axum::Extension(Authenticator::demo())),
            &ServerConfig::ephemeral(),
            metrics.clone(),
        );
        Self {
            router,
            metrics,
            dir,
        }
    }

    async fn get(&self, uri: &str) -> TestResponse {
        call(&self.router, Method::GET, uri, ()).await
    }

    async fn post(&self, uri: &str, body: impl Into<TestBody>) -> TestResponse {
        call(&self.router, Method::POST, uri, body).await
    }

    /// POST with the response body kept as raw text, to look for leaked secrets.
    async fn post_raw(&self, uri: &str, body: &Value) -> (StatusCode, HeaderMap, String) {
        let request = Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
    }

    async fn exists(&self, id: &str) -> bool {
        let r = self.get(&format!("/users/{id}")).await;
        match r.status {
            StatusCode::OK => true,
            StatusCode::NOT_FOUND => false,
            // An id outside the published pattern cannot name a user.
            StatusCode::UNPROCESSABLE_ENTITY => false,
            other => panic!("GET /users/{id}: unexpected {other}: {:?}", r.body),
        }
    }

    /// A second, independent pool on the service's database.
    async fn db(&self) -> Database {
        open_db(&self.dir).await
    }

    async fn row_count(&self) -> i64 {
        let db = self.db().await;
        let n = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM users")
            .fetch_one(db.pool())
            .await
            .unwrap();
        db.close().await;
        n
    }

    async fn stored_hash(&self, id: &str) -> Option<String> {
        stored_hash(&self.dir, id).await
    }

    /// The `users_registered_total` counter.
    fn registered(&self) -> u64 {
        self.metrics
            .render()
            .lines()
            .find(|line| line.starts_with("users_registered_total"))
            .and_then(|line| line.split_whitespace().last())
            .expect("users_registered_total is exported")
            .parse()
            .unwrap()
    }
}

/// Authentication off: these tests are about accounts, not access (see tests/auth.rs).
fn demo_config(dir: &TestDatabase) -> Config {
    Config {
        storage: dir.storage(),
        ..Config::from_env(&Env::from_pairs([("AUTH_MODE", "demo")])).unwrap()
    }
}

async fn open_db(dir: &TestDatabase) -> Database {
    dir.storage().open("user", &MIGRATIONS).await.unwrap()
}

async fn stored_hash(dir: &TestDatabase, id: &str) -> Option<String> {
    let db = open_db(dir).await;
    let hash = sqlx::query_scalar::<_, String>("SELECT password_hash FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(db.pool())
        .await
        .unwrap();
    db.close().await;
    hash
}

fn user(id: &str, email: &str) -> Value {
    json!({"id": id, "name": "Test User", "email": email, "password": "s3cret-pass"})
}

fn assert_json_error(r: &TestResponse, status: StatusCode, code: &str, field: Option<&str>) {
    assert_eq!(r.status, status, "{:?}", r.body);
    assert_eq!(r.error_code(), code, "{:?}", r.body);
    assert!(
        r.body["error"]["message"].is_string(),
        "error body has a message: {:?}",
        r.body
    );
    assert_eq!(
        r.headers[header::CONTENT_TYPE],
        "application/json",
        "{:?}",
        r.body
    );
    match field {
        Some(field) => assert_eq!(r.error_field(), field, "{:?}", r.body),
        None => assert!(r.body["error"].get("field").is_none(), "{:?}", r.body),
    }
}

fn assert_no_secret_keys(body: &Value) {
    let object = body.as_object().expect("a JSON object");
    for key in ["password", "password_hash"] {
        assert!(!object.contains_key(key), "{key} leaked: {body}");
    }
}

// ---------------------------------------------------------------------------------------
// Registration and lookup
// ---------------------------------------------------------------------------------------

async fn registers_a_user_and_never_returns_the_password(backend: Backend) {
    let h = Harness::new(backend).await;
    let password = "Tr0ub4dor&3-unique";
    let (status, headers, text) = h
        .post_raw(
            "/users",
            &json!({"id": "alice", "name": "  Alice Liddell ", "email": "alice@example.com",
                    "password": password}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    assert_eq!(headers[header::LOCATION], "/users/alice");
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    assert!(!text.contains(password), "password echoed: {text}");
    assert!(!text.contains("argon2"), "hash echoed: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_no_secret_keys(&body);
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys.len(),
        6,
        "exactly id, name, email, created_at, role, orders: {body}"
    );
    assert_eq!(
        body["orders"],
        serde_json::json!({"placed": 0, "cancelled": 0})
    );
    assert_eq!(body["role"], "customer", "registration never makes admins");
    assert_eq!(body["id"], "alice");
    assert_eq!(body["name"], "Alice Liddell", "name is trimmed");
    assert_eq!(body["email"], "alice@example.com");
    let created_at = body["created_at"].as_str().expect("created_at is a string");
    let parsed = chrono::DateTime::parse_from_rfc3339(created_at).expect("RFC 3339 timestamp");
    let age = chrono::Utc::now().signed_duration_since(parsed);
    assert!(
        age >= chrono::Duration::zero() && age < chrono::Duration::seconds(60),
        "created_at is now: {created_at}"
    );
    assert_eq!(h.registered(), 1);

    // The stored user reads back identically, still without secrets.
    let r = h.get("/users/alice").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, body);
    assert_no_secret_keys(&r.body);
    assert!(!r.body.to_string().contains(password));
}

async fn generates_an_id_when_none_is_given(backend: Backend) {
    let h = Harness::new(backend).await;
    let r = h
        .post(
            "/users",
            json!({"name": "Bob", "email": "bob@example.com", "password": "hunter22"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(r.headers[header::LOCATION], format!("/users/{id}"));
    assert_eq!(h.get(&format!("/users/{id}")).await.body, r.body);

    // An explicit null is the same as no id.
    let r = h
        .post(
            "/users",
            json!({"id": null, "name": "Carol", "email": "carol@example.com",
                   "password": "hunter22"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_ne!(r.body["id"], json!(id), "ids are unique");
    assert_eq!(h.row_count().await, 2);
}

async fn seed_walkthrough_post_user_then_get_by_query(backend: Backend) {
    let h = Harness::new(backend).await;
    let r = h.post("/user", SEED_BODY).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.headers[header::LOCATION], "/users/1");
    assert_eq!(r.body["id"], "1");
    assert_eq!(r.body["name"], "John Doe");
    assert_eq!(r.body["email"], "john@example.com");
    assert_no_secret_keys(&r.body);
    assert!(!r.body.to_string().contains("secret"), "{:?}", r.body);

    let by_query = h.get("/users?id=1").await;
    assert_eq!(by_query.status, StatusCode::OK);
    assert_eq!(by_query.body, r.body);
    let by_path = h.get("/users/1").await;
    assert_eq!(by_path.status, StatusCode::OK);
    assert_eq!(by_path.body, r.body);
    assert_no_secret_keys(&by_query.body);

    // Replaying the seed: both the id and the email are taken. The id wins, so a client
    // retrying its own registration hears "exists", not "someone has your email".
    let again = h.post("/user", SEED_BODY).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{:?}", again.body);
    assert_eq!(again.error_code(), "user_exists", "{:?}", again.body);
    assert_eq!(h.get("/users/1").await.body, r.body, "original untouched");
    assert_eq!(h.row_count().await, 1);
    assert_eq!(h.registered(), 1);
}

async fn lookups_that_find_nothing_or_lack_an_id(backend: Backend) {
    let h = Harness::new(backend).await;
    assert_eq!(
        h.post("/users", user("1", "one@example.com")).await.status,
        StatusCode::CREATED
    );

    let r = h.get("/users/nope").await;
    assert_json_error(&r, StatusCode::NOT_FOUND, "not_found", None);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nope"),
        "{:?}",
        r.body
    );

    let r = h.get("/users?id=nope").await;
    assert_json_error(&r, StatusCode::NOT_FOUND, "not_found", None);

    for uri in ["/users", "/users?id=", "/users?other=1"] {
        let r = h.get(uri).await;
        assert_json_error(&r, StatusCode::BAD_REQUEST, "missing_parameter", Some("id"));
    }

    // Ids are exact: no case folding, no prefix match, no SQL wildcard; characters the
    // id pattern does not allow are refused before any lookup.
    for id in ["_", "01", "1-"] {
        assert_eq!(
            h.get(&format!("/users?id={id}")).await.status,
            StatusCode::NOT_FOUND,
            "{id:?}"
        );
    }
    for id in ["%25", "1%25", "1%20"] {
        let r = h.get(&format!("/users?id={id}")).await;
        assert_json_error(
            &r,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            Some("id"),
        );
    }
    assert_eq!(h.get("/users?id=1").await.status, StatusCode::OK);

    // Framework errors are JSON too.
    let r = call(&h.router, Method::DELETE, "/users/1", ()).await;
    assert_json_error(
        &r,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        None,
    );
    assert!(h.exists("1").await, "DELETE did nothing");
}

async fn accepts_json_content_type_with_parameters(backend: Backend) {
    let h = Harness::new(backend).await;
    let r = h
        .post(
            "/users",
            TestBody::Raw(
                Some("application/json; charset=utf-8"),
                user("ct", "ct@example.com").to_string().into_bytes(),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
}

// ---------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------

/// Each case: body, expected status, expected code, expected field, and the id it tried
/// to create (checked afterwards not to exist).
type Case = (
    TestBody,
    StatusCode,
    &'static str,
    Option<&'static str>,
    &'static str,
);

fn bad_cases() -> Vec<Case> {
    const UNPROCESSABLE: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;
    const VF: &str = "validation_failed";
    let ok_password = "s3cret-pass";
    let mut cases: Vec<Case> = vec![
        (
            r#"{"id":"bad-malformed","name":"x", "#.into(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
            None,
            "bad-malformed",
        ),
        (
            r#"{"id":"bad-trailing","name":"x","email":"t@example.com","password":"s3cret-pass"} x"#
                .into(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
            None,
            "bad-trailing",
        ),
        ("".into(), StatusCode::BAD_REQUEST, "malformed_json", None, ""),
        (
            "[1, 2]".into(),
            UNPROCESSABLE,
            VF,
            Some("body"),
            "",
        ),
        // serde would happily build the struct from a positional array: it must not.
        (
            json!(["bad-array", "Arr", "arr@example.com", ok_password]).into(),
            UNPROCESSABLE,
            VF,
            Some("body"),
            "bad-array",
        ),
        (
            json!("bad-string").into(),
            UNPROCESSABLE,
            VF,
            Some("body"),
            "",
        ),
        (
            json!({"id": "bad-type", "name": 5, "email": "t@example.com",
                   "password": ok_password})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("name"),
            "bad-type",
        ),
        (
            json!({"id": "bad-empty-name", "name": "", "email": "e@example.com",
                   "password": ok_password})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("name"),
            "bad-empty-name",
        ),
        (
            json!({"id": "bad-blank-name", "name": " \t\n ", "email": "b@example.com",
                   "password": ok_password})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("name"),
            "bad-blank-name",
        ),
        (
            json!({"id": "bad-ctrl-name", "name": "Al\u{7}ice", "email": "c@example.com",
                   "password": ok_password})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("name"),
            "bad-ctrl-name",
        ),
        (
            json!({"id": "bad-long-name", "name": "é".repeat(101), "email": "l@example.com",
                   "password": ok_password})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("name"),
            "bad-long-name",
        ),
        (
            json!({"id": "bad-no-name", "email": "n@example.com", "password": ok_password})
                .into(),
            UNPROCESSABLE,
            VF,
            Some("name"),
            "bad-no-name",
        ),
        (
            json!({"id": "bad-no-email", "name": "x", "password": ok_password}).into(),
            UNPROCESSABLE,
            VF,
            Some("email"),
            "bad-no-email",
        ),
        (
            json!({"id": "bad-null-email", "name": "x", "email": null,
                   "password": ok_password})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("email"),
            "bad-null-email",
        ),
        (
            json!({"id": "bad-short-pw", "name": "x", "email": "s@example.com",
                   "password": "12345"})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("password"),
            "bad-short-pw",
        ),
        // Five characters, ten bytes: the minimum counts characters.
        (
            json!({"id": "bad-short-pw-utf8", "name": "x", "email": "u@example.com",
                   "password": "ééééé"})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("password"),
            "bad-short-pw-utf8",
        ),
        (
            json!({"id": "bad-long-pw", "name": "x", "email": "p@example.com",
                   "password": "x".repeat(1025)})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("password"),
            "bad-long-pw",
        ),
        (
            json!({"id": "bad-no-pw", "name": "x", "email": "np@example.com"}).into(),
            UNPROCESSABLE,
            VF,
            Some("password"),
            "bad-no-pw",
        ),
        (
            json!({"id": "bad-num-pw", "name": "x", "email": "nn@example.com",
                   "password": 123456})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("password"),
            "bad-num-pw",
        ),
        (
            json!({"id": "bad-unknown", "name": "x", "email": "k@example.com",
                   "password": ok_password, "role": "admin"})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("role"),
            "bad-unknown",
        ),
        (
            json!({"id": "bad-hash-field", "name": "x", "email": "h@example.com",
                   "password": ok_password, "password_hash": "$argon2id$forged"})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("password_hash"),
            "bad-hash-field",
        ),
        (
            json!({"id": "has space", "name": "x", "email": "i@example.com",
                   "password": ok_password})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("id"),
            "has%20space",
        ),
        (
            json!({"id": "", "name": "x", "email": "i2@example.com", "password": ok_password})
                .into(),
            UNPROCESSABLE,
            VF,
            Some("id"),
            "",
        ),
        (
            json!({"id": "a".repeat(65), "name": "x", "email": "i3@example.com",
                   "password": ok_password})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("id"),
            "",
        ),
        (
            json!({"id": "../etc", "name": "x", "email": "i4@example.com",
                   "password": ok_password})
            .into(),
            UNPROCESSABLE,
            VF,
            Some("id"),
            "",
        ),
        (
            json!({"id": 7, "name": "x", "email": "i5@example.com", "password": ok_password})
                .into(),
            UNPROCESSABLE,
            VF,
            Some("id"),
            "7",
        ),
        (
            TestBody::Raw(None, user("bad-no-ct", "ct@example.com").to_string().into_bytes()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            None,
            "bad-no-ct",
        ),
        (
            TestBody::Raw(
                Some("text/plain"),
                user("bad-text-ct", "ct2@example.com")
                    .to_string()
                    .into_bytes(),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            None,
            "bad-text-ct",
        ),
        (
            TestBody::Raw(
                Some("application/x-www-form-urlencoded"),
                b"id=bad-form&name=x&email=f%40example.com&password=s3cret-pass".to_vec(),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            None,
            "bad-form",
        ),
    ];
    for (i, email) in [
        "john",
        "a@b",
        "a b@c.com",
        "",
        "   ",
        "john@",
        "@example.com",
        "a@b@c.com",
        "a@-b.com",
        "a@b..com",
        "a@b.com.",
        "a\u{0}b@c.com",
    ]
    .into_iter()
    .enumerate()
    {
        let id: &'static str = Box::leak(format!("bad-email-{i}").into_boxed_str());
        cases.push((
            json!({"id": id, "name": "x", "email": email, "password": ok_password}).into(),
            UNPROCESSABLE,
            VF,
            Some("email"),
            id,
        ));
    }
    let long_local = format!("{}@example.com", "a".repeat(65));
    let long_address = format!("a@{}.com", "b".repeat(250));
    for (i, email) in [long_local, long_address].into_iter().enumerate() {
        let id: &'static str = Box::leak(format!("bad-long-email-{i}").into_boxed_str());
        cases.push((
            json!({"id": id, "name": "x", "email": email, "password": ok_password}).into(),
            UNPROCESSABLE,
            VF,
            Some("email"),
            id,
        ));
    }
    cases
}

async fn assert_bad_input_writes_nothing(backend: Backend, route: &str) {
    let h = Harness::new(backend).await;
    let mut attempted = Vec::new();
    for (body, status, code, field, id) in bad_cases() {
        let r = h.post(route, body).await;
        assert!(
            r.status == status && r.error_code() == code,
            "POST {route} attempting {id:?}: expected {status} {code}, got {} {:?}",
            r.status,
            r.body
        );
        assert_json_error(&r, status, code, field);
        if !id.is_empty() {
            attempted.push(id);
        }
    }
    for id in attempted {
        assert!(!h.exists(id).await, "{id} was created by a refused request");
    }
    assert_eq!(h.row_count().await, 0, "nothing was written");
    assert_eq!(h.registered(), 0, "nothing was counted");

    // The service still works afterwards.
    let r = h.post(route, user("good", "good@example.com")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(h.row_count().await, 1);
}

async fn bad_input_on_post_users_is_refused_and_writes_nothing(backend: Backend) {
    assert_bad_input_writes_nothing(backend, "/users").await;
}

async fn bad_input_on_seed_route_is_refused_and_writes_nothing(backend: Backend) {
    assert_bad_input_writes_nothing(backend, "/user").await;
}

async fn oversize_body_is_413_json_and_writes_nothing(backend: Backend) {
    let h = Harness::new(backend).await;
    let huge = json!({
        "id": "huge",
        "name": "x".repeat((1 << 20) + 1),
        "email": "huge@example.com",
        "password": "s3cret-pass",
    });
    for route in ["/users", "/user"] {
        let r = h.post(route, huge.clone()).await;
        assert_json_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None);
    }
    assert!(!h.exists("huge").await);
    assert_eq!(h.row_count().await, 0);
}

async fn boundary_values_are_accepted(backend: Backend) {
    let h = Harness::new(backend).await;
    let id64 = "A-z_9".repeat(13)[..64].to_owned();
    let accepted = [
        // Exactly 6 characters (the seed's "secret"), exactly 1024 bytes.
        json!({"id": "pw-min", "name": "x", "email": "pw-min@example.com",
               "password": "secret"}),
        json!({"id": "pw-max", "name": "x", "email": "pw-max@example.com",
               "password": "p".repeat(1024)}),
        // 100 characters (200 bytes): the limit counts characters.
        json!({"id": "name-max", "name": "é".repeat(100), "email": "name-max@example.com",
               "password": "secret"}),
        json!({"id": id64, "name": "x", "email": "id-max@example.com", "password": "secret"}),
        json!({"id": "local-max", "name": "x",
               "email": format!("{}@example.com", "l".repeat(64)), "password": "secret"}),
    ];
    for body in accepted {
        let r = h.post("/users", body.clone()).await;
        assert_eq!(r.status, StatusCode::CREATED, "{body}: {:?}", r.body);
        assert!(h.exists(body["id"].as_str().unwrap()).await);
    }
    assert_eq!(h.get("/users/name-max").await.body["name"], "é".repeat(100));
    assert_eq!(h.row_count().await, 5);
}

// ---------------------------------------------------------------------------------------
// Uniqueness and normalisation
// ---------------------------------------------------------------------------------------

async fn duplicate_id_and_email_are_409(backend: Backend) {
    let h = Harness::new(backend).await;
    let first = h.post("/users", user("dup", "john@example.com")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);

    // Same id, different email.
    let r = h.post("/users", user("dup", "other@example.com")).await;
    assert_json_error(&r, StatusCode::CONFLICT, "user_exists", None);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("dup"));

    // Same email, different case and padding, new id.
    for email in [
        "JOHN@example.com",
        "john@EXAMPLE.COM",
        "  John@Example.Com  ",
    ] {
        let r = h.post("/users", user("other", email)).await;
        assert_json_error(&r, StatusCode::CONFLICT, "email_taken", Some("email"));
        // The seed route shares the rule.
        let r = h.post("/user", user("other", email)).await;
        assert_json_error(&r, StatusCode::CONFLICT, "email_taken", Some("email"));
    }
    assert!(!h.exists("other").await);

    // The original is untouched.
    let r = h.get("/users/dup").await;
    assert_eq!(r.body, first.body);
    assert_eq!(h.row_count().await, 1);
    assert_eq!(h.registered(), 1, "refused registrations are not counted");

    // Ids are case-sensitive: "DUP" is another user.
    let r = h.post("/users", user("DUP", "dup2@example.com")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(h.row_count().await, 2);
}

async fn emails_are_stored_trimmed_and_lower_cased(backend: Backend) {
    let h = Harness::new(backend).await;
    let r = h
        .post("/users", user("mixed", "  Mixed.Case+Tag@Example.COM \t"))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["email"], "mixed.case+tag@example.com");
    assert_eq!(
        h.get("/users/mixed").await.body["email"],
        "mixed.case+tag@example.com"
    );
    let db = h.db().await;
    let stored: String = sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
        .bind("mixed")
        .fetch_one(db.pool())
        .await
        .unwrap();
    db.close().await;
    assert_eq!(stored, "mixed.case+tag@example.com");

    // The lower-cased form then collides with any spelling of it.
    let r = h
        .post("/users", user("mixed-2", "mixed.case+tag@example.com"))
        .await;
    assert_json_error(&r, StatusCode::CONFLICT, "email_taken", Some("email"));
}

async fn concurrent_registrations_with_one_email_create_exactly_one_user(backend: Backend) {
    let h = Harness::new(backend).await;
    let attempts: Vec<_> = (0..6)
        .map(|i| {
            let router = h.router.clone();
            let email = if i % 2 == 0 {
                "race@example.com"
            } else {
                "RACE@example.com"
            };
            tokio::spawn(async move {
                call(
                    &router,
                    Method::POST,
                    "/users",
                    user(&format!("race-{i}"), email),
                )
                .await
            })
        })
        .collect();
    let mut created = 0;
    for attempt in attempts {
        let r = attempt.await.unwrap();
        match r.status {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => assert_eq!(
                (r.error_code(), r.error_field()),
                ("email_taken", "email"),
                "{:?}",
                r.body
            ),
            other => panic!("unexpected {other}: {:?}", r.body),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(h.row_count().await, 1);
    assert_eq!(h.registered(), 1);
}

// ---------------------------------------------------------------------------------------
// Password storage
// ---------------------------------------------------------------------------------------

async fn password_is_stored_only_as_an_argon2id_phc_string(backend: Backend) {
    let h = Harness::new(backend).await;
    let password = "correct horse battery staple";
    for (id, email) in [("h1", "h1@example.com"), ("h2", "h2@example.com")] {
        let r = h
            .post(
                "/users",
                json!({"id": id, "name": "Hash", "email": email, "password": password}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    let h1 = h.stored_hash("h1").await.expect("row for h1");
    let h2 = h.stored_hash("h2").await.expect("row for h2");
    for phc in [&h1, &h2] {
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(!phc.contains(password), "{phc}");
        assert!(!phc.contains("correct"), "{phc}");
        let hasher = shop_user::domain::hasher();
        assert!(
            hasher
                .verify_password(password.as_bytes(), phc.as_str())
                .is_ok()
        );
        assert!(
            hasher
                .verify_password(b"wrong password", phc.as_str())
                .is_err()
        );
    }
    assert_ne!(h1, h2, "each hash has its own salt");

    // No column anywhere holds the clear password.
    let db = h.db().await;
    let leaked: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM users WHERE id LIKE $1 OR name LIKE $1 OR email LIKE $1 \
         OR password_hash LIKE $1 OR created_at LIKE $1",
    )
    .bind(format!("%{password}%"))
    .fetch_one(db.pool())
    .await
    .unwrap();
    db.close().await;
    assert_eq!(leaked, 0);

    // A refused registration stores no hash.
    let r = h
        .post(
            "/users",
            json!({"id": "h3", "name": "", "email": "h3@example.com", "password": password}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(h.stored_hash("h3").await, None);
}

// ---------------------------------------------------------------------------------------
// The real application over HTTP
// ---------------------------------------------------------------------------------------

async fn start(dir: &TestDatabase) -> RunningApp {
    let app = shop_user::build(Config {
        server: ServerConfig::ephemeral(),
        ..demo_config(dir)
    })
    .await
    .unwrap();
    RunningApp::start(app)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn users_survive_a_restart(backend: Backend) {
    let dir = TestDatabase::new(backend).await;
    let password = "persist-me-please";

    let running = start(&dir).await;
    let http = client();
    let response = http
        .post(format!("{}/users", running.url))
        .json(
            &json!({"id": "kept", "name": "Kept User", "email": "Kept@Example.com",
                      "password": password}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()[header::LOCATION], "/users/kept");
    let text = response.text().await.unwrap();
    assert!(!text.contains(password), "{text}");
    let created: Value = serde_json::from_str(&text).unwrap();
    assert_no_secret_keys(&created);
    assert_eq!(created["email"], "kept@example.com");
    drop(http);
    running.stop().await.unwrap();
    let hash_before = stored_hash(&dir, "kept").await.expect("stored");

    let running = start(&dir).await;
    let http = client();
    let response = http
        .get(format!("{}/users/kept", running.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let fetched: Value = response.json().await.unwrap();
    assert_eq!(fetched, created);
    let by_query: Value = http
        .get(format!("{}/users?id=kept", running.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(by_query, created);

    // Uniqueness survives the restart too.
    let response = http
        .post(format!("{}/users", running.url))
        .json(
            &json!({"id": "kept", "name": "Again", "email": "new@example.com",
                      "password": password}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "user_exists");
    let response = http
        .post(format!("{}/users", running.url))
        .json(
            &json!({"id": "kept-2", "name": "Again", "email": "KEPT@example.com",
                      "password": password}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "email_taken");
    assert_eq!(body["error"]["field"], "email");
    drop(http);
    running.stop().await.unwrap();

    assert_eq!(
        stored_hash(&dir, "kept").await.as_deref(),
        Some(hash_before.as_str()),
        "hash unchanged"
    );
    assert_eq!(stored_hash(&dir, "kept-2").await, None);
}

async fn health_and_readiness_on_the_running_app(backend: Backend) {
    let dir = TestDatabase::new(backend).await;
    let running = start(&dir).await;
    let http = client();

    let response = http
        .get(format!("{}/health", running.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");

    let response = http
        .get(format!("{}/ready", running.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["checks"]["database"]["status"], "ok", "{body}");

    // The registration counter is exported on the real app's /metrics.
    let response = http
        .post(format!("{}/user", running.url))
        .header(header::CONTENT_TYPE, "application/json")
        .body(SEED_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let metrics = http
        .get(format!("{}/metrics", running.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("users_registered_total") && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(!metrics.contains("secret"));

    drop(http);
    running.stop().await.unwrap();
    if backend == Backend::Sqlite {
        assert!(dir.storage().data_dir.join("user.db").exists());
    }
}

// ---------------------------------------------------------------------------------------
// Order counts, from the order service's events
// ---------------------------------------------------------------------------------------

const PLACED: OrderCounts = OrderCounts {
    placed: 1,
    cancelled: 0,
};
const CANCELLED: OrderCounts = OrderCounts {
    placed: 0,
    cancelled: 1,
};

async fn an_order_event_is_counted_once_however_often_it_arrives(backend: Backend) {
    let h = Harness::new(backend).await;
    assert_eq!(
        h.post("/users", SEED_BODY).await.status,
        StatusCode::CREATED
    );
    let db = h.db().await;
    let store = SqlUserStore::new(&db);
    let queue = OrderCountsConsumer::queue().name;
    let count = |event: &'static str, user: &'static str, counts| {
        let store = &store;
        async move { store.count_order(queue, event, user, counts).await.unwrap() }
    };
    assert_eq!(count("e-1", "1", PLACED).await, Handled::Applied);
    assert_eq!(count("e-1", "1", PLACED).await, Handled::Duplicate);
    assert_eq!(count("e-2", "1", CANCELLED).await, Handled::Applied);
    assert_eq!(count("e-2", "1", CANCELLED).await, Handled::Duplicate);
    // An account this service does not hold: the event is consumed and changes nothing.
    assert_eq!(count("e-3", "nobody", PLACED).await, Handled::Applied);
    // A redelivery after another event still finds the first one recorded.
    assert_eq!(count("e-1", "1", PLACED).await, Handled::Duplicate);

    let user = h.get("/users/1").await;
    assert_eq!(user.status, StatusCode::OK);
    assert_eq!(user.body["orders"], json!({"placed": 1, "cancelled": 1}));
    let inbox: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox WHERE queue = $1")
        .bind(queue)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(inbox, 3, "one inbox row per distinct event");
    db.close().await;
}

/// A burst of events applied at once (as a consumer applies the deliveries waiting), on
/// PostgreSQL one statement a group: each event counts once however many times it is in
/// the burst or was counted before, each for its own account.
async fn a_burst_of_order_events_counts_each_event_once(backend: Backend) {
    let h = Harness::new(backend).await;
    assert_eq!(
        h.post("/users", SEED_BODY).await.status,
        StatusCode::CREATED
    );
    let other =
        r#"{"id":"2","name":"Bo","email":"bo@example.com","password":"correct horse battery"}"#;
    assert_eq!(h.post("/users", other).await.status, StatusCode::CREATED);
    let db = h.db().await;
    let store = Arc::new(SqlUserStore::new(&db));
    let queue = OrderCountsConsumer::queue().name;
    assert_eq!(
        store
            .count_order(queue, "before", "1", PLACED)
            .await
            .unwrap(),
        Handled::Applied
    );
    // 30 events, each sent twice, and the one counted before: user 1 gets the even ones
    // (placed), user 2 the odd ones (every third of them a cancellation), "nobody" none.
    let mut burst = vec![("before".to_owned(), "1", PLACED)];
    for n in 0..30 {
        let (user, counts) = match n % 2 {
            0 => ("1", PLACED),
            _ if n % 3 == 0 => ("2", CANCELLED),
            _ => ("2", PLACED),
        };
        burst.push((format!("e-{n}"), user, counts));
        burst.push((format!("e-{n}"), user, counts));
    }
    burst.push(("e-x".to_owned(), "nobody", PLACED));
    let answers = futures_util::future::join_all(burst.iter().map(|(event, user, counts)| {
        let store = store.clone();
        async move {
            store
                .count_order(queue, event, user, *counts)
                .await
                .unwrap()
        }
    }))
    .await;
    let mut applied = std::collections::HashMap::<&str, usize>::new();
    for ((event, _, _), answer) in burst.iter().zip(&answers) {
        if *answer == Handled::Applied {
            *applied.entry(event).or_default() += 1;
        }
    }
    assert_eq!(applied.get("before"), None, "counted before the burst");
    for n in 0..30 {
        assert_eq!(
            applied.get(format!("e-{n}").as_str()),
            Some(&1),
            "e-{n}: {answers:?}"
        );
    }
    assert_eq!(applied.get("e-x"), Some(&1));

    // User 1: "before" and the 15 even events; user 2: of its 15 odd events, the five
    // that are multiples of three are cancellations.
    let one = h.get("/users/1").await;
    assert_eq!(one.body["orders"], json!({"placed": 16, "cancelled": 0}));
    let two = h.get("/users/2").await;
    assert_eq!(two.body["orders"], json!({"placed": 10, "cancelled": 5}));
    let inbox: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox WHERE queue = $1")
        .bind(queue)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(inbox, 32, "one inbox row per distinct event");
    let groups = db.write_groups();
    if backend == Backend::Postgres {
        assert!(
            groups.calls("order_count") > groups.groups("order_count"),
            "the burst went in groups: {} calls in {} groups",
            groups.calls("order_count"),
            groups.groups("order_count")
        );
        assert_eq!(groups.fallbacks("order_count"), 0);
    } else {
        assert_eq!(
            groups.calls("order_count"),
            0,
            "SQLite's batch thread groups them"
        );
    }
    db.close().await;
}

shop_platform::backend_tests!(
    an_order_event_is_counted_once_however_often_it_arrives,
    a_burst_of_order_events_counts_each_event_once,
    registers_a_user_and_never_returns_the_password,
    generates_an_id_when_none_is_given,
    seed_walkthrough_post_user_then_get_by_query,
    lookups_that_find_nothing_or_lack_an_id,
    accepts_json_content_type_with_parameters,
    bad_input_on_post_users_is_refused_and_writes_nothing,
    bad_input_on_seed_route_is_refused_and_writes_nothing,
    oversize_body_is_413_json_and_writes_nothing,
    boundary_values_are_accepted,
    duplicate_id_and_email_are_409,
    emails_are_stored_trimmed_and_lower_cased,
    concurrent_registrations_with_one_email_create_exactly_one_user,
    password_is_stored_only_as_an_argon2id_phc_string,
    users_survive_a_restart,
    health_and_readiness_on_the_running_app,
);

/// The router and the OpenAPI document describe the same routes, both ways.
#[tokio::test]
async fn the_router_and_the_openapi_document_agree() {
    let h = Harness::new(Backend::Sqlite).await;
    shop_platform::testing::assert_router_matches_document(
        &h.router,
        &shop_user::openapi(),
        include_str!("../src/routes.rs"),
    )
    .await;
}
