//! Order service: places orders against the product and user services and keeps them in
//! its own database.

pub mod checkout;
pub mod domain;
pub mod routes;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use shop_platform::config::{ConfigError, Env, ServerConfig, Var};
use shop_platform::{
    Application, Binary, Metrics, Runtime, ServiceClient, ServiceParts, Shutdown, StorageConfig,
};

pub use routes::{AppState, app};
pub use storage::{OrderStore, SqliteOrderStore};

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

pub const BINARY: Binary = Binary {
    name: NAME,
    about: "Order service: places orders (priced and stock-checked by the product service) and lists them.",
    vars: &[
        ("Server", &ServerConfig::vars(PORT)),
        ("Storage", StorageConfig::VARS),
        ("Dependencies", &[PRODUCT_URL, USER_URL, UPSTREAM_TIMEOUT]),
    ],
    runtime: Runtime::MultiThread,
};

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub product_url: String,
    pub user_url: String,
    pub upstream_timeout: Duration,
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
            product_url: env.parse_with(&PRODUCT_URL, http_url)?,
            user_url: env.parse_with(&USER_URL, http_url)?,
            upstream_timeout: env.duration(&UPSTREAM_TIMEOUT)?,
        })
    }
}

pub async fn build(config: Config) -> anyhow::Result<Application> {
    let metrics = Metrics::new(NAME);
    let pool = config.storage.open_sqlite(NAME, &storage::MIGRATOR).await?;
    let store = Arc::new(SqliteOrderStore::new(pool.clone()));
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
    ServiceParts::new(NAME, config.server, metrics)
        .database(pool)
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
