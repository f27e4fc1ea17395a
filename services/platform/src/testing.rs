//! Test harness shared by the service crates (feature `testing`): run a real
//! [`Application`] on port 0, or drive a router in-process with `oneshot`.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

pub use crate::db::Backend;
use crate::db::{Database, Migrations, StorageConfig};
use crate::server::Application;
use crate::shutdown::Shutdown;

/// A service serving on loopback until [`RunningApp::stop`].
pub struct RunningApp {
    pub addr: SocketAddr,
    pub url: String,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningApp {
    pub fn start(app: Application) -> Self {
        let addr = app.local_addr();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(app.run(shutdown.clone()));
        Self {
            addr,
            url: format!("http://{addr}"),
            shutdown,
            task,
        }
    }

    /// Starts the graceful shutdown (as SIGTERM does) without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.trigger();
    }

    /// Triggers the graceful shutdown and waits for it to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        self.task.await?
    }
}

/// A decoded answer from [`call`].
#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl TestResponse {
    /// The `error.code` of a JSON error body.
    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn error_field(&self) -> &str {
        self.body["error"]["field"].as_str().unwrap_or("")
    }
}

/// Sends one request through `router` with `oneshot`. A `&str` body is sent raw (for
/// malformed input), a `Value` as JSON.
pub async fn call(
    router: &Router,
    method: Method,
    uri: &str,
    body: impl Into<TestBody>,
) -> TestResponse {
    call_with_headers(router, method, uri, &[], body).await
}

/// [`call`] with extra request headers (credentials, `Idempotency-Key`, ...).
pub async fn call_with_headers(
    router: &Router,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<TestBody>,
) -> TestResponse {
    let mut request = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = match body.into() {
        TestBody::Empty => Body::empty(),
        TestBody::Json(value) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(value.to_string())
        }
        TestBody::Raw(content_type, bytes) => {
            if let Some(ct) = content_type {
                request = request.header(header::CONTENT_TYPE, ct);
            }
            Body::from(bytes)
        }
    };
    let response = router
        .clone()
        .oneshot(request.body(body).expect("valid request"))
        .await
        .expect("router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body readable")
        .to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    TestResponse {
        status,
        headers,
        body,
    }
}

pub enum TestBody {
    Empty,
    Json(Value),
    Raw(Option<&'static str>, Vec<u8>),
}

impl From<()> for TestBody {
    fn from(_: ()) -> Self {
        TestBody::Empty
    }
}

impl From<Value> for TestBody {
    fn from(value: Value) -> Self {
        TestBody::Json(value)
    }
}

/// Raw bytes labelled as JSON: for malformed-input tests.
impl From<&str> for TestBody {
    fn from(text: &str) -> Self {
        TestBody::Raw(Some("application/json"), text.as_bytes().to_vec())
    }
}

/// PostgreSQL tests are mandatory in CI (`CI` set) and under `./scripts/test`
/// (`SHOP_TEST_POSTGRES=required`); a developer's plain `cargo test` may lack a server.
pub fn postgres_required() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "false");
    set("CI") || std::env::var("SHOP_TEST_POSTGRES").is_ok_and(|v| v == "required")
}

/// The admin URL of the PostgreSQL server for tests (`TEST_DATABASE_URL`). Without one,
/// a required run fails here; otherwise the test is skipped with the reason printed.
pub fn postgres_admin_url(test: &str) -> Option<String> {
    match std::env::var("TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if postgres_required() => panic!(
            "{test}: PostgreSQL tests are required here (CI or SHOP_TEST_POSTGRES=required) \
             but TEST_DATABASE_URL is not set; ./scripts/test starts a throwaway server"
        ),
        _ => {
            skipped(&format!(
                "{test} on PostgreSQL: TEST_DATABASE_URL is not set \
                 (./scripts/test starts a throwaway server and sets it)"
            ));
            None
        }
    }
}

/// Says so on the real stderr: the test harness captures `eprintln!` of passing tests,
/// and a skip must not pass silently.
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {why}");
}

/// Runs each listed `async fn name(backend: Backend)` once per backend, as
/// `sqlite::name` and `postgres::name`: one behavioural suite for both.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::testing::Backend::Sqlite).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    if $crate::testing::postgres_admin_url(stringify!($name)).is_some() {
                        super::$name($crate::testing::Backend::Postgres).await
                    }
                }
            )+
        }
    };
}

