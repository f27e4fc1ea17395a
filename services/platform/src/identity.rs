//! Who is calling. The gateway verifies the bearer token and forwards the identity in
//! headers it sets itself (client-sent copies are dropped); each service then takes the
//! caller from those headers, by default re-verifying the forwarded token as well, so a
//! request that did not come through the gateway is refused even from inside the cluster.
//!
//! Verifiers get the signer's public key from a PEM file or from the user service's JWK
//! set (refreshed in the background, so a rotated key is picked up without a restart).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::AppError;
use crate::auth::{self, Claims, KeyPair, Role, TokenError};
use crate::config::{ConfigError, Env, Var};
use crate::probes::CheckResult;

/// Set by the gateway from a verified token; never taken from a client.
pub const USER_ID: HeaderName = HeaderName::from_static("x-user-id");
pub const USER_ROLE: HeaderName = HeaderName::from_static("x-user-role");

/// How often a JWK set is fetched again when nothing asks sooner.
const JWKS_REFRESH: Duration = Duration::from_secs(300);
/// A token naming an unknown key may trigger a refetch, but not more often than this.
const JWKS_MIN_REFETCH: Duration = Duration::from_secs(10);
const JWKS_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Protected routes need a valid bearer token.
    Jwt,
    /// Authentication off: the seed's walkthrough, never production.
    Demo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Re-verify the forwarded bearer token; the identity headers must match it.
    Token,
    /// Take the identity headers as they come (where only the gateway can reach us).
    Gateway,
}

#[derive(Debug, Clone)]
pub enum KeySource {
    PublicKeyFile(PathBuf),
    PublicKeyPem(String),
    Jwks(String),
    /// The signer's own key pair (the user service).
    Pair(KeyPair),
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub keys: KeySource,
    pub issuer: String,
    pub audience: String,
    pub trust: Trust,
}

impl AuthConfig {
    pub const MODE: Var = Var::new(
        "AUTH_MODE",
        "jwt",
        "jwt: protected routes need a bearer token; demo: authentication off, for the seed walkthrough only.",
    );
    pub const PUBLIC_KEY_FILE: Var = Var::optional(
        "JWT_PUBLIC_KEY_FILE",
        "PEM file with the Ed25519 public key access tokens are signed with (instead of JWT_JWKS_URL).",
    );
    pub const PUBLIC_KEY: Var = Var::optional(
        "JWT_PUBLIC_KEY",
        "The Ed25519 public key's PEM text itself (instead of JWT_PUBLIC_KEY_FILE or JWT_JWKS_URL).",
    );
    pub const JWKS_URL: Var = Var::new(
        "JWT_JWKS_URL",
        "http://127.0.0.1:8083/.well-known/jwks.json",
        "JWK set of the token signer (the user service), fetched at start and every 5 minutes.",
    );
    pub const ISSUER: Var = Var::new("JWT_ISSUER", "shop", "Required `iss` of access tokens.");
    pub const AUDIENCE: Var = Var::new("JWT_AUDIENCE", "shop", "Required `aud` of access tokens.");
    pub const TRUST: Var = Var::new(
        "AUTH_TRUST",
        "token",
        "token: re-verify the bearer token the gateway forwards and require its identity headers to match; gateway: trust the identity headers alone (only where the network lets nothing but the gateway in).",
    );

