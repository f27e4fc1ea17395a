//! Storage settings and the embedded SQLite database every service opens the same way:
//! a file per service under `DATA_DIR`, WAL journal, migrations embedded in the binary.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::{ConfigError, Env, Var};
use crate::probes::CheckResult;

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

impl StorageConfig {
    pub const DATA_DIR: Var = Var::new(
        "DATA_DIR",
        "./data",
        "Directory for the embedded database (<service>.db); created if missing.",
    );
    pub const DATABASE_URL: Var = Var::optional(
        "DATABASE_URL",
        "Database URL; overrides DATA_DIR. This build accepts sqlite://PATH.",
    );
    pub const MAX_CONNECTIONS: Var = Var::new("DB_MAX_CONNECTIONS", "8", "Connection pool size.");
    pub const ACQUIRE_TIMEOUT: Var = Var::new(
        "DB_ACQUIRE_TIMEOUT",
        "3s",
        "How long a request waits for a pooled connection before answering 503.",
    );
    pub const VARS: &[Var] = &[
        Self::DATA_DIR,
        Self::DATABASE_URL,
        Self::MAX_CONNECTIONS,
        Self::ACQUIRE_TIMEOUT,
    ];

    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let database_url = env.parse_opt::<String>(&Self::DATABASE_URL)?;
        if let Some(url) = &database_url
            && !url.starts_with("sqlite:")
        {
            return Err(ConfigError::new(
                &Self::DATABASE_URL,
                redact_url(url),
                "unsupported scheme; this build stores data in SQLite (sqlite://PATH)",
            ));
        }
        let max_connections = env.parse::<u32>(&Self::MAX_CONNECTIONS)?;
        if max_connections == 0 {
            return Err(ConfigError::new(
                &Self::MAX_CONNECTIONS,
                "0",
                "must be at least 1",
            ));
        }
        Ok(Self {
            data_dir: env.parse(&Self::DATA_DIR)?,
            database_url,
            max_connections,
            acquire_timeout: env.duration(&Self::ACQUIRE_TIMEOUT)?,
        })
    }

    /// A private directory, for tests.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: dir.into(),
            database_url: None,
            max_connections: 4,
            acquire_timeout: Duration::from_secs(3),
        }
    }

    /// Opens (creating if needed) this service's SQLite database and applies migrations.
    pub async fn open_sqlite(
        &self,
        service: &str,
        migrator: &Migrator,
    ) -> anyhow::Result<SqlitePool> {
        let options = match &self.database_url {
            Some(url) => SqliteConnectOptions::from_str(url)?,
            None => {
                std::fs::create_dir_all(&self.data_dir).map_err(|e| {
                    anyhow::anyhow!("cannot create DATA_DIR {}: {e}", self.data_dir.display())
                })?;
                SqliteConnectOptions::new().filename(self.data_dir.join(format!("{service}.db")))
            }
        }
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .connect_with(options)
            .await?;
        migrator.run(&pool).await?;
        Ok(pool)
    }
}

/// Readiness check: the pool hands out a connection that answers.
pub fn ping(
    pool: SqlitePool,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = CheckResult> + Send>> + Send + Sync + 'static
{
    move || {
        let pool = pool.clone();
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&pool)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

/// Hides credentials in a URL for error messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_scheme_without_leaking_password() {
        let env = Env::from_pairs([("DATABASE_URL", "mysql://root:hunter2@db/shop")]);
        let err = StorageConfig::from_env(&env).unwrap_err();
        assert_eq!(err.var, "DATABASE_URL");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
