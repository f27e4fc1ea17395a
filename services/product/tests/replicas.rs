//! The in-memory catalogue across replicas, over HTTP against real service instances:
//! the replica that writes reads its write back at once; another replica hears of it
//! through PostgreSQL's notifications (or, on SQLite, its change check) well inside the
//! re-read period; and a replica whose listener lost a notification, or whose database
//! restarted, catches up.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shop_platform::testing::{Backend, PgCluster, RunningApp, TestDatabase};
use shop_platform::{AuthConfig, ServerConfig, StorageConfig, backend_tests};
use sqlx::Connection;

/// Longer than any test: a change seen sooner came by notification or change check.
const NEVER: Duration = Duration::from_secs(3600);

async fn replica(storage: StorageConfig, resync: Duration) -> RunningApp {
    RunningApp::start(
        shop_product::build(shop_product::Config {
            server: ServerConfig::ephemeral(),
            storage,
            auth: AuthConfig::demo(),
            events: Default::default(),
            seed_products: true,
            catalogue_resync: resync,
        })
        .await
        .expect("the product service starts"),
    )
}

struct Client {
    http: reqwest::Client,
}

impl Client {
    fn new() -> Self {
        Self {
            http: reqwest::Client::new(),
        }
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = request.send().await.expect("the service answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("a body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON")
        };
        (status, headers, body)
    }

    async fn get(&self, app: &RunningApp, path: &str) -> (u16, reqwest::header::HeaderMap, Value) {
        self.send(self.http.get(format!("{}{path}", app.url))).await
    }

    async fn get_unless(
        &self,
        app: &RunningApp,
        path: &str,
        tag: &str,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        self.send(
            self.http
                .get(format!("{}{path}", app.url))
                .header("if-none-match", tag),
        )
        .await
    }

    async fn create(
        &self,
        app: &RunningApp,
        product: Value,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        self.send(
            self.http
                .post(format!("{}/products", app.url))
                .json(&product),
        )
        .await
    }