    /// Settings of a binary that verifies tokens signed elsewhere.
    pub const VERIFIER_VARS: [Var; 6] = [
        Self::MODE,
        Self::PUBLIC_KEY_FILE,
        Self::PUBLIC_KEY,
        Self::JWKS_URL,
        Self::ISSUER,
        Self::AUDIENCE,
    ];
    pub const SERVICE_VARS: [Var; 7] = [
        Self::MODE,
        Self::TRUST,
        Self::PUBLIC_KEY_FILE,
        Self::PUBLIC_KEY,
        Self::JWKS_URL,
        Self::ISSUER,
        Self::AUDIENCE,
    ];

    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let mode = env.parse_with(&Self::MODE, |v| match v.trim() {
            "jwt" => Ok(AuthMode::Jwt),
            "demo" => Ok(AuthMode::Demo),
            _ => Err("must be jwt or demo".to_owned()),
        })?;
        let trust = env.parse_with(&Self::TRUST, |v| match v.trim() {
            "token" => Ok(Trust::Token),
            "gateway" => Ok(Trust::Gateway),
            _ => Err("must be token or gateway".to_owned()),
        })?;
        let inline = env
            .raw(Self::PUBLIC_KEY.name)
            .filter(|v| !v.trim().is_empty());
        let keys = match (inline, env.parse_opt::<PathBuf>(&Self::PUBLIC_KEY_FILE)?) {
            (Some(pem), _) => KeySource::PublicKeyPem(pem),
            (None, Some(path)) => KeySource::PublicKeyFile(path),
            (None, None) => KeySource::Jwks(env.parse_with(&Self::JWKS_URL, |v| {
                let v = v.trim();
                if v.starts_with("http://") || v.starts_with("https://") {
                    Ok(v.to_owned())
                } else {
                    Err("must be an http:// or https:// URL".to_owned())
                }
            })?),
        };
        Ok(Self {
            mode,
            keys,
            issuer: env.string(&Self::ISSUER)?,
            audience: env.string(&Self::AUDIENCE)?,
            trust,
        })
    }

    /// Authentication off, for tests and the seed walkthrough.
    pub fn demo() -> Self {
        Self {
            mode: AuthMode::Demo,
            keys: KeySource::Jwks(String::new()),
            issuer: auth::DEFAULT_ISSUER.to_owned(),
            audience: auth::DEFAULT_AUDIENCE.to_owned(),
            trust: Trust::Token,
        }
    }

    /// Tokens verified with `pair`'s public key (the launcher, tests).
    pub fn with_pair(pair: &KeyPair) -> Self {
        Self {
            mode: AuthMode::Jwt,
            keys: KeySource::Pair(pair.clone()),
            ..Self::demo()
        }
    }
}

/// Verifies tokens and turns requests into [`Caller`]s. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    mode: AuthMode,
    trust: Trust,
    keys: KeySet,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.inner.mode)
            .field("trust", &self.inner.trust)
            .finish_non_exhaustive()
    }
}

struct KeySet {
    keys: ArcSwap<Vec<(String, DecodingKey)>>,
    validation: Validation,
    jwks_url: Option<String>,
    loaded: AtomicBool,
    /// Asks the refresh loop to fetch now (a token named a key we do not have).
    wanted: tokio::sync::Notify,
    last_fetch_ms: AtomicU64,
    /// Counts the key sets installed, so a cache above `verify` can tell a change.
    generation: AtomicU64,
    verified: std::sync::Mutex<Verified>,
}

/// Tokens whose signature, issuer and audience this key set has checked, so a client's
/// next request with the same token is not verified again: an Ed25519 verification was
/// a fifth of the order service's request-handling CPU under the order load, for the
/// token the gateway and the service check on every request. The same idea as Envoy's
/// JWT cache. Keyed by the whole token (a signature alone does not bind its payload),
/// dropped whenever the key set changes, and expiry is still checked on every use.
#[derive(Default)]
struct Verified {
    /// The key set ([`KeySet::generation`]) the entries were verified with.
    generation: u64,
    claims: std::collections::HashMap<Box<str>, Claims>,
}

impl Verified {
    /// The entries verified with key set `generation`, none if the keys changed since.
    fn of(&mut self, generation: u64) -> &mut std::collections::HashMap<Box<str>, Claims> {
        if self.generation != generation {
            self.claims.clear();
            self.generation = generation;
        }
        &mut self.claims
    }
}

/// Entries kept; when full the cache starts over (a miss costs one verification).
const VERIFIED_TOKENS: usize = 256;

