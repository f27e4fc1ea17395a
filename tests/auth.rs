//! Accounts and access, end to end: the real launcher (gateway and all three services,
//! authentication on by default), driven over HTTP the way clients and attackers would.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use shop_platform::auth::{KeyPair, Role, TokenSigner};

struct Shop {
    child: Child,
    gateway: String,
    order: String,
    dir: tempfile::TempDir,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Shop {
    fn start(env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_shop"))
            .env_clear()
            .env("DATA_DIR", dir.path())
            .env("GATEWAY_PORT", "0")
            .env("PRODUCT_PORT", "0")
            .env("ORDER_PORT", "0")
            .env("USER_PORT", "0")
            // Everything the set logs, debug included, is searched for secrets at the end.
            .env(
                "RUST_LOG",
                "debug,h2=info,hyper=info,hyper_util=info,reqwest=info",
            )
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let mut readers = Vec::new();
        let stdout = child.stdout.take().unwrap();
        {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let line = line.unwrap_or_default();
                    let _ = tx.send(line.clone());
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            }));
        }
        let mut stderr = child.stderr.take().unwrap();
        {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                log.lock().unwrap().push_str(&text);
            }));
        }
        let mut urls = std::collections::HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while urls.len() < 2 {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the launcher prints its URLs");
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [name @ ("gateway" | "order"), url] = words[..] {
                urls.insert(name.to_owned(), url.to_owned());
            }
        }
        Self {
            child,
            gateway: urls.remove("gateway").unwrap(),
            order: urls.remove("order").unwrap(),
            dir,
            log,
            readers,
        }
    }

    fn signing_key(&self) -> KeyPair {
        KeyPair::load(&self.dir.path().join("keys/jwt-ed25519.pem")).unwrap()
    }

    fn admin_password(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin-password"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Stops the set with Ctrl-C and returns everything it logged.
    fn stop(mut self) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status:?}");
                break;
            }
            assert!(Instant::now() < deadline, "launcher did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        let _keep_until_stopped = &self.dir;
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Shop {
    // A failed assertion must not leave the set running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn call(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let mut request = http.request(method, url).timeout(Duration::from_secs(10));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    };
    Reply {
        status,
        headers,
        body,
    }
}

async fn register(http: &reqwest::Client, shop: &Shop, id: &str, password: &str) {
    let r = call(
        http,
        Method::POST,
        &format!("{}/api/v1/users", shop.gateway),
        None,
        Some(json!({"id": id, "name": id, "email": format!("{id}@example.com"), "password": password})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["role"], "customer");
}

async fn login(http: &reqwest::Client, shop: &Shop, email: &str, password: &str) -> Reply {
    call(
        http,
        Method::POST,
        &format!("{}/api/v1/auth/login", shop.gateway),
        None,
        Some(json!({"email": email, "password": password})),
    )
    .await
}

async fn token_for(http: &reqwest::Client, shop: &Shop, email: &str, password: &str) -> String {
    let r = login(http, shop, email, password).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body["access_token"].as_str().unwrap().to_owned()
}

fn assert_refused(r: &Reply, status: StatusCode, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.body);
    assert!(r.body["error"]["code"].is_string(), "{what}: {}", r.body);
    assert_eq!(r.headers["cache-control"], "no-store", "{what}");
    if status == StatusCode::UNAUTHORIZED {
        let challenge = r.headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
    }
}

/// Tokens a client might try instead of a real one.
fn forgeries(shop: &Shop, real: &str) -> Vec<(&'static str, String)> {
    let key = shop.signing_key();
    let signer = TokenSigner::new(&key, "shop", "shop", Duration::from_secs(900));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = signer
        .issue_at("alice", Role::Admin, now - 3600)
        .access_token;
    let other_key = TokenSigner::new(
        &KeyPair::generate().unwrap(),
        "shop",
        "shop",
        Duration::from_secs(900),
    )
    .issue("alice", Role::Admin)
    .access_token;
    let parts: Vec<&str> = real.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["role"] = "admin".into();
    let forged_payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let alg_none = format!("{none_header}.{forged_payload}.");
    vec![
        ("expired", expired),
        ("signed by another key", other_key),
        ("tampered payload", tampered),
        ("alg none", alg_none),
        ("garbage", "not-a-jwt".to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_tokens_ownership_and_no_secret_in_any_log() {
    let shop = Shop::start(&[]);
    let http = reqwest::Client::new();
    let gw = shop.gateway.clone();
    let alice_password = "alice-pw-7c1e5b2a9d";
    let bob_password = "bob-pw-3f8a6e0c4b";
    register(&http, &shop, "alice", alice_password).await;
    register(&http, &shop, "bob", bob_password).await;

    // Nobody makes themselves an admin at registration.
    let r = call(
        &http,
        Method::POST,
        &format!("{}/api/v1/users", shop.gateway),
        None,
        Some(
            json!({"id": "mallory", "name": "m", "email": "m@example.com",
                    "password": "mallory-pw-1", "role": "admin"}),
        ),
    )
    .await;
    assert!(r.status.is_client_error(), "{}", r.body);
    assert_eq!(
        login(&http, &shop, "m@example.com", "mallory-pw-1")
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "the refused registration stored nothing"
    );

    // Login: the OAuth2 shape, never cached.
    let r = login(&http, &shop, "alice@example.com", alice_password).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["expires_in"], 900);
    assert_eq!(r.headers["cache-control"], "no-store");
    let alice = r.body["access_token"].as_str().unwrap().to_owned();
    let bob = token_for(&http, &shop, "bob@example.com", bob_password).await;
    let admin = token_for(&http, &shop, "admin@shop.local", &shop.admin_password()).await;

    // A wrong password and an unknown email get the same answer.
    let wrong = login(&http, &shop, "alice@example.com", "not-her-password").await;
    let unknown = login(&http, &shop, "nobody@example.com", alice_password).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.body, unknown.body);
    assert_eq!(wrong.status, unknown.status);

    // Alice places an order: the user comes from her token.
    let r = call(
        &http,
        Method::POST,
        &format!("{gw}/api/v1/orders"),
        Some(&alice),
        Some(json!({"products": ["1", "2"]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["user_id"], "alice");
    assert_eq!(r.body["total"], 1024.98);
    assert_eq!(r.headers["cache-control"], "no-store");
    let order = r.body["id"].as_str().unwrap().to_owned();
    let r = call(
        &http,
        Method::POST,
        &format!("{gw}/api/v1/orders"),
        Some(&bob),
        Some(json!({"items": [{"product_id": "2", "quantity": 1}]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let bobs_order = r.body["id"].as_str().unwrap().to_owned();

    // Her own things are hers to read.
    for path in [
        format!("/api/v1/orders/{order}"),
        "/api/v1/users/alice".to_owned(),
        "/api/users?id=alice".to_owned(),
        "/api/orders?user_id=alice".to_owned(),
    ] {
        let r = call(
            &http,
            Method::GET,
            &format!("{gw}{path}"),
            Some(&alice),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
    }
    let r = call(
        &http,
        Method::GET,
        &format!("{gw}/api/v1/orders"),
        Some(&alice),
        None,
    )
    .await;
    let ids: HashSet<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, HashSet::from([order.as_str()]), "only her own orders");

    // Bob tries to reach Alice's things, and to act as an admin: all refused.
    let attempts: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, format!("/api/v1/orders/{order}"), None),
        (Method::GET, "/api/v1/users/alice".into(), None),
        (Method::GET, "/api/users?id=alice".into(), None),
        (Method::GET, "/api/v1/orders?user_id=alice".into(), None),
        (Method::GET, "/api/orders?user_id=alice".into(), None),
        (
            Method::POST,
            "/api/v1/orders".into(),
            Some(json!({"user_id": "alice", "products": ["1"]})),
        ),
        (
            Method::POST,
            "/api/order".into(),
            Some(json!({"user_id": "alice", "products": ["1"]})),
        ),
        (
            Method::POST,
            "/api/v1/products".into(),
            Some(json!({"name": "Free", "price": 0.01, "quantity": 1})),
        ),
        (
            Method::PATCH,
            "/api/v1/products/1".into(),
            Some(json!({"price": 0.01})),
        ),
    ];
    for (method, path, body) in &attempts {
        let r = call(
            &http,
            method.clone(),
            &format!("{gw}{path}"),
            Some(&bob),
            body.clone(),
        )
        .await;
        assert_refused(&r, StatusCode::FORBIDDEN, &format!("bob {method} {path}"));
    }
    // Identity headers sent by a client are not believed.
    let r = http
        .get(format!("{gw}/api/v1/orders/{order}"))
        .bearer_auth(&bob)
        .header("x-user-id", "alice")
        .header("x-user-role", "admin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // The admin may read and write everything.
    for path in [
        format!("/api/v1/orders/{order}"),
        format!("/api/v1/orders/{bobs_order}"),
        "/api/v1/users/alice".to_owned(),
    ] {
        let r = call(
            &http,
            Method::GET,
            &format!("{gw}{path}"),
            Some(&admin),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "admin {path}: {}", r.body);
    }
    let r = call(
        &http,
        Method::GET,
        &format!("{gw}/api/v1/orders"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(r.body.as_array().unwrap().len(), 2, "{}", r.body);
    let r = call(
        &http,
        Method::POST,
        &format!("{gw}/api/v1/products"),
        Some(&admin),
        Some(json!({"name": "Keyboard", "price": 49.5, "quantity": 5})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);

    // The order's life: someone else's order is not found (its existence is not
    // confirmed), a customer cannot confirm, the owner cancels and the stock comes back
    // through the order.cancelled and stock.released events, the admin confirms.
    let r = call(
        &http,
        Method::POST,
        &format!("{gw}/api/v1/orders/{order}/cancel"),
        Some(&bob),
        None,
    )
    .await;
    assert_refused(&r, StatusCode::NOT_FOUND, "bob cancels alice's order");
    let r = call(
        &http,
        Method::POST,
        &format!("{gw}/api/v1/orders/{bobs_order}/confirm"),
        Some(&bob),
        None,
    )
    .await;
    assert_refused(&r, StatusCode::FORBIDDEN, "bob confirms his own order");
    let r = call(
        &http,
        Method::POST,
        &format!("{gw}/api/v1/orders/{order}/cancel"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["status"], "cancelled");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = call(
            &http,
            Method::GET,
            &format!("{gw}/api/v1/orders/{order}"),
            Some(&alice),
            None,
        )
        .await;
        if r.body["stock_returned_at"].is_string() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cancelled order's stock never came back: {}",
            r.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = call(
        &http,
        Method::POST,
        &format!("{gw}/api/v1/orders/{bobs_order}/confirm"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["status"], "confirmed");

    // Every protected route, with no token and with each forgery: 401, nothing done.
    let protected: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/api/v1/orders".into(), None),
        (Method::GET, format!("/api/v1/orders/{order}"), None),
        (
            Method::POST,
            "/api/v1/orders".into(),
            Some(json!({"products": ["1"]})),
        ),
        (Method::POST, format!("/api/v1/orders/{order}/cancel"), None),
        (
            Method::POST,
            format!("/api/v1/orders/{bobs_order}/confirm"),
            None,
        ),
        (Method::GET, "/api/orders?user_id=alice".into(), None),
        (
            Method::POST,
            "/api/order".into(),
            Some(json!({"user_id": "alice", "products": ["1"]})),
        ),
        (Method::GET, "/api/v1/users/alice".into(), None),
        (Method::GET, "/api/users?id=alice".into(), None),
        (
            Method::POST,
            "/api/v1/products".into(),
            Some(json!({"name": "X", "price": 1.0, "quantity": 1})),
        ),
        (
            Method::PATCH,
            "/api/v1/products/1".into(),
            Some(json!({"price": 0.01})),
        ),
        (
            Method::POST,
            "/api/products".into(),
            Some(json!({"name": "X", "price": 1.0, "quantity": 1})),
        ),
    ];
    let forged = forgeries(&shop, &alice);
    let mut tokens_seen: Vec<String> = vec![alice.clone(), bob.clone(), admin.clone()];
    for (method, path, body) in &protected {
        let r = call(
            &http,
            method.clone(),
            &format!("{gw}{path}"),
            None,
            body.clone(),
        )
        .await;
        assert_refused(
            &r,
            StatusCode::UNAUTHORIZED,
            &format!("no token {method} {path}"),
        );
        for (kind, token) in &forged {
            let r = call(
                &http,
                method.clone(),
                &format!("{gw}{path}"),
                Some(token),
                body.clone(),
            )
            .await;
            assert_refused(
                &r,
                StatusCode::UNAUTHORIZED,
                &format!("{kind} {method} {path}"),
            );
        }
    }
    tokens_seen.extend(forged.into_iter().map(|(_, t)| t));
    let r = call(
        &http,
        Method::GET,
        &format!("{gw}/api/v1/orders"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(r.body.as_array().unwrap().len(), 2, "no order slipped in");

    // Around the gateway: a service refuses identity headers its token does not back.
    let direct = http
        .get(format!("{}/orders/{order}", shop.order))
        .header("x-user-id", "alice")
        .header("x-user-role", "customer")
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), StatusCode::UNAUTHORIZED);
    let direct = http
        .get(format!("{}/orders/{order}", shop.order))
        .bearer_auth(&bob)
        .header("x-user-id", "alice")
        .header("x-user-role", "customer")
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), StatusCode::UNAUTHORIZED);

    // Public routes stay public, with the security headers; CORS is closed by default.
    let r = http
        .get(format!("{gw}/api/products"))
        .header("origin", "https://elsewhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    let jwks = call(
        &http,
        Method::GET,
        &format!("{gw}/.well-known/jwks.json"),
        None,
        None,
    )
    .await;
    assert_eq!(jwks.body["keys"][0]["alg"], "EdDSA");

    let admin_password = shop.admin_password();
    let log = shop.stop();
    assert!(
        log.contains("request completed"),
        "the access log was captured"
    );
    for secret in [alice_password, bob_password, admin_password.as_str()] {
        assert!(!log.contains(secret), "a password appears in the logs");
    }
    for token in &tokens_seen {
        // Any third of a token is already too much.
        for part in token.split('.').filter(|p| p.len() > 8) {
            assert!(!log.contains(part), "a token fragment appears in the logs");
        }
    }
    assert!(
        !log.to_lowercase().contains("bearer "),
        "an Authorization header was logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn login_throttling_kicks_in_and_recovers() {
    let shop = Shop::start(&[
        ("LOGIN_MAX_FAILURES_PER_ACCOUNT", "3"),
        ("LOGIN_MAX_FAILURES_PER_ADDRESS", "6"),
        ("LOGIN_THROTTLE_WINDOW", "2s"),
    ]);
    let http = reqwest::Client::new();
    let password = "carol-pw-91d2f7";
    register(&http, &shop, "carol", password).await;

    for _ in 0..3 {
        let r = login(&http, &shop, "carol@example.com", "guess").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    // Locked: even the right password waits, and is told how long.
    let r = login(&http, &shop, "carol@example.com", password).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "too_many_attempts");
    let retry_after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = login(&http, &shop, "carol@example.com", password).await;
    assert_eq!(r.status, StatusCode::OK, "the throttle lifts: {}", r.body);

    // Spraying many accounts from one address trips the per-address limit.
    let mut statuses = Vec::new();
    for i in 0..7 {
        let r = login(&http, &shop, &format!("spray{i}@example.com"), "guess").await;
        statuses.push(r.status.as_u16());
    }
    assert_eq!(
        statuses,
        [401, 401, 401, 401, 401, 401, 429],
        "{statuses:?}"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = login(&http, &shop, "carol@example.com", password).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    shop.stop();
}

#[test]
fn the_admin_password_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let shop = Shop::start(&[]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&shop.dir.path().join("admin-password")), 0o600);
    assert_eq!(mode(&shop.dir.path().join("keys/jwt-ed25519.pem")), 0o600);
    shop.stop();
}
