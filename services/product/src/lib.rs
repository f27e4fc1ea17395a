//! Product service: the catalogue and its stock. Owns its own database; other services
//! take stock only through reservations.

pub mod catalogue;
pub mod consumers;
pub mod domain;
pub mod routes;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use shop_platform::config::{ConfigError, Env, ServerConfig, Var};
use shop_platform::events::{Broker, EventMetrics, Outbox};
use shop_platform::{
    Application, AuthConfig, Authenticator, Binary, Metrics, Runtime, ServiceParts, Shutdown,
    StorageConfig,
};

pub use catalogue::Catalogue;
pub use routes::{AppState, app, openapi};
pub use storage::{ProductStore, SqlProductStore};

pub const NAME: &str = "product";
pub const PORT: Var = Var::new("PORT", "8081", "Port to listen on.");
pub const SEED_PRODUCTS: Var = Var::new(
    "SEED_PRODUCTS",
    "true",
    "Add the demo products (1: Laptop, 2: Mouse) when the catalogue is empty.",
);
pub const CATALOGUE_RESYNC: Var = Var::new(
    "CATALOGUE_RESYNC",
    "1s",
    "Catalogue reads come from memory. PostgreSQL announces each change at once; this is how often a replica also re-reads the whole catalogue, the longest a lost announcement can leave it stale. SQLite: how often to check for writes by other processes.",
);

pub const BINARY: Binary = Binary {
    name: NAME,
    about: "Product service: catalogue, prices and stock reservations.",
    vars: &[
        ("Server", &ServerConfig::vars(PORT)),
        ("Storage", StorageConfig::VARS),
        ("Authentication", &AuthConfig::SERVICE_VARS),
        ("Product", &[SEED_PRODUCTS, CATALOGUE_RESYNC]),
        ("Events", &[Broker::AMQP_URL]),
    ],
    runtime: Runtime::MultiThread,
};

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub seed_products: bool,
    pub catalogue_resync: Duration,
    /// Where events go: RabbitMQ, or in-process (a broker the launcher shares).
    pub events: Broker,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            server: ServerConfig::from_env(env, &PORT)?,
            storage: StorageConfig::from_env(env)?,
            auth: AuthConfig::from_env(env)?,
            seed_products: env.flag(&SEED_PRODUCTS)?,
            catalogue_resync: positive(env.duration(&CATALOGUE_RESYNC)?)?,
            events: Broker::from_env(env)?,
        })
    }
}

fn positive(interval: Duration) -> Result<Duration, ConfigError> {
    if interval.is_zero() {
        return Err(ConfigError::new(
            &CATALOGUE_RESYNC,
            "0",
            "must be longer than 0",
        ));
    }
    Ok(interval)
}

/// Opens storage, seeds it if asked, and binds the listener.
pub async fn build(config: Config) -> anyhow::Result<Application> {
    let metrics = Metrics::new(NAME);
    let db = config.storage.open(NAME, &storage::MIGRATIONS).await?;
    db.write_groups().register(&metrics);
    let outbox = Outbox::default();
    let store: Arc<dyn ProductStore> = Arc::new(SqlProductStore::new(&db, outbox.clone()));
    if config.seed_products {
        seed_demo_products(store.as_ref()).await?;
    }
    // The watch re-reads the catalogue once it is listening, so a change committed
    // between this first read and then is not missed.
    let watch = db.watch("catalogue", config.catalogue_resync);
    let catalogue = Arc::new(Catalogue::load(store.as_ref(), &metrics).await?);
    let sync = tokio::spawn(catalogue::keep_fresh(
        catalogue.clone(),
        store.clone(),
        watch,
    ));
    let state = AppState::new(store, catalogue, &metrics);
    let event_metrics = EventMetrics::new(
        &metrics,
        &["stock.released"],
        &[consumers::OrderCancelled::queue()],
    );
    let events = config.events.start(
        NAME,
        &db,
        Some(&outbox),
        event_metrics,
        vec![Arc::new(consumers::OrderCancelled {
            state: state.clone(),
        })],
    );
    ServiceParts::new(NAME, config.server, metrics.clone())
        .database(db)
        .on_close(async move {
            sync.abort();
            events.stop();
        })
        .auth(Authenticator::new(&config.auth)?)
        .openapi(&openapi())
        .bind(app(state))
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
            Ok(_) | Err(storage::StoreError::DuplicateId(_)) => {}
            Err(err) => return Err(err.into()),
        }
    }
    tracing::info!("seeded the demo products");
    Ok(())
}
