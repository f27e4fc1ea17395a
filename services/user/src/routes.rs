//! HTTP routes: registration and lookup, plus the seed's compatibility routes.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus::IntCounter;
use shop_platform::validate::IdQuery;
use shop_platform::{ApiJson, ApiQuery, AppError, AppResult, Metrics};
use tokio::sync::Semaphore;

use crate::domain::{NewUser, User, hash_password};
use crate::storage::{StoreError, UserStore};

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn UserStore>,
    registered: IntCounter,
    /// One argon2 job per core: each takes ~19 MiB and tens of milliseconds, so a burst of
    /// registrations queues here instead of exhausting memory.
    hashing: Arc<Semaphore>,
}

impl AppState {
    pub fn new(store: Arc<dyn UserStore>, metrics: &Metrics) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            store,
            registered: metrics.counter("users_registered_total", "Accounts created."),
            hashing: Arc::new(Semaphore::new(cores)),
        }
    }
}

impl From<StoreError> for AppError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::DuplicateId(_) => AppError::conflict("user_exists", err.to_string()),
            StoreError::DuplicateEmail => {
                AppError::conflict("email_taken", err.to_string()).with_field("email")
            }
            StoreError::Database(db) => db.into(),
        }
    }
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/users", post(register).get(get_user_by_query))
        .route("/users/{id}", get(get_user))
        .route("/user", post(register))
        .with_state(state)
}

async fn register(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<NewUser>,
) -> AppResult<Response> {
    let registration = body.validate()?;
    // Refuse known conflicts before paying for a hash; the unique constraints still
    // decide races.
    if let Some(conflict) = state
        .store
        .conflict(&registration.id, &registration.email)
        .await?
    {
        return Err(conflict.into());
    }
    let password = registration.password;
    let permit = state
        .hashing
        .clone()
        .acquire_owned()
        .await
        .map_err(AppError::internal)?;
    // argon2 takes tens of milliseconds of CPU: keep it off the async workers.
    let password_hash = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        hash_password(&password)
    })
    .await
    .map_err(AppError::internal)?
    .map_err(AppError::internal)?;
    let user = User {
        id: registration.id,
        name: registration.name,
        email: registration.email,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    state.store.create(&user, &password_hash).await?;
    state.registered.inc();
    let location = format!("/users/{}", user.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(user),
    )
        .into_response())
}

async fn get_user(State(state): State<AppState>, Path(id): Path<String>) -> AppResult<Response> {
    find(&state, &id).await
}

/// Seed route: `GET /users?id=1`.
async fn get_user_by_query(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<IdQuery>,
) -> AppResult<Response> {
    find(&state, &query.required()?).await
}

async fn find(state: &AppState, id: &str) -> AppResult<Response> {
    match state.store.get(id).await? {
        Some(user) => Ok(axum::Json(user).into_response()),
        None => Err(AppError::not_found(format!("no user with id {id:?}"))),
    }
}
