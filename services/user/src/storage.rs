//! The user service's storage interface and its SQLite implementation.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use crate::domain::User;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a user with id {0:?} already exists")]
    DuplicateId(String),
    #[error("that email address is already registered")]
    DuplicateEmail,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

#[async_trait]
pub trait UserStore: Send + Sync + 'static {
    async fn create(&self, user: &User, password_hash: &str) -> Result<(), StoreError>;
    /// Which uniqueness rule a new user would break, if any: the id first, so a retried
    /// registration hears "exists" rather than "email taken".
    async fn conflict(&self, id: &str, email: &str) -> Result<Option<StoreError>, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<User>, StoreError>;
}

pub struct SqliteUserStore {
    pool: SqlitePool,
}

impl SqliteUserStore {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl UserStore for SqliteUserStore {
    async fn create(&self, user: &User, password_hash: &str) -> Result<(), StoreError> {
        let result = sqlx::query(
            "INSERT INTO users (id, name, email, password_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(&user.id)
        .bind(&user.name)
        .bind(&user.email)
        .bind(password_hash)
        .bind(&user.created_at)
        .execute(&self.pool)
        .await
        .map_err(|err| match &err {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::DuplicateEmail
            }
            _ => err.into(),
        });
        match result {
            // Lost a race with a concurrent registration: name the rule it broke.
            Err(StoreError::DuplicateEmail) => Err(self
                .conflict(&user.id, &user.email)
                .await?
                .unwrap_or(StoreError::DuplicateEmail)),
            other => other.map(|_| ()),
        }
    }

    async fn conflict(&self, id: &str, email: &str) -> Result<Option<StoreError>, StoreError> {
        let taken: Option<(bool, bool)> = sqlx::query_as(
            "SELECT MAX(id = ?1), MAX(email = ?2) FROM users WHERE id = ?1 OR email = ?2 HAVING COUNT(*) > 0",
        )
        .bind(id)
        .bind(email)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match taken {
            Some((true, _)) => Some(StoreError::DuplicateId(id.to_owned())),
            Some((false, true)) => Some(StoreError::DuplicateEmail),
            _ => None,
        })
    }

    async fn get(&self, id: &str) -> Result<Option<User>, StoreError> {
        let row = sqlx::query("SELECT id, name, email, created_at FROM users WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(User {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                email: row.try_get("email")?,
                created_at: row.try_get("created_at")?,
            })
        })
        .transpose()
        .map_err(StoreError::Database)
    }
}
