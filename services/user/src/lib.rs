//! User service: accounts. Owns its own database; passwords are stored only as argon2id
//! hashes and never returned.

pub mod domain;
pub mod routes;
pub mod storage;

use std::sync::Arc;

use shop_platform::config::{ConfigError, Env, ServerConfig, Var};
use shop_platform::{Application, Binary, Metrics, Runtime, ServiceParts, Shutdown, StorageConfig};

pub use routes::{AppState, app};
pub use storage::{SqlUserStore, UserStore};

pub const NAME: &str = "user";
pub const PORT: Var = Var::new("PORT", "8083", "Port to listen on.");

pub const BINARY: Binary = Binary {
    name: NAME,
    about: "User service: registration and account lookup.",
    vars: &[
        ("Server", &ServerConfig::vars(PORT)),
        ("Storage", StorageConfig::VARS),
    ],
    runtime: Runtime::MultiThread,
};

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            server: ServerConfig::from_env(env, &PORT)?,
            storage: StorageConfig::from_env(env)?,
        })
    }
}

pub async fn build(config: Config) -> anyhow::Result<Application> {
    let metrics = Metrics::new(NAME);
    let db = config.storage.open(NAME, &storage::MIGRATIONS).await?;
    let store = Arc::new(SqlUserStore::new(&db));
    ServiceParts::new(NAME, config.server, metrics.clone())
        .database(db)
        .bind(app(AppState::new(store, &metrics)))
        .await
}

pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    build(config).await?.run(shutdown).await
}
