//! User service: accounts and login. Owns its own database; passwords are stored only as
//! argon2id hashes and never returned. Signs the access tokens everything else verifies.

pub mod consumers;
pub mod domain;
pub mod routes;
pub mod storage;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use shop_platform::auth::{KeyPair, TokenSigner};
use shop_platform::config::{ConfigError, Env, ServerConfig, Var};
use shop_platform::events::{Broker, EventMetrics};
use shop_platform::identity::KeySource;
use shop_platform::{
    Application, AuthConfig, Authenticator, Binary, Metrics, Runtime, ServiceParts, Shutdown,
    StorageConfig,
};

use crate::domain::{LoginLimits, NewUser, Password, Role, User, hash_password};
pub use routes::{AppState, app, openapi};
pub use storage::{SqlUserStore, UserStore};

pub const NAME: &str = "user";
pub const PORT: Var = Var::new("PORT", "8083", "Port to listen on.");
pub const PRIVATE_KEY_FILE: Var = Var::optional(
    "JWT_PRIVATE_KEY_FILE",
    "PEM file with the Ed25519 private key that signs access tokens (a Kubernetes Secret). Unset: one is generated on first start and kept at DATA_DIR/keys/jwt-ed25519.pem.",
);
pub const PRIVATE_KEY: Var = Var::optional(
    "JWT_PRIVATE_KEY",
    "The signing key's PEM text itself, instead of JWT_PRIVATE_KEY_FILE (e.g. from a secret manager's env injection).",
);
pub const TOKEN_TTL: Var = Var::new("ACCESS_TOKEN_TTL", "15m", "Lifetime of an access token.");
pub const MAX_FAILURES_PER_ACCOUNT: Var = Var::new(
    "LOGIN_MAX_FAILURES_PER_ACCOUNT",
    "5",
    "Failed logins for one email within LOGIN_THROTTLE_WINDOW before further attempts get 429.",
);
pub const MAX_FAILURES_PER_ADDRESS: Var = Var::new(
    "LOGIN_MAX_FAILURES_PER_ADDRESS",
    "20",
    "Failed logins from one client IP within LOGIN_THROTTLE_WINDOW before further attempts get 429.",
);
pub const THROTTLE_WINDOW: Var = Var::new(
    "LOGIN_THROTTLE_WINDOW",
    "15m",
    "Window in which failed logins are counted; the throttle lifts when it ends.",
);
pub const ADMIN_EMAIL: Var = Var::optional(
    "ADMIN_EMAIL",
    "At start, the account with this email gets the admin role (created if ADMIN_PASSWORD_FILE is set and there is none).",
);
pub const ADMIN_PASSWORD_FILE: Var = Var::optional(
    "ADMIN_PASSWORD_FILE",
    "File holding the password of the ADMIN_EMAIL account when it has to be created.",
);

pub const BINARY: Binary = Binary {
    name: NAME,
    about: "User service: registration, login (signed access tokens) and account lookup.",
    vars: &[
        ("Server", &ServerConfig::vars(PORT)),
        ("Storage", StorageConfig::VARS),
        (
            "Authentication",
            &[
                AuthConfig::MODE,
                AuthConfig::TRUST,
                AuthConfig::ISSUER,
                AuthConfig::AUDIENCE,
                PRIVATE_KEY_FILE,
                PRIVATE_KEY,
                TOKEN_TTL,
                ADMIN_EMAIL,
                ADMIN_PASSWORD_FILE,
            ],
        ),
        (
            "Login throttling",
            &[
                MAX_FAILURES_PER_ACCOUNT,
                MAX_FAILURES_PER_ADDRESS,
                THROTTLE_WINDOW,
            ],
        ),
        ("Events", &[Broker::AMQP_URL]),
    ],
    runtime: Runtime::MultiThread,
};

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub private_key_file: Option<PathBuf>,
    /// PEM text from `JWT_PRIVATE_KEY`; never printed (see the Debug impl).
    pub private_key_pem: Option<SecretPem>,
    pub token_ttl: Duration,
    pub limits: LoginLimits,
    pub admin_email: Option<String>,
    pub admin_password_file: Option<PathBuf>,
    /// Where order events come from: RabbitMQ, or in-process (a broker the launcher shares).
    pub events: Broker,
}