/// A database of its own for one test: a temporary SQLite directory, or a fresh
/// PostgreSQL database created from the admin URL and dropped afterwards.
pub struct TestDatabase {
    storage: StorageConfig,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

impl TestDatabase {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = temp_dir();
                Self {
                    storage: StorageConfig::in_dir(dir.path()),
                    _dir: Some(dir),
                    postgres: None,
                }
            }
            Backend::Postgres => {
                use sqlx::{ConnectOptions, Connection};
                let admin = postgres_admin_url("TestDatabase")
                    .expect("PostgreSQL tests run only with TEST_DATABASE_URL set");
                let name = format!("shop_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("connect to TEST_DATABASE_URL");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                    .execute(&mut conn)
                    .await
                    .expect("create a test database");
                conn.close().await.ok();
                let url = admin
                    .parse::<sqlx::postgres::PgConnectOptions>()
                    .expect("TEST_DATABASE_URL parses")
                    .database(&name)
                    .to_url_lossy()
                    .to_string();
                // DATA_DIR still matters beside a URL (the user service keeps keys there).
                let dir = temp_dir();
                Self {
                    storage: StorageConfig {
                        data_dir: dir.path().to_owned(),
                        ..StorageConfig::at_url(url)
                    },
                    _dir: Some(dir),
                    postgres: Some((admin, name)),
                }
            }
        }
    }

    /// Settings that open this database.
    pub fn storage(&self) -> StorageConfig {
        self.storage.clone()
    }

    /// Opens it as a service does but with no migrations, for tests of the plumbing.
    pub async fn open_bare(&self) -> Database {
        let none = Migrations {
            sqlite: sqlx::migrate::Migrator::DEFAULT,
            postgres: sqlx::migrate::Migrator::DEFAULT,
        };
        self.storage
            .open("test", &none)
            .await
            .expect("open the test database")
    }

    /// The PostgreSQL database's name; `None` on SQLite.
    pub fn postgres_name(&self) -> Option<&str> {
        self.postgres.as_ref().map(|(_, name)| name.as_str())
    }

    /// The environment a service binary needs to open this database.
    pub fn env(&self) -> (&'static str, String) {
        match &self.storage.database_url {
            Some(url) => ("DATABASE_URL", url.clone()),
            None => ("DATA_DIR", self.storage.data_dir.display().to_string()),
        }
    }
}

/// A private server run by one of our scripts (`start` prints `DIR URL`; `stop DIR`,
/// `start DIR` and `destroy DIR` follow), that a test may stop and start, destroyed on
/// drop.
pub struct ScriptedServer {
    script: &'static str,
    dir: String,
    pub url: String,
}

impl ScriptedServer {
    /// `None` (skip, reason printed) when the script cannot start one, unless `required`.
    fn start(script: &'static str, what: &str, test: &str, required: bool) -> Option<Self> {
        let output = std::process::Command::new(script)
            .arg("start")
            .output()
            .unwrap_or_else(|err| panic!("run {script}: {err}"));
        if !output.status.success() {
            let why = String::from_utf8_lossy(&output.stderr);
            assert!(
                !required,
                "{test}: {what} tests are required but no server could be started: {why}"
            );
            skipped(&format!("{test}: cannot start a {what} server: {why}"));
            return None;
        }
        let line = String::from_utf8(output.stdout).expect("utf-8");
        let (dir, url) = line.trim().split_once(' ').expect("DIR URL");
        Some(Self {
            script,
            dir: dir.to_owned(),
            url: url.to_owned(),
        })
    }

    /// Stops the server, as in an outage: connections drop, its data stays.
    pub fn stop(&self) {
        self.run("stop");
    }

    /// Starts the stopped server again on the same port and data.
    pub fn restart(&self) {
        self.run("start");
    }

    fn run(&self, action: &str) {
        let status = std::process::Command::new(self.script)
            .args([action, &self.dir])
            .status()
            .unwrap_or_else(|err| panic!("run {}: {err}", self.script));
        assert!(status.success(), "{} {action} failed", self.script);
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        let _ = std::process::Command::new(self.script)
            .args(["destroy", &self.dir])
            .status();
    }
}