impl KeySet {
    /// Keys first, then the generation: whoever reads the new generation finds the new
    /// keys.
    fn install(&self, keys: Vec<(String, DecodingKey)>) {
        self.keys.store(Arc::new(keys));
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The claims of `token` if this key set verified it before and it has not expired
    /// since (with the same leeway as the full check).
    fn remembered(&self, token: &str, generation: u64) -> Option<Result<Claims, TokenError>> {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        let claims = verified.of(generation);
        let known = claims.get(token)?;
        let now = jsonwebtoken::get_current_timestamp();
        if known.exp.saturating_add(self.validation.leeway) < now {
            claims.remove(token);
            return Some(Err(TokenError::Expired));
        }
        Some(Ok(known.clone()))
    }

    fn remember(&self, token: &str, claims: &Claims, generation: u64) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        let remembered = verified.of(generation);
        if remembered.len() >= VERIFIED_TOKENS {
            remembered.clear();
        }
        remembered.insert(token.into(), claims.clone());
    }
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> anyhow::Result<Self> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = auth::LEEWAY_SECS;
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        let (keys, jwks_url) = match (&config.mode, &config.keys) {
            (AuthMode::Demo, _) => (Vec::new(), None),
            (_, KeySource::Pair(pair)) => (vec![pem_key(&pair.public_pem)?], None),
            (_, KeySource::PublicKeyFile(path)) => {
                let pem = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read JWT_PUBLIC_KEY_FILE {}: {e}", path.display())
                })?;
                let key = pem_key(&pem).map_err(|_| {
                    anyhow::anyhow!(
                        "JWT_PUBLIC_KEY_FILE {} is not an Ed25519 public key in PEM form",
                        path.display()
                    )
                })?;
                (vec![key], None)
            }
            (_, KeySource::PublicKeyPem(pem)) => (
                vec![pem_key(pem).map_err(|e| anyhow::anyhow!("JWT_PUBLIC_KEY: {e}"))?],
                None,
            ),
            (_, KeySource::Jwks(url)) => (Vec::new(), Some(url.clone())),
        };
        let loaded = !keys.is_empty() || config.mode == AuthMode::Demo;
        Ok(Self {
            inner: Arc::new(Inner {
                mode: config.mode,
                trust: config.trust,
                keys: KeySet {
                    keys: ArcSwap::from_pointee(keys),
                    validation,
                    jwks_url,
                    loaded: AtomicBool::new(loaded),
                    wanted: tokio::sync::Notify::new(),
                    last_fetch_ms: AtomicU64::new(0),
                    generation: AtomicU64::new(0),
                    verified: Default::default(),
                },
            }),
        })
    }

    pub fn demo() -> Self {
        Self::new(&AuthConfig::demo()).expect("demo mode needs no keys")
    }

    pub fn mode(&self) -> AuthMode {
        self.inner.mode
    }

    pub fn is_demo(&self) -> bool {
        self.inner.mode == AuthMode::Demo
    }

    /// Keeps a JWK set fresh; `None` when keys are static. Call inside a runtime.
    pub fn spawn_refresh(&self) -> Option<tokio::task::JoinHandle<()>> {
        let url = self.inner.keys.jwks_url.clone()?;
        let this = self.clone();
        Some(tokio::spawn(async move { this.refresh_loop(url).await }))
    }

    async fn refresh_loop(self, url: String) {
        let http = match reqwest::Client::builder().timeout(JWKS_TIMEOUT).build() {
            Ok(http) => http,
            Err(err) => {
                tracing::error!(error = %err, "cannot build the JWK set client");
                return;
            }
        };
        let keys = &self.inner.keys;
        let mut backoff = Duration::from_millis(250);
        loop {
            keys.last_fetch_ms
                .store(crate::auth::now_millis(), Ordering::Relaxed);
            match fetch_jwks(&http, &url).await {
                Ok(fetched) => {
                    let first = !keys.loaded.swap(true, Ordering::SeqCst);
                    if first || fetched.len() != keys.keys.load().len() {
                        tracing::info!(url = %url, keys = fetched.len(), "token signing keys loaded");
                    }
                    keys.install(fetched);
                    backoff = Duration::from_millis(250);
                    tokio::select! {
                        () = tokio::time::sleep(JWKS_REFRESH) => {}
                        () = keys.wanted.notified() => {}
                    }
                }
                Err(err) => {
                    tracing::warn!(url = %url, error = %err, retry_in_ms = backoff.as_millis() as u64, "cannot fetch token signing keys");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Readiness: a verifier without keys would refuse every token.
    pub fn check_keys(&self) -> CheckResult {
        if self.inner.keys.loaded.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(format!(
                "no token signing keys yet from {}",
                self.inner
                    .keys
                    .jwks_url
                    .as_deref()
                    .unwrap_or("the key file")
            ))
        }
    }

    /// Verifies a token's signature (EdDSA only; `alg: none` and HMAC tricks are refused
    /// before the signature is looked at), expiry, issuer and audience.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let keys = &self.inner.keys;
        // The generation before the keys (see `install`): at worst an entry is filed
        // under the generation before the keys it was checked with, and dropped early.
        let generation = self.key_generation();
        if let Some(claims) = keys.remembered(token, generation) {
            return claims;
        }
        let outcome = self.verify_signed(token, &keys.keys.load());
        if let Ok(claims) = &outcome {
            keys.remember(token, claims, generation);
        }
        outcome
    }

    fn verify_signed(
        &self,
        token: &str,
        current: &[(String, DecodingKey)],
    ) -> Result<Claims, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        let keys = &self.inner.keys;
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        let mut candidates = current
            .iter()
            .filter(|(kid, _)| kid.is_empty() || header.kid.as_ref().is_none_or(|want| want == kid))
            .peekable();
        if candidates.peek().is_none() {
            self.want_refetch();
            return Err(TokenError::Invalid);
        }
        let mut outcome = Err(TokenError::Invalid);
        for (_, key) in candidates {
            outcome = jsonwebtoken::decode::<Claims>(token, key, &keys.validation)
                .map(|data| data.claims)
                .map_err(|e| match e.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    _ => TokenError::Invalid,
                });
            if outcome.is_ok() {
                break;
            }
        }
        outcome
    }

    /// Changes whenever a new key set is installed: what a cache of verified tokens kept
    /// from before may have been signed by a key that is gone.
    pub fn key_generation(&self) -> u64 {
        self.inner.keys.generation.load(Ordering::SeqCst)
    }

    /// Installs the verification keys of `pairs`, as a JWK set refresh would: for tests
    /// of key rotation.
    #[cfg(feature = "testing")]
    pub fn install_keys_for_test(&self, pairs: &[&KeyPair]) {
        let keys = pairs.iter().map(|pair| pem_key(&pair.public_pem).unwrap());
        self.inner.keys.install(keys.collect());
    }

    fn want_refetch(&self) {
        let keys = &self.inner.keys;
        if keys.jwks_url.is_some() {
            let since = crate::auth::now_millis()
                .saturating_sub(keys.last_fetch_ms.load(Ordering::Relaxed));
            if since >= JWKS_MIN_REFETCH.as_millis() as u64 {
                keys.wanted.notify_one();
            }
        }
    }

    /// The caller of a request that reached a service.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, TokenError> {
        if self.is_demo() {
            return Ok(Caller::Anonymous);
        }
        let (Some(id), Some(role)) = (headers.get(USER_ID), headers.get(USER_ROLE)) else {
            return Err(TokenError::Missing);
        };
        let id = id.to_str().map_err(|_| TokenError::Invalid)?;
        let role = Role::parse(role.to_str().map_err(|_| TokenError::Invalid)?)
            .ok_or(TokenError::Invalid)?;
        let authorization = headers.get(AUTHORIZATION).cloned();
        if self.inner.trust == Trust::Token {
            let claims = self.verify(auth::bearer(headers).ok_or(TokenError::Missing)?)?;
            if claims.sub != id || claims.role != role {
                return Err(TokenError::Invalid);
            }
        }
        if id.is_empty() {
            return Err(TokenError::Invalid);
        }
        Ok(Caller::User(Principal {
            id: id.to_owned(),
            role,
            authorization,
        }))
    }
}

