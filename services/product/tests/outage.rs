//! The database goes away while the service runs (PostgreSQL stopped with sessions
//! terminated, as in an outage or a failover): catalogue reads go on from memory, writes
//! get 503 JSON and `/ready` says which dependency fails; when the database returns,
//! writes and readiness recover without a restart.

use std::time::{Duration, Instant};

use serde_json::Value;
use shop_platform::testing::{PgCluster, RunningApp};
use shop_platform::{ServerConfig, StorageConfig};

async fn get(http: &reqwest::Client, url: String) -> (u16, Value) {
    let response = http
        .get(url)
        .send()
        .await
        .expect("the service itself answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

async fn reserve(http: &reqwest::Client, base: &str, id: &str) -> (u16, Value) {
    let response = http
        .post(format!("{base}/reservations"))
        .json(&serde_json::json!({"id": id, "items": [{"product_id": "1", "quantity": 1}]}))
        .send()
        .await
        .expect("the service itself answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

#[tokio::test]
async fn requests_and_readiness_recover_when_the_database_returns() {
    let Some(cluster) =
        PgCluster::start("requests_and_readiness_recover_when_the_database_returns")
    else {
        return;
    };
    let storage = StorageConfig {
        acquire_timeout: Duration::from_secs(1),
        ..StorageConfig::at_url(&cluster.url)
    };
    let app = RunningApp::start(
        shop_product::build(shop_product::Config {
            server: ServerConfig::ephemeral(),
            storage,
            seed_products: true,
            catalogue_resync: std::time::Duration::from_secs(1),
            auth: shop_platform::AuthConfig::demo(),
            events: Default::default(),
        })
        .await
        .unwrap(),
    );
    let http = reqwest::Client::new();
    assert_eq!(get(&http, format!("{}/products", app.url)).await.0, 200);
    assert_eq!(get(&http, format!("{}/ready", app.url)).await.0, 200);

    cluster.stop();
    // Reads come from the in-memory catalogue and go on; a write needs the database.
    let (status, body) = get(&http, format!("{}/products/1", app.url)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "Laptop");
    let started = Instant::now();
    let (status, body) = reserve(&http, &app.url, "during-outage").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "dependency_unavailable", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered promptly"
    );
    let (status, body) = get(&http, format!("{}/ready", app.url)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["checks"]["database"]["status"], "failing", "{body}");
    let (status, body) = get(&http, format!("{}/health", app.url)).await;
    assert_eq!(status, 200, "liveness does not follow the database: {body}");

    cluster.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = get(&http, format!("{}/ready", app.url)).await.0;
        // 201 when this call took the unit, 200 when an earlier one did (the same id
        // again: a replay) while readiness had not yet caught up.
        let reserved = reserve(&http, &app.url, "after-outage").await;
        if ready == 200 && matches!(reserved.0, 200 | 201) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not recovered: /ready {ready}, reservation {reserved:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The unit taken after the outage shows in the catalogue at once.
    let (_, body) = get(&http, format!("{}/products/1", app.url)).await;
    assert_eq!(body["quantity"], 9, "{body}");
    app.stop().await.unwrap();
}
