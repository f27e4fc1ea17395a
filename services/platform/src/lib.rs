//! Everything the shop binaries share: configuration, server start-up and shutdown,
//! probes, metrics, logs and traces, errors, and the service-to-service HTTP client.
//! A service crate brings only its domain, router and storage.

pub mod auth;
pub mod cli;
pub mod client;
pub mod conditional;
pub mod config;
pub mod db;
pub mod error;
pub mod events;
pub mod identity;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod mathlib;
pub mod memory;
pub mod metrics;
pub mod middleware;
pub mod money;
pub mod openapi;
pub mod pagination;
pub mod probes;
pub mod server;
pub mod shutdown;
pub mod smoke;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod validate;

pub use cli::{Binary, Runtime};
pub use client::{PeerResponse, ServiceClient};
pub use conditional::{Preconditions, Representation};
pub use config::{ConfigError, Env, ServerConfig, Var};
pub use db::{Backend, Database, Migrations, StorageConfig, Watch, WatchEvent};
pub use error::{ApiJson, ApiQuery, AppError, AppResult};
pub use identity::{AuthConfig, Authenticator, Caller};
pub use metrics::Metrics;
pub use money::Money;
pub use pagination::{Page, PageRequest};
pub use server::{Application, ServiceParts};
pub use shutdown::Shutdown;