fn pem_key(pem: &str) -> anyhow::Result<(String, DecodingKey)> {
    let key = DecodingKey::from_ed_pem(pem.as_bytes())
        .map_err(|_| anyhow::anyhow!("not an Ed25519 public key in PEM form"))?;
    // A static key answers to any `kid`: tokens minted before a kid existed still verify.
    Ok((String::new(), key))
}

async fn fetch_jwks(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<Vec<(String, DecodingKey)>> {
    let response = http.get(url).send().await?;
    anyhow::ensure!(
        response.status().is_success(),
        "answered {}",
        response.status().as_u16()
    );
    let set: jsonwebtoken::jwk::JwkSet = response.json().await?;
    let keys: Vec<(String, DecodingKey)> = set
        .keys
        .iter()
        .filter_map(|jwk| {
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some((jwk.common.key_id.clone().unwrap_or_default(), key))
        })
        .collect();
    anyhow::ensure!(!keys.is_empty(), "the set holds no usable key");
    Ok(keys)
}

/// The verified identity behind a request.
#[derive(Clone)]
pub enum Caller {
    /// Authentication is off (`AUTH_MODE=demo`): everything is allowed, as in the seed.
    Anonymous,
    User(Principal),
}

#[derive(Clone)]
pub struct Principal {
    pub id: String,
    pub role: Role,
    /// Relayed on calls to other services on the caller's behalf.
    authorization: Option<HeaderValue>,
}

impl std::fmt::Debug for Caller {
    // The relayed credential is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Anonymous => f.write_str("Anonymous"),
            Caller::User(p) => write!(f, "User({}, {})", p.id, p.role.as_str()),
        }
    }
}

