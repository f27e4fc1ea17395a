//! Order service: places orders against the product and user services and keeps them in
//! its own database.

pub mod checkout;
pub mod consumers;
pub mod domain;
pub mod routes;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use shop_platform::config::{ConfigError, Env, ServerConfig, Var};
use shop_platform::events::{Broker, EventMetrics, Outbox};
use shop_platform::{
    Application, AuthConfig, Authenticator, Binary, Metrics, Runtime, ServiceClient, ServiceParts,
    Shutdown, StorageConfig,
};

pub use routes::{AppState, app, openapi};
pub use storage::{OrderStore, SqlOrderStore};

pub const NAME: &str = "order";
pub const PORT: Var = Var::new("PORT", "8082", "Port to listen on.");
pub const PRODUCT_URL: Var = Var::new(
    "PRODUCT_URL",
    "http://127.0.0.1:8081",
    "Base URL of the product service.",
);
pub const USER_URL: Var = Var::new(
    "USER_URL",
    "http://127.0.0.1:8083",
    "Base URL of the user service.",
);
pub const UPSTREAM_TIMEOUT: Var = Var::new(
    "UPSTREAM_TIMEOUT",
    "3s",
    "Longest wait for one call to another service before answering 503.",
);

pub const CHECKOUT_TIMEOUT: Var = Var::new(
    "CHECKOUT_TIMEOUT",
    "30s",
    "A checkout that has not stored its order after this long is rolled back and its reserved stock released. Must exceed REQUEST_TIMEOUT.",
);

pub const BINARY: Binary = Binary {
    name: NAME,
    about: "Order service: places orders (priced and stock-checked by the product service) and lists them.",
    vars: &[
        ("Server", &ServerConfig::vars(PORT)),
        ("Storage", StorageConfig::VARS),
        ("Authentication", &AuthConfig::SERVICE_VARS),
        ("Dependencies", &[PRODUCT_URL, USER_URL, UPSTREAM_TIMEOUT]),
        ("Events", &[Broker::AMQP_URL]),
        ("Orders", &[CHECKOUT_TIMEOUT]),
    ],
    runtime: Runtime::MultiThread,
};

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub product_url: String,
    pub user_url: String,
    pub upstream_timeout: Duration,
    pub checkout_timeout: Duration,
    /// Where events go: RabbitMQ, or in-process (a broker the launcher shares).
    pub events: Broker,
}

fn http_url(value: &str) -> Result<String, String> {
    let v = value.trim();
    // In-cluster calls are plain HTTP (a mesh adds mTLS); the client has no TLS stack.
    let rest = v
        .strip_prefix("http://")
        .ok_or("must start with http:// (service-to-service calls are plain HTTP)")?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err("must name a host".to_owned());
    }
    Ok(v.trim_end_matches('/').to_owned())
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            server: ServerConfig::from_env(env, &PORT)?,
            storage: StorageConfig::from_env(env)?,
            auth: AuthConfig::from_env(env)?,
            product_url: env.parse_with(&PRODUCT_URL, http_url)?,
            user_url: env.parse_with(&USER_URL, http_url)?,
            upstream_timeout: env.duration(&UPSTREAM_TIMEOUT)?,
            checkout_timeout: env.duration(&CHECKOUT_TIMEOUT)?,
            events: Broker::from_env(env)?,
        })
    }
}

pub async fn build(config: Config) -> anyhow::Result<Application> {
    let metrics = Metrics::new(NAME);
    let db = config.storage.open(NAME, &storage::MIGRATIONS).await?;
    db.write_groups().register(&metrics);
    let outbox = Outbox::default();
    let store = Arc::new(SqlOrderStore::new(&db, outbox.clone()));
    let event_metrics = EventMetrics::new(
        &metrics,
        &["order.placed", "order.confirmed", "order.cancelled"],
        &[consumers::StockReleased::queue()],
    );
    let events = config.events.start(
        NAME,
        &db,
        Some(&outbox),
        event_metrics,
        vec![Arc::new(consumers::StockReleased {
            store: store.clone(),
        })],
    );
    let products = ServiceClient::new(
        "product",
        &config.product_url,
        config.upstream_timeout,
        metrics.clone(),
    )?;
    let users = ServiceClient::new(
        "user",
        &config.user_url,
        config.upstream_timeout,
        metrics.clone(),
    )?;
    let state = AppState::new(store, products.clone(), users.clone(), &metrics);
    let recovery = spawn_recovery(state.clone(), config.checkout_timeout);
    ServiceParts::new(NAME, config.server, metrics)
        .database(db)
        .auth(Authenticator::new(&config.auth)?)
        .openapi(&openapi())
        .on_close(async move {
            recovery.abort();
            events.stop();
        })
        .readiness_check("product", move || {
            let products = products.clone();
            async move { products.check_health().await }
        })
        .readiness_check("user", move || {
            let users = users.clone();
            async move { users.check_health().await }
        })
        .bind(app(state))
        .await
}

pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    build(config).await?.run(shutdown).await
}

/// Every replica runs the recovery loop: at start-up (a previous process may have died
/// mid-checkout) and then a few times per `CHECKOUT_TIMEOUT`.
fn spawn_recovery(state: AppState, timeout: Duration) -> tokio::task::JoinHandle<()> {
    let every = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
    tokio::spawn(async move {
        loop {
            if let Err(err) = checkout::recover_abandoned(&state, timeout).await {
                tracing::warn!(error = %err.message, "checkout recovery failed; will retry");
            }
            tokio::time::sleep(every).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_are_checked_at_startup() {
        let env = |url: &str| Env::from_pairs([("PRODUCT_URL", url.to_owned())]);
        let ok = Config::from_env(&env("http://product:8081/")).unwrap();
        assert_eq!(ok.product_url, "http://product:8081");
        for bad in ["product:8081", "https://product", "http://", "ftp://x"] {
            let err = Config::from_env(&env(bad)).unwrap_err();
            assert_eq!(err.var, "PRODUCT_URL", "{bad}");
        }
    }
}
