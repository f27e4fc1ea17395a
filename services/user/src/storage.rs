//! The user service's storage interface and its SQL implementation, one for both
//! backends (SQLite and PostgreSQL through `sqlx::Any`).

use async_trait::async_trait;
use shop_platform::{Database, Migrations};
use sqlx::{AnyPool, Row};

use crate::domain::User;

pub static MIGRATIONS: Migrations = Migrations {
    sqlite: sqlx::migrate!("./migrations/sqlite"),
    postgres: sqlx::migrate!("./migrations/postgres"),
};

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

pub struct SqlUserStore {
    pool: AnyPool,
}

impl SqlUserStore {
    pub fn new(db: &Database) -> Self {
        Self {
            pool: db.pool().clone(),
        }
    }
}

#[async_trait]
impl UserStore for SqlUserStore {
    async fn create(&self, user: &User, password_hash: &str) -> Result<(), StoreError> {
        let result = sqlx::query(
            "INSERT INTO users (id, name, email, password_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
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
        let taken: Option<(i64, i64)> = sqlx::query_as(
            "SELECT MAX(CASE WHEN id = $1 THEN 1 ELSE 0 END), MAX(CASE WHEN email = $2 THEN 1 ELSE 0 END)
             FROM users WHERE id = $1 OR email = $2 HAVING COUNT(*) > 0",
        )
        .bind(id)
        .bind(email)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match taken {
            Some((1, _)) => Some(StoreError::DuplicateId(id.to_owned())),
            Some((_, 1)) => Some(StoreError::DuplicateEmail),
            _ => None,
        })
    }

    async fn get(&self, id: &str) -> Result<Option<User>, StoreError> {
        let row = sqlx::query("SELECT id, name, email, created_at FROM users WHERE id = $1")
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