impl Caller {
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Caller::Anonymous => None,
            Caller::User(p) => Some(&p.id),
        }
    }

    /// Admins, and everyone when authentication is off.
    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Anonymous => true,
            Caller::User(p) => p.role == Role::Admin,
        }
    }

    pub fn may_access(&self, user_id: &str) -> bool {
        self.is_admin() || self.user_id() == Some(user_id)
    }

    /// 403 unless the caller is `user_id` or an admin.
    pub fn require_access(&self, user_id: &str, what: &str) -> Result<(), AppError> {
        if self.may_access(user_id) {
            Ok(())
        } else {
            Err(forbidden(format!("you may only access your own {what}")))
        }
    }

    pub fn require_admin(&self) -> Result<(), AppError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(forbidden("this needs the admin role"))
        }
    }

    /// Adds the caller's credentials to a request made on their behalf.
    pub fn relay(&self, headers: &mut HeaderMap) {
        if let Caller::User(p) = self {
            if let Some(authorization) = &p.authorization {
                headers.insert(AUTHORIZATION, authorization.clone());
            }
            if let Ok(id) = HeaderValue::from_str(&p.id) {
                headers.insert(USER_ID, id);
            }
            headers.insert(USER_ROLE, HeaderValue::from_static(p.role.as_str()));
        }
    }
}