/// A private PostgreSQL server (`scripts/pg-cluster`; fast shutdown on `stop`), for
/// tests of outages and restarts.
pub struct PgCluster;

impl PgCluster {
    pub fn start(test: &str) -> Option<ScriptedServer> {
        const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/pg-cluster");
        ScriptedServer::start(SCRIPT, "PostgreSQL", test, postgres_required())
    }
}

/// Are the RabbitMQ tests required to run (`SHOP_TEST_RABBITMQ=required`, set by
/// ./scripts/test), rather than skipped where no server is installed?
pub fn rabbitmq_required() -> bool {
    std::env::var("SHOP_TEST_RABBITMQ").is_ok_and(|v| v == "required")
}

/// A private RabbitMQ node (`scripts/rabbitmq-node`).
pub struct RabbitMq;

impl RabbitMq {
    pub fn start(test: &str) -> Option<ScriptedServer> {
        const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/rabbitmq-node");
        ScriptedServer::start(SCRIPT, "RabbitMQ", test, rabbitmq_required())
    }
}

/// The sum of `name`'s samples in `base_url`'s `/metrics` whose labels include each of
/// `matching`.
pub async fn metric_sum(base_url: &str, name: &str, matching: &[(&str, &str)]) -> f64 {
    let text = reqwest::get(format!("{base_url}/metrics"))
        .await
        .expect("scrape /metrics")
        .text()
        .await
        .expect("read /metrics");
    parse_exposition(&text)
        .expect("valid exposition")
        .samples_of(name)
        .filter(|s| {
            matching
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Waits until `metric_sum` reads `expected` (counters are bumped after the effects a test
/// can see, so an exact read right after those effects races them); panics after 10 s
/// with the last value read.
pub async fn metric_reaches(base_url: &str, name: &str, matching: &[(&str, &str)], expected: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let value = metric_sum(base_url, name, matching).await;
        if value == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}{matching:?} stayed at {value}, expected {expected}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // Drop runs outside any runtime guarantee; a short-lived one does the cleanup.
        let _ = std::thread::spawn(move || {
            use sqlx::Connection;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                        .execute(&mut conn)
                        .await;
                }
            })
        })
        .join();
    }
}

/// A service binary started by a test, with `LOG_FORMAT=json` on stdout.
pub struct ServiceProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    /// Every stdout line after the `listening` one; read on a thread so the child never
    /// blocks on a full pipe.
    pub logs: std::sync::mpsc::Receiver<String>,
}

impl ServiceProcess {
    /// Spawns `command` and waits (up to 30 s) for its `listening` log line.
    pub fn spawn(command: &mut std::process::Command) -> Self {
        use std::io::BufRead;
        let mut child = command
            .env("LOG_FORMAT", "json")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the service binary");
        let (tx, logs) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let addr = loop {
            let Ok(line) =
                logs.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            else {
                // Not left running (and holding the test's output open) after the panic.
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the service did not log its `listening` line within 30 s (is RUST_LOG hiding info from shop_platform::server?)"
                );
            };
            let entry: Value = serde_json::from_str(&line).expect("log lines are JSON");
            if entry["message"] == "listening" {
                break entry["address"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .expect("a socket address");
            }
        };
        Self { child, addr, logs }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh directory for a test's database, removed on drop.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

/// A loopback address where nothing listens: for "dependency down" tests.
pub fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Parsed `/metrics` output: `# TYPE` per family and every sample.
#[derive(Debug, Default)]
pub struct Exposition {
    pub types: std::collections::BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    pub fn samples_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    pub fn label_values(&self, name: &str, label: &str) -> std::collections::BTreeSet<String> {
        self.samples_of(name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    }
}

/// A strict parser for the Prometheus text exposition format (0.0.4): label values may
/// hold any character (route templates contain braces), escapes are `\\`, `\"`, `\n`.
pub fn parse_exposition(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    for (number, line) in text.lines().enumerate() {
        let fail = |why: &str| format!("line {}: {why}: {line}", number + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| fail("bad TYPE"))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(fail("unknown type"));
            }
            out.types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .ok_or_else(|| fail("no value"))?;
        let name = &line[..name_end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(fail("bad metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = std::collections::BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            loop {
                while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                    chars.next();
                }
                match chars.peek() {
                    Some((i, '}')) => {
                        rest = &body[i + 1..];
                        break;
                    }
                    None => return Err(fail("unterminated labels")),
                    _ => {}
                }
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(fail("label value not quoted"));
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c @ ('\\' | '"'))) => value.push(c),
                            _ => return Err(fail("bad escape")),
                        },
                        Some((_, '"')) => break,
                        Some((_, c)) => value.push(c),
                        None => return Err(fail("unterminated label value")),
                    }
                }
                labels.insert(key, value);
            }
        }
        let value_text = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| fail("no value"))?;
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| fail("bad value"))?,
        };
        out.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// Checks a service's router (with the production stack) against its OpenAPI document,
