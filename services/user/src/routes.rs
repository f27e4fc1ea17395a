//! HTTP routes: registration, login, account lookup (the owner or an admin), the public
//! signing key, plus the seed's compatibility routes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus::{IntCounter, IntCounterVec};
use shop_platform::auth::{IssuedToken, KeyPair, TokenSigner};
use shop_platform::validate::IdQuery;
use shop_platform::{ApiJson, ApiQuery, AppError, AppResult, Caller, Metrics};
use tokio::sync::Semaphore;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::{
    Credentials, LoginLimits, NewUser, Password, Role, User, decoy_hash, hash_password,
    throttle_keys, verify_password,
};
use crate::storage::{StoreError, UserStore};

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn UserStore>,
    registered: IntCounter,
    logins: IntCounterVec,
    /// One argon2 job per core: each takes ~19 MiB and tens of milliseconds, so a burst of
    /// registrations or logins queues here instead of exhausting memory.
    hashing: Arc<Semaphore>,
    signer: Arc<TokenSigner>,
    jwks: Arc<serde_json::Value>,
    limits: LoginLimits,
    decoy: Arc<str>,
}

impl AppState {
    pub fn new(
        store: Arc<dyn UserStore>,
        metrics: &Metrics,
        keys: &KeyPair,
        signer: TokenSigner,
        limits: LoginLimits,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            store,
            registered: metrics.counter("users_registered_total", "Accounts created."),
            logins: metrics.counter_vec(
                "user_logins_total",
                "Login attempts by outcome (succeeded, failed, throttled).",
                "outcome",
                &["succeeded", "failed", "throttled"],
            ),
            hashing: Arc::new(Semaphore::new(cores)),
            signer: Arc::new(signer),
            jwks: Arc::new(keys.jwks()),
            limits,
            decoy: decoy_hash().into(),
        }
    }

    /// Runs argon2 on a blocking thread, at most one job per core at a time.
    async fn argon2<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> AppResult<T> {
        let permit = self
            .hashing
            .clone()
            .acquire_owned()
            .await
            .map_err(AppError::internal)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .map_err(AppError::internal)
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
    routes().split_for_parts().0.with_state(state)
}

/// The service's OpenAPI document, from the same annotations the router is built from.
pub fn openapi() -> serde_json::Value {
    shop_platform::openapi::document(routes().split_for_parts().1)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "shop user service", description = "Registration, login (signed access tokens) and account lookup."),
    tags(
        (name = "users", description = "Accounts."),
        (name = "auth", description = "Access tokens and the key that signs them."),
        (name = "compatibility", description = "The seed API's routes, kept for its walkthrough."),
    )
)]
struct ApiDoc;

fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(register, get_user_by_query))
        .routes(routes!(get_user))
        .routes(routes!(register_seed))
        .routes(routes!(login))
        .routes(routes!(jwks))
}

const REGISTER_409: &str =
    "`user_exists`: a user with this id exists\n\n`email_taken`: the email has an account";
const ID_PARAM: &str = "User id";

/// Register (the seed's route; the same as `POST /users`).
#[utoipa::path(post, path = "/user", tag = "compatibility", operation_id = "register_seed",
    request_body = NewUser,
    responses(
        (status = 201, description = "Registered", body = User, headers(("Location" = String, description = "the user's URL"))),
        (status = 409, description = REGISTER_409),
    ))]
async fn register_seed(state: State<AppState>, body: ApiJson<NewUser>) -> AppResult<Response> {
    register(state, body).await
}

/// Register an account (a customer).
#[utoipa::path(post, path = "/users", tag = "users", operation_id = "register",
    request_body = NewUser,
    responses(
        (status = 201, description = "Registered", body = User, headers(("Location" = String, description = "the user's URL"))),
        (status = 409, description = REGISTER_409),
    ))]
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
    let password_hash = state
        .argon2(move || hash_password(&password))
        .await?
        .map_err(AppError::internal)?;
    let user = User {
        id: registration.id,
        name: registration.name,
        email: registration.email,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        role: Role::Customer,
        orders: Default::default(),
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

/// One account (its owner or an admin).
#[utoipa::path(get, path = "/users/{id}", tag = "users", operation_id = "get_user",
    params(("id" = String, Path, description = ID_PARAM, min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The account", body = User),
        (status = 403, description = "`forbidden`: the account is someone else's"),
        (status = 404, description = "`not_found`: no user with this id"),
        (status = 422, description = "`validation_failed`: the id breaks its pattern"),
    ))]
async fn get_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Response> {
    shop_platform::validate::id("id", &id)?;
    find(&state, &caller, &id).await
}

/// One account by `?id=` (the seed's route).
#[utoipa::path(get, path = "/users", tag = "compatibility", operation_id = "get_user_by_query",
    params(IdQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The account", body = User),
        (status = 400, description = "`missing_parameter`: no `id` given"),
        (status = 403, description = "`forbidden`: the account is someone else's"),
        (status = 404, description = "`not_found`: no user with this id"),
        (status = 422, description = "`validation_failed`: the id breaks its pattern"),
    ))]