impl Config {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let positive = |var: &Var| -> Result<i64, ConfigError> {
            let n: i64 = env.parse(var)?;
            if n < 1 {
                return Err(ConfigError::new(var, n.to_string(), "must be at least 1"));
            }
            Ok(n)
        };
        let admin_email = env
            .parse_opt::<String>(&ADMIN_EMAIL)?
            .map(|e| {
                domain::normalize_email(&e)
                    .map_err(|err| ConfigError::new(&ADMIN_EMAIL, e, err.message))
            })
            .transpose()?;
        Ok(Self {
            server: ServerConfig::from_env(env, &PORT)?,
            storage: StorageConfig::from_env(env)?,
            auth: AuthConfig::from_env(env)?,
            private_key_file: env.parse_opt(&PRIVATE_KEY_FILE)?,
            private_key_pem: env
                .raw(PRIVATE_KEY.name)
                .filter(|v| !v.trim().is_empty())
                .map(SecretPem),
            token_ttl: env.duration(&TOKEN_TTL)?,
            limits: LoginLimits {
                per_account: positive(&MAX_FAILURES_PER_ACCOUNT)?,
                per_address: positive(&MAX_FAILURES_PER_ADDRESS)?,
                window: env.duration(&THROTTLE_WINDOW)?,
            },
            admin_email,
            admin_password_file: env.parse_opt(&ADMIN_PASSWORD_FILE)?,
            events: Broker::from_env(env)?,
        })
    }

    /// The signing key: `JWT_PRIVATE_KEY`, the configured file, or one kept under `DATA_DIR`.
    pub fn key_pair(&self) -> anyhow::Result<KeyPair> {
        Ok(match (&self.private_key_pem, &self.private_key_file) {
            (Some(SecretPem(pem)), _) => KeyPair::from_pem(pem, Path::new("JWT_PRIVATE_KEY"))?,
            (None, Some(path)) => KeyPair::load(path)?,
            (None, None) => {
                KeyPair::load_or_generate(&self.storage.data_dir.join("keys/jwt-ed25519.pem"))?
            }
        })
    }
}

/// Key material from the environment, redacted in debug output.
#[derive(Clone)]
pub struct SecretPem(pub String);

impl std::fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretPem(***)")
    }
}

pub async fn build(config: Config) -> anyhow::Result<Application> {
    let metrics = Metrics::new(NAME);
    let keys = config.key_pair()?;
    let db = config.storage.open(NAME, &storage::MIGRATIONS).await?;
    db.write_groups().register(&metrics);
    let store = Arc::new(SqlUserStore::new(&db));
    ensure_admin(&config, store.as_ref()).await?;
    let auth = AuthConfig {
        keys: KeySource::Pair(keys.clone()),
        ..config.auth.clone()
    };
    let signer = TokenSigner::new(&keys, &auth.issuer, &auth.audience, config.token_ttl);
    // Publishes nothing: no outbox, only the order counts' consumer.
    let events = config.events.start(
        NAME,
        &db,
        None,
        EventMetrics::new(&metrics, &[], &[consumers::OrderCountsConsumer::queue()]),
        vec![Arc::new(consumers::OrderCountsConsumer {
            store: store.clone(),
        })],
    );
    let state = AppState::new(store, &metrics, &keys, signer, config.limits);
    ServiceParts::new(NAME, config.server, metrics.clone())
        .database(db)
        .on_close(async move { events.stop() })
        .auth(Authenticator::new(&auth)?)
        .openapi(&openapi())
        .bind(app(state))
        .await
}

/// Gives `ADMIN_EMAIL` the admin role, creating the account if a password is configured.
async fn ensure_admin(config: &Config, store: &dyn UserStore) -> anyhow::Result<()> {
    let Some(email) = &config.admin_email else {
        return Ok(());
    };
    if store.make_admin(email).await? {
        tracing::info!(service = NAME, "admin account present");
        return Ok(());
    }
    let Some(path) = &config.admin_password_file else {
        tracing::warn!(
            service = NAME,
            "ADMIN_EMAIL has no account yet and ADMIN_PASSWORD_FILE is unset; no admin"
        );
        return Ok(());
    };
    let password = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read ADMIN_PASSWORD_FILE {}: {e}", path.display()))?;
    let registration = NewUser {
        id: None,
        name: "Administrator".to_owned(),
        email: email.clone(),
        password: Password::new(password.trim_end_matches(['\r', '\n'])),
    }
    .validate()
    .map_err(|e| anyhow::anyhow!("ADMIN_PASSWORD_FILE {}: {}", path.display(), e.message))?;
    let password = registration.password;
    let hash = tokio::task::spawn_blocking(move || hash_password(&password)).await??;
    let admin = User {
        id: registration.id,
        name: registration.name,
        email: registration.email,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        role: Role::Admin,
        orders: Default::default(),
    };
    match store.create(&admin, &hash).await {
        // Another replica created it first.
        Ok(()) | Err(storage::StoreError::DuplicateEmail) => {
            store.make_admin(email).await?;
            tracing::info!(service = NAME, "admin account created");
            Ok(())
        }
        Err(err) => Err(err.into()),
    }
}

pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    build(config).await?.run(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signing_key_comes_from_the_environment_a_file_or_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let base = |pairs: Vec<(&str, String)>| {
            let mut pairs = pairs;
            pairs.push(("DATA_DIR", dir.path().display().to_string()));
            Config::from_env(&Env::from_pairs(pairs)).unwrap()
        };
        let generated = base(vec![]).key_pair().unwrap();
        let file = dir.path().join("keys/jwt-ed25519.pem");
        assert!(file.exists());
        let pem = std::fs::read_to_string(&file).unwrap();
        let from_env = base(vec![("JWT_PRIVATE_KEY", pem)]);
        assert!(!format!("{from_env:?}").contains("PRIVATE KEY"));
        assert_eq!(
            from_env.key_pair().unwrap().public_pem,
            generated.public_pem
        );
        let from_file = base(vec![("JWT_PRIVATE_KEY_FILE", file.display().to_string())]);
        assert_eq!(
            from_file.key_pair().unwrap().public_pem,
            generated.public_pem
        );
        assert!(
            base(vec![("JWT_PRIVATE_KEY", "junk".to_owned())])
                .key_pair()
                .is_err()
        );
    }
}