pub fn forbidden(message: impl Into<String>) -> AppError {
    AppError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// Services read the caller through the [`Authenticator`] the platform puts in the
/// request's extensions; a router served without one refuses rather than guesses.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(authenticator) = parts.extensions.get::<Authenticator>() else {
            return Err(AppError::internal(anyhow::anyhow!(
                "no Authenticator in the request extensions"
            ))
            .into_response());
        };
        authenticator
            .caller(&parts.headers)
            .map_err(auth::unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenSigner;

    fn jwt(pair: &KeyPair) -> Authenticator {
        Authenticator::new(&AuthConfig::with_pair(pair)).unwrap()
    }

    fn headers(pairs: &[(&HeaderName, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert((*name).clone(), HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn keys_come_from_a_file_or_the_environment() {
        let pair = KeyPair::generate().unwrap();
        let token = TokenSigner::new(&pair, "shop", "shop", Duration::from_secs(60))
            .issue("alice", Role::Customer)
            .access_token;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("public.pem");
        std::fs::write(&file, &pair.public_pem).unwrap();
        for env in [
            Env::from_pairs([("JWT_PUBLIC_KEY", pair.public_pem.clone())]),
            Env::from_pairs([("JWT_PUBLIC_KEY_FILE", file.display().to_string())]),
        ] {
            let authn = Authenticator::new(&AuthConfig::from_env(&env).unwrap()).unwrap();
            assert!(authn.check_keys().is_ok());
            assert_eq!(authn.verify(&token).unwrap().sub, "alice");
        }
        let bad = Env::from_pairs([("JWT_PUBLIC_KEY", "not a key")]);
        assert!(Authenticator::new(&AuthConfig::from_env(&bad).unwrap()).is_err());
        let bad = Env::from_pairs([("AUTH_MODE", "off")]);
        assert_eq!(AuthConfig::from_env(&bad).unwrap_err().var, "AUTH_MODE");
    }

    /// A verified token is taken from the cache only as the very same token, never past
    /// its expiry, and never once the keys have changed.
    #[test]
    fn a_verified_token_is_remembered_until_it_expires_or_the_keys_change() {
        let pair = KeyPair::generate().unwrap();
        let auth = jwt(&pair);
        let signer = TokenSigner::new(&pair, "shop", "shop", Duration::from_secs(60));
        let token = signer.issue("u1", Role::Customer).access_token;
        let other = signer.issue("u2", Role::Admin).access_token;
        assert_eq!(auth.verify(&token).unwrap().sub, "u1");
        let cached = |token: &str| {
            let verified = auth.inner.keys.verified.lock().unwrap();
            verified.claims.get(token).cloned()
        };
        assert_eq!(cached(&token).unwrap().sub, "u1");
        assert_eq!(auth.verify(&token).unwrap().sub, "u1", "from the cache");

        // Another payload under the remembered signature.
        let parts: Vec<&str> = token.split('.').collect();
        let payload = other.split('.').nth(1).unwrap();
        let forged = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert_eq!(auth.verify(&forged), Err(TokenError::Invalid));

        // Expired while remembered: refused, and forgotten.
        auth.inner
            .keys
            .verified
            .lock()
            .unwrap()
            .claims
            .get_mut(token.as_str())
            .unwrap()
            .exp = jsonwebtoken::get_current_timestamp() - auth::LEEWAY_SECS - 1;
        assert_eq!(auth.verify(&token), Err(TokenError::Expired));
        assert!(cached(&token).is_none());

        // New keys: what the old ones verified is checked again, and refused.
        assert_eq!(auth.verify(&other).unwrap().sub, "u2");
        let generation = auth.key_generation();
        auth.install_keys_for_test(&[&KeyPair::generate().unwrap()]);
        assert_ne!(auth.key_generation(), generation);
        assert_eq!(auth.verify(&other), Err(TokenError::Invalid));
        assert!(cached(&other).is_none());
    }

    #[test]
    fn demo_mode_lets_everyone_do_everything() {
        let caller = Authenticator::demo().caller(&HeaderMap::new()).unwrap();
        assert!(caller.is_admin());
        assert!(caller.require_access("anyone", "orders").is_ok());
    }

    #[test]
    fn the_forwarded_token_must_match_the_identity_headers() {
        let pair = KeyPair::generate().unwrap();
        let authn = jwt(&pair);
        let signer = TokenSigner::new(&pair, "shop", "shop", Duration::from_secs(60));
        let token = signer.issue("alice", Role::Customer).access_token;
        let bearer = format!("Bearer {token}");

        let ok = authn
            .caller(&headers(&[
                (&AUTHORIZATION, &bearer),
                (&USER_ID, "alice"),
                (&USER_ROLE, "customer"),
            ]))
            .unwrap();
        assert_eq!(ok.user_id(), Some("alice"));
        assert!(!ok.is_admin());
        assert!(ok.require_access("bob", "orders").is_err());
        assert!(ok.require_admin().is_err());

        // Headers without a token: not through the gateway.
        let err = authn
            .caller(&headers(&[(&USER_ID, "alice"), (&USER_ROLE, "customer")]))
            .unwrap_err();
        assert_eq!(err, TokenError::Missing);
        // A token without headers: not through the gateway either.
        let err = authn
            .caller(&headers(&[(&AUTHORIZATION, &bearer)]))
            .unwrap_err();
        assert_eq!(err, TokenError::Missing);
        // Headers claiming more than the token says.
        for (id, role) in [("bob", "customer"), ("alice", "admin")] {
            let err = authn
                .caller(&headers(&[
                    (&AUTHORIZATION, &bearer),
                    (&USER_ID, id),
                    (&USER_ROLE, role),
                ]))
                .unwrap_err();
            assert_eq!(err, TokenError::Invalid, "{id} {role}");
        }
    }

    #[test]
    fn trusting_the_gateway_takes_the_headers_alone() {
        let pair = KeyPair::generate().unwrap();
        let config = AuthConfig {
            trust: Trust::Gateway,
            ..AuthConfig::with_pair(&pair)
        };
        let authn = Authenticator::new(&config).unwrap();
        let caller = authn
            .caller(&headers(&[(&USER_ID, "root"), (&USER_ROLE, "admin")]))
            .unwrap();
        assert!(caller.is_admin());
        let err = authn
            .caller(&headers(&[(&USER_ID, "root"), (&USER_ROLE, "superuser")]))
            .unwrap_err();
        assert_eq!(err, TokenError::Invalid);
    }

    #[test]
    fn relayed_credentials_carry_the_token_and_never_print_it() {
        let pair = KeyPair::generate().unwrap();
        let signer = TokenSigner::new(&pair, "shop", "shop", Duration::from_secs(60));
        let token = signer.issue("alice", Role::Customer).access_token;
        let bearer = format!("Bearer {token}");
        let caller = jwt(&pair)
            .caller(&headers(&[
                (&AUTHORIZATION, &bearer),
                (&USER_ID, "alice"),
                (&USER_ROLE, "customer"),
            ]))
            .unwrap();
        assert!(!format!("{caller:?}").contains(&token));
        let mut relayed = HeaderMap::new();
        caller.relay(&mut relayed);
        assert_eq!(relayed[AUTHORIZATION], bearer.as_str());
        assert_eq!(relayed[USER_ID], "alice");
        assert_eq!(relayed[USER_ROLE], "customer");
    }

    #[tokio::test]
    async fn a_jwks_verifier_is_not_ready_until_keys_arrive() {
        let pair = KeyPair::generate().unwrap();
        let jwks = pair.jwks().to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let config = AuthConfig {
            keys: KeySource::Jwks(url),
            ..AuthConfig::with_pair(&pair)
        };
        let authn = Authenticator::new(&config).unwrap();
        assert!(authn.check_keys().is_err());
        let token = TokenSigner::new(&pair, "shop", "shop", Duration::from_secs(60))
            .issue("alice", Role::Customer)
            .access_token;
        assert_eq!(authn.verify(&token), Err(TokenError::Invalid));

        let app = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || async move { jwks }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let refresh = authn.spawn_refresh().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while authn.check_keys().is_err() {
            assert!(tokio::time::Instant::now() < deadline, "keys never loaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(authn.verify(&token).unwrap().sub, "alice");
        refresh.abort();
    }
}