    async fn product(&self, app: &RunningApp, id: &str) -> Value {
        let (status, _, body) = self.get(app, &format!("/products/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn patch(&self, app: &RunningApp, id: &str, body: Value) -> (u16, Value) {
        let (status, _, body) = self
            .send(
                self.http
                    .patch(format!("{}/products/{id}", app.url))
                    .json(&body),
            )
            .await;
        (status, body)
    }

    async fn reserve(&self, app: &RunningApp, id: &str, product: &str, quantity: i64) -> Value {
        let (status, _, body) =
            self.send(self.http.post(format!("{}/reservations", app.url)).json(
                &json!({"id": id, "items": [{"product_id": product, "quantity": quantity}]}),
            ))
            .await;
        assert_eq!(status, 201, "{body}");
        body
    }

    /// Polls `app` until product `id` satisfies `done`; how long that took.
    async fn wait_for(
        &self,
        app: &RunningApp,
        id: &str,
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let (status, _, body) = self.get(app, &format!("/products/{id}")).await;
            if status == 200 && done(&body) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "product {id} not updated within {limit:?}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

fn in_listing(listing: &Value, id: &str) -> Value {
    listing
        .as_array()
        .expect("a JSON array")
        .iter()
        .find(|p| p["id"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

async fn the_writing_replica_reads_its_own_writes(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let app = replica(db.storage(), NEVER).await;
    let c = Client::new();

    let (_, headers, _) = c.get(&app, "/products/1").await;
    let first_tag = headers["etag"].to_str().unwrap().to_owned();
    for cents in 1..=20 {
        let price = f64::from(cents) / 100.0;
        let (status, body) = c.patch(&app, "1", json!({"price": price})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(c.product(&app, "1").await["price"], price);
        let (_, _, listing) = c.get(&app, "/products").await;
        assert_eq!(in_listing(&listing, "1")["price"], price);
    }

    let before = c.product(&app, "2").await["quantity"].as_i64().unwrap();
    c.reserve(&app, "r-1", "2", 3).await;
    assert_eq!(c.product(&app, "2").await["quantity"], before - 3);
    let (status, _, _) = c
        .send(c.http.delete(format!("{}/reservations/r-1", app.url)))
        .await;
    assert_eq!(status, 204);
    assert_eq!(c.product(&app, "2").await["quantity"], before);

    let (status, headers, body) = c
        .create(
            &app,
            json!({"id": "kb", "name": "Keyboard", "price": 49.9, "quantity": 5}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(headers.contains_key("etag"));
    let (_, _, listing) = c.get(&app, "/products").await;
    assert_eq!(in_listing(&listing, "kb")["name"], "Keyboard");

    // The tag moved with the writes; the old one no longer earns a 304.
    let (status, headers, body) = c.get_unless(&app, "/products/1", &first_tag).await;
    assert_eq!(status, 200, "{body}");
    let tag = headers["etag"].to_str().unwrap().to_owned();
    assert_ne!(tag, first_tag);
    let (status, _, body) = c.get_unless(&app, "/products/1", &tag).await;
    assert_eq!((status, body), (304, Value::Null));
    app.stop().await.unwrap();
}

/// PostgreSQL: only a notification can explain a change seen before the re-read. SQLite
/// has no notifications; its replicas check for other connections' commits instead.
async fn another_replica_sees_a_write_promptly(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let resync = match backend {
        Backend::Postgres => NEVER,
        Backend::Sqlite => Duration::from_millis(100),
    };
    let writer = replica(db.storage(), resync).await;
    let reader = replica(db.storage(), resync).await;
    let c = Client::new();

    let mut delays = Vec::new();
    for cents in 1..=10 {
        let price = f64::from(cents) / 100.0;
        let (status, body) = c.patch(&writer, "1", json!({"price": price})).await;
        assert_eq!(status, 200, "{body}");
        delays.push(
            c.wait_for(&reader, "1", Duration::from_secs(5), |p| {
                p["price"] == price
            })
            .await,
        );
    }
    let before = c.product(&reader, "2").await["quantity"].as_i64().unwrap();
    c.reserve(&writer, "r-2", "2", 4).await;
    delays.push(
        c.wait_for(&reader, "2", Duration::from_secs(5), |p| {
            p["quantity"] == before - 4
        })
        .await,
    );
    delays.sort();
    eprintln!(
        "{backend:?}: a write on one replica seen on another after {:?} (median), {:?} (max)",
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    writer.stop().await.unwrap();
    reader.stop().await.unwrap();
}

/// A product created on one replica a moment ago is found on another before that one
/// has heard of it: a miss in memory is looked up in the database, not answered 404.
async fn a_product_new_to_a_replica_is_looked_up_not_refused(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let writer = replica(db.storage(), NEVER).await;
    let reader = replica(db.storage(), NEVER).await;
    let c = Client::new();
    if backend == Backend::Postgres {
        // Stop the notifications, so only the look-up can explain a 200.
        let url = db.storage().database_url.unwrap();
        let mut psql = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql("ALTER TABLE products DISABLE TRIGGER products_announce")
            .execute(&mut psql)
            .await
            .unwrap();
    }
    let (status, _, body) = c
        .create(
            &writer,
            json!({"id": "new", "name": "New", "price": 1.5, "quantity": 3}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(c.product(&reader, "new").await["name"], "New");
    // Now held: the listing has it too, though no re-read ran.
    let (_, _, listing) = c.get(&reader, "/products").await;
    assert_eq!(in_listing(&listing, "new")["quantity"], 3);
    let (status, _, _) = c.get(&reader, "/products/none-such").await;
    assert_eq!(status, 404);
    writer.stop().await.unwrap();
    reader.stop().await.unwrap();
}

backend_tests!(
    the_writing_replica_reads_its_own_writes,
    another_replica_sees_a_write_promptly,
    a_product_new_to_a_replica_is_looked_up_not_refused,
);

/// An edit no notification announces (the trigger switched off, as if the notification
/// were lost) reaches a replica by its periodic re-read, and at once when its listener
/// reconnects.
#[tokio::test]
async fn a_lost_notification_is_made_good_by_the_re_read_and_by_reconnecting() {
    if shop_platform::testing::postgres_admin_url("a_lost_notification_is_made_good").is_none() {
        return;
    }
    let db = TestDatabase::new(Backend::Postgres).await;
    let url = db.storage().database_url.unwrap();
    let resyncing = replica(db.storage(), Duration::from_millis(300)).await;
    let listening_only = replica(db.storage(), NEVER).await;
    let c = Client::new();
    let mut psql = sqlx::PgConnection::connect(&url).await.unwrap();
    // Once an announced change reaches it, the replica's listener is up and its
    // start-up re-read done: from then on only a re-read brings an unannounced edit.
    let (status, body) = c.patch(&resyncing, "2", json!({"name": "Mouse 2"})).await;
    assert_eq!(status, 200, "{body}");
    c.wait_for(&listening_only, "2", Duration::from_secs(5), |p| {
        p["name"] == "Mouse 2"
    })
    .await;

    let unannounced = |name: &'static str| {
        format!(
            "ALTER TABLE products DISABLE TRIGGER products_announce;
             UPDATE products SET name = '{name}' WHERE id = '1';
             ALTER TABLE products ENABLE TRIGGER products_announce;"
        )
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(unannounced("Laptop Pro")))
        .execute(&mut psql)
        .await
        .unwrap();
    let took = c
        .wait_for(&resyncing, "1", Duration::from_secs(5), |p| {
            p["name"] == "Laptop Pro"
        })
        .await;
    eprintln!("an unannounced edit reached a replica re-reading every 300ms after {took:?}");
    assert_eq!(c.product(&listening_only, "1").await["name"], "Laptop");

    // Cut every listener: each re-reads on reconnecting.
    sqlx::raw_sql(sqlx::AssertSqlSafe(unannounced("Laptop Air")))
        .execute(&mut psql)
        .await
        .unwrap();
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%catalogue%'",
    )
    .fetch_all(&mut psql)
    .await
    .unwrap();
    assert_eq!(cut.len(), 2, "one catalogue listener per replica");
    let took = c
        .wait_for(&listening_only, "1", Duration::from_secs(10), |p| {
            p["name"] == "Laptop Air"
        })
        .await;
    eprintln!("a replica whose listener was cut caught up after {took:?}");

    // And it listens again: an announced change arrives without a re-read.
    let (status, body) = c.patch(&resyncing, "1", json!({"name": "Laptop Go"})).await;
    assert_eq!(status, 200, "{body}");
    c.wait_for(&listening_only, "1", Duration::from_secs(5), |p| {
        p["name"] == "Laptop Go"
    })
    .await;
    resyncing.stop().await.unwrap();
    listening_only.stop().await.unwrap();
}

/// Reservations made together are announced by the writer once committed, coalesced per
/// product, instead of by the trigger inside each commit: another replica still sees the
/// stock they left, promptly, and every notification on the channel is one of the
/// writer's announcements (with the trigger firing too, there would be more).
#[tokio::test]
async fn reservations_made_together_are_announced_after_commit_coalesced() {
    if shop_platform::testing::postgres_admin_url("reservations_made_together").is_none() {
        return;
    }
    let db = TestDatabase::new(Backend::Postgres).await;
    let url = db.storage().database_url.unwrap();
    let writer = replica(db.storage(), NEVER).await;
    let reader = replica(db.storage(), NEVER).await;
    let c = Client::new();
    let mut listener = sqlx::postgres::PgListener::connect(&url).await.unwrap();
    listener.listen("catalogue").await.unwrap();
    let before = c.product(&reader, "2").await["quantity"].as_i64().unwrap();

    let mut burst = tokio::task::JoinSet::new();
    for n in 0..24 {
        let (http, url) = (c.http.clone(), format!("{}/reservations", writer.url));
        burst.spawn(async move {
            let body = json!({"id": format!("together-{n}"), "items": [{"product_id": "2", "quantity": 1}]});
            http.post(url).json(&body).send().await.unwrap().status()
        });
    }
    while let Some(status) = burst.join_next().await {
        assert_eq!(status.unwrap(), 201);
    }
    let took = c
        .wait_for(&reader, "2", Duration::from_secs(5), |p| {
            p["quantity"] == before - 24
        })
        .await;
    eprintln!("24 reservations made together reached another replica after {took:?}");

    let announced = || {
        shop_platform::testing::metric_sum(
            &writer.url,
            "db_announcements_total",
            &[("channel", "catalogue"), ("result", "sent")],
        )
    };
    let sent = announced().await;
    let mut heard = Vec::new();
    while let Ok(Ok(note)) = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await
    {
        heard.push(serde_json::from_str::<Value>(note.payload()).unwrap());
    }
    assert_eq!(
        announced().await,
        sent,
        "every announcement was sent by now"
    );
    assert!(sent >= 1.0, "the reservations were announced");
    assert_eq!(heard.len() as f64, sent, "notifications heard: {heard:?}");
    assert!(
        heard.len() < 24,
        "coalesced: {} notifications for 24 reservations",
        heard.len()
    );
    assert_eq!(heard.last().unwrap()["quantity"], before - 24);
    writer.stop().await.unwrap();
    reader.stop().await.unwrap();
}

#[tokio::test]
async fn replicas_catch_up_after_the_database_restarts() {
    let Some(cluster) = PgCluster::start("replicas_catch_up_after_the_database_restarts") else {
        return;
    };
    let storage = StorageConfig {
        acquire_timeout: Duration::from_secs(1),
        ..StorageConfig::at_url(&cluster.url)
    };
    let writer = replica(storage.clone(), NEVER).await;
    let reader = replica(storage, NEVER).await;
    let c = Client::new();
    assert_eq!(c.product(&reader, "1").await["name"], "Laptop");

    cluster.stop();
    cluster.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = c.patch(&writer, "1", json!({"name": "Laptop 2"})).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes never recovered: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = c
        .wait_for(&reader, "1", Duration::from_secs(10), |p| {
            p["name"] == "Laptop 2"
        })
        .await;
    eprintln!("after a database restart, another replica saw a write after {took:?}");
    writer.stop().await.unwrap();
    reader.stop().await.unwrap();
}
