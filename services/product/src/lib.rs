//! Product service: the catalogue and its stock. Owns its own database; other services
//! take stock only through reservations.

pub mod domain;
pub mod routes;
pub mod storage;

use std::sync::Arc;

use shop_platform::config::{ConfigError, Env, ServerConfig, Var};
use shop_platform::{
    Application, AuthConfig, Authenticator, Binary, Metrics, Runtime, ServiceParts, Shutdown,
    StorageConfig,
};

pub use routes::{AppState, app, openapi};
pub use storage::{ProductStore, SqlProductStore};

pub const NAME: &str = "product";
pub const PORT: Var = Var::new("PORT", "8081", "Port to listen on.");
pub const SEED_PRODUCTS: Var = Var::new(
    "SEED_PRODUCTS",
    "true",
    "Add the demo products (1: Laptop, 2: Mouse) when the catalogue is empty.",
);

pub const BINARY: Binary = Binary {
    name: NAME,
    about: "Product service: catalogue, prices and stock reservations.",
    vars: &[
        ("Server", &ServerConfig::vars(PORT)),
        ("Storage", StorageConfig::VARS),
        ("Authentication", &AuthConfig::SERVICE_VARS),
        ("Product", &[SEED_PRODUCTS]),
    ],
    runtime: Runtime::MultiThread,
};

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub seed_products: bool,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            server: ServerConfig::from_env(env, &PORT)?,
            storage: StorageConfig::from_env(env)?,
            auth: AuthConfig::from_env(env)?,
            seed_products: env.flag(&SEED_PRODUCTS)?,
        })
    }
}

/// Opens storage, seeds it if asked, and binds the listener.
pub async fn build(config: Config) -> anyhow::Result<Application> {
    let metrics = Metrics::new(NAME);
    let db = config.storage.open(NAME, &storage::MIGRATIONS).await?;
    let store = Arc::new(SqlProductStore::new(&db));
    if config.seed_products {
        seed_demo_products(store.as_ref()).await?;
    }
    ServiceParts::new(NAME, config.server, metrics.clone())
        .database(db)
        .auth(Authenticator::new(&config.auth)?)
        .openapi(&openapi())
        .bind(app(AppState::new(store, &metrics)))
        .await
}

pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    build(config).await?.run(shutdown).await
}

/// Seeds the demo catalogue once; replicas starting together may race, and the loser's
/// duplicate insert is harmless.
pub async fn seed_demo_products(store: &dyn ProductStore) -> anyhow::Result<()> {
    if !store.is_empty().await? {
        return Ok(());
    }
    for product in domain::demo_products() {
        match store.create(&product).await {
            Ok(()) | Err(storage::StoreError::DuplicateId(_)) => {}
            Err(err) => return Err(err.into()),
        }
    }
    tracing::info!("seeded the demo products");
    Ok(())
}