/// both ways: every documented operation is routed; every other method on a documented
/// path is refused as the router's own 405; a path the document does not have is the
/// router's own 404; and the routes source adds routes only through `routes!` (from the
/// handlers' annotations), never through plain `.route(...)` calls the document would
/// not know about.
pub async fn assert_router_matches_document(router: &Router, doc: &Value, routes_source: &str) {
    for call_site in [
        ".route(",
        ".route_service(",
        ".nest(",
        ".nest_service(",
        ".merge(",
    ] {
        assert!(
            !routes_source.contains(call_site),
            "routes.rs adds a route with {call_site}...): it would be missing from the OpenAPI document; use routes!(handler) with #[utoipa::path]"
        );
    }
    let unrouted = |r: &TestResponse| {
        (r.status == StatusCode::NOT_FOUND && r.body["error"]["message"] == "not found")
            || r.status == StatusCode::METHOD_NOT_ALLOWED
    };
    let paths = doc["paths"].as_object().expect("a document with paths");
    assert!(!paths.is_empty(), "the document has no paths");
    for (path, item) in paths {
        // Served by the platform around every router (tested with it), not by this one.
        if crate::openapi::PLATFORM_PATHS.contains(&path.as_str()) {
            continue;
        }
        let concrete = path.replace('{', "x").replace('}', "");
        let concrete = concrete.as_str();
        for method in [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ] {
            let documented = item.get(method.as_str().to_ascii_lowercase()).is_some();
            let r = call(router, method.clone(), concrete, ()).await;
            if documented {
                assert!(
                    !unrouted(&r),
                    "{method} {path} is documented but not routed: {} {}",
                    r.status,
                    r.body
                );
            } else {
                assert_eq!(
                    r.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is routed but not documented: {}",
                    r.body
                );
            }
        }
        let beyond = format!("{concrete}/undocumented-segment");
        if !paths
            .keys()
            .any(|template| template_matches(template, &beyond))
        {
            let r = call(router, Method::GET, &beyond, ()).await;
            assert!(
                unrouted(&r),
                "GET {beyond} answers but no such path is documented"
            );
        }
    }
}

fn template_matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| t == p || (t.starts_with('{') && t.ends_with('}')))
}

/// A SQLite database in a directory of its own, migrated up to `version` and no further,
/// with foreign keys enforced as the services' sessions enforce them: for testing how a
/// later migration treats the rows of an older schema.
pub async fn sqlite_migrated_to(
    migrator: &sqlx::migrate::Migrator,
    version: i64,
) -> (tempfile::TempDir, sqlx::AnyConnection) {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let dir = temp_dir();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("test.db").display());
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("PRAGMA foreign_keys = ON")
        .execute(&mut conn)
        .await
        .unwrap();
    migrator.run_to(version, &mut conn).await.unwrap();
    (dir, conn)
}

/// Commits `sql` in a transaction of its own on `conn` and says whether SQLite refused
/// the commit for a foreign key (a deferred one is checked only then); a commit refused
/// for anything else fails the test here.
pub async fn commit_breaks_a_foreign_key(conn: &mut sqlx::AnyConnection, sql: &str) -> bool {
    use sqlx::Connection;
    let mut tx = conn.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *tx)
        .await
        .expect("a deferred key does not refuse the statement itself");
    match tx.commit().await {
        Ok(()) => false,
        Err(err) => {
            assert!(
                matches!(
                    err.as_database_error().map(|e| e.kind()),
                    Some(sqlx::error::ErrorKind::ForeignKeyViolation)
                ),
                "the commit failed, but not for a foreign key: {err}"
            );
            true
        }
    }
}