async fn get_user_by_query(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<IdQuery>,
) -> AppResult<Response> {
    find(&state, &caller, &query.required()?).await
}

async fn find(state: &AppState, caller: &Caller, id: &str) -> AppResult<Response> {
    caller.require_access(id, "profile")?;
    match state.store.get(id).await? {
        Some(user) => Ok(axum::Json(user).into_response()),
        None => Err(AppError::not_found(format!("no user with id {id:?}"))),
    }
}

/// Log in: email and password for a short-lived access token.
#[utoipa::path(post, path = "/auth/login", tag = "auth", operation_id = "login",
    request_body = Credentials,
    responses(
        (status = 200, description = "An access token (`Cache-Control: no-store`)", body = IssuedToken),
        (status = 401, description = "`invalid_credentials`: the email or password is not right"),
        (status = 429, description = "`too_many_attempts`: too many failed logins for this email or address; wait `Retry-After` seconds", headers(("Retry-After" = String, description = "seconds to wait"))),
    ))]
/// `POST /auth/login`: email and password for a short-lived access token.
///
/// Every attempt that gets past throttling costs one argon2 verification, whether or not
/// the email is registered, and every failure gets the same answer: neither the timing nor
/// the body tells an attacker which emails have accounts.
async fn login(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Credentials>,
) -> AppResult<Response> {
    let (email, password) = body.validate()?;
    let address = client_address(&headers, peer.map(|Extension(ConnectInfo(addr))| addr));
    let keys = throttle_keys(&email, &address);
    let keys = [keys[0].as_str(), keys[1].as_str()];
    let now = chrono::Utc::now().timestamp_millis();
    let window = state.limits.window.as_millis() as i64;
    let window_start_after = now - window;

    let counted = state.store.failures(&keys, window_start_after).await?;
    let blocked_until = counted
        .iter()
        .filter(|(key, failures, _)| {
            let limit = if key.starts_with("account:") {
                state.limits.per_account
            } else {
                state.limits.per_address
            };
            *failures >= limit
        })
        .map(|(_, _, start)| start + window)
        .max();
    if let Some(until) = blocked_until {
        state.logins.with_label_values(&["throttled"]).inc();
        let mut err = AppError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            "too many failed logins; try again later",
        );
        err.retry_after_secs = Some(((until - now).max(1) as u64).div_ceil(1000));
        return Err(err);
    }

    let account = state.store.login_record(&email).await?;
    let phc = match &account {
        Some(record) => record.password_hash.clone(),
        None => state.decoy.to_string(),
    };
    let checked = password_check(&state, password, phc).await?;
    match account {
        Some(record) if checked => {
            state.store.clear_failures(keys[0]).await?;
            state.logins.with_label_values(&["succeeded"]).inc();
            let token = state.signer.issue(&record.id, record.role);
            let mut response = axum::Json(token).into_response();
            let headers = response.headers_mut();
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
            Ok(response)
        }
        _ => {
            state
                .store
                .record_failure(&keys, now, window_start_after)
                .await?;
            state.logins.with_label_values(&["failed"]).inc();
            Err(AppError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "the email or password is not right",
            ))
        }
    }
}

async fn password_check(state: &AppState, password: Password, phc: String) -> AppResult<bool> {
    state.argon2(move || verify_password(&password, &phc)).await
}

/// The client's address: the last `X-Forwarded-For` hop (the one the gateway appended;
/// earlier ones are whatever the client claimed), else the connection's peer.
fn client_address(headers: &HeaderMap, peer: Option<SocketAddr>) -> String {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .map(str::trim)
        .filter(|v| v.parse::<std::net::IpAddr>().is_ok())
        .map_or_else(
            || peer.map_or_else(|| "unknown".to_owned(), |p| p.ip().to_string()),
            str::to_owned,
        )
}

/// The public half of the signing key (a JWK set), for verifiers.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth", operation_id = "jwks",
    responses(
        (status = 200, description = "RFC 7517 JWK set (Ed25519 keys)", body = JwkSet),
    ))]
/// The public half of the signing key, for verifiers (the gateway, the other services).
async fn jwks(State(state): State<AppState>) -> Response {
    let mut response = axum::Json(state.jwks.as_ref().clone()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

/// RFC 7517 JWK set.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct JwkSet {
    keys: Vec<Jwk>,
}

/// An Ed25519 public key (RFC 8037).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct Jwk {
    #[schema(pattern = "^OKP$")]
    kty: String,
    #[schema(pattern = "^Ed25519$")]
    crv: String,
    /// The public key, base64url.
    x: String,
    kid: Option<String>,
    #[schema(rename = "use")]
    use_: Option<String>,
    alg: Option<String>,
}
