//! Who may use a route: each route names a policy for reads and one for writes; the
//! gateway verifies the bearer token where a policy asks for one and hands the verified
//! identity to the upstream in headers only it sets. Verified tokens are remembered per
//! worker until they expire, so a client reusing its token costs a hash lookup, not an
//! Ed25519 verification.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use serde::Deserialize;
use shop_platform::AppError;
use shop_platform::auth::{Role, TokenError, bearer, now_secs};
use shop_platform::identity::{USER_ID, USER_ROLE, forbidden};

use crate::http::body::{error, local};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Anyone, token or not.
    Public,
    /// Any valid token.
    User,
    /// A valid token with the admin role.
    Admin,
}

/// A route's policies. Unset ones default to `user`: a route someone forgot to mark is
/// closed, not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteAccess {
    pub read: Policy,
    pub write: Policy,
}

impl RouteAccess {
    pub fn new(read: Option<Policy>, write: Option<Policy>) -> Self {
        Self {
            read: read.unwrap_or(Policy::User),
            write: write.unwrap_or(Policy::User),
        }
    }

    pub fn for_method(&self, method: &Method) -> Policy {
        if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            self.read
        } else {
            self.write
        }
    }
}

/// Why a request may not pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unauthenticated(TokenError),
    NotAdmin,
}

impl Refusal {
    /// 401 with the RFC 6750 challenge, or 403; never cached.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        match self {
            Refusal::Unauthenticated(err) => {
                let mut response = refused(err.into_app_error());
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, err.challenge());
                response
            }
            Refusal::NotAdmin => refused(forbidden("this needs the admin role")),
        }
    }
}

/// Verified identities by token, for one worker, for the key set they were verified with.
pub struct TokenCache {
    entries: RefCell<HashMap<Box<str>, Identity>>,
    key_generation: Cell<u64>,
}

#[derive(Clone)]
struct Identity {
    user_id: HeaderValue,
    role: Role,
    expires_at: u64,
}

/// Enough for every active client of one worker; past it the cache starts over, which
/// costs one verification per token.
const CACHE_CAPACITY: usize = 16_384;

impl Default for TokenCache {
    fn default() -> Self {
        Self {
            entries: RefCell::new(HashMap::new()),
            key_generation: Cell::new(0),
        }
    }
}

impl TokenCache {
    /// Applies `policy` to a request: drops client-sent identity headers, and where a token
    /// is needed, verifies it and sets the identity headers from it. `Err` is the answer
    /// to send instead of forwarding.
    pub fn authorize(
        &self,
        authenticator: &shop_platform::Authenticator,
        policy: Policy,
        headers: &mut HeaderMap,
    ) -> Result<(), Refusal> {
        // Only the gateway speaks for the caller. (A scan of the few names a request
        // has costs less than two hashed removals that almost never find anything.)
        if headers.keys().any(|k| *k == USER_ID || *k == USER_ROLE) {
            headers.remove(USER_ID);
            headers.remove(USER_ROLE);
        }
        if policy == Policy::Public || authenticator.is_demo() {
            return Ok(());
        }
        let identity = self
            .identify(authenticator, headers)
            .map_err(Refusal::Unauthenticated)?;
        if policy == Policy::Admin && identity.role != Role::Admin {
            return Err(Refusal::NotAdmin);
        }
        headers.insert(USER_ID, identity.user_id);
        headers.insert(USER_ROLE, HeaderValue::from_static(identity.role.as_str()));
        Ok(())
    }

    fn identify(
        &self,
        authenticator: &shop_platform::Authenticator,
        headers: &HeaderMap,
    ) -> Result<Identity, TokenError> {
        let token = bearer(headers).ok_or(TokenError::Missing)?;
        let now = now_secs();
        // A token signed by a key that was removed must not outlive it here.
        let generation = authenticator.key_generation();
        if generation != self.key_generation.get() {
            self.entries.borrow_mut().clear();
            self.key_generation.set(generation);
        }
        if let Some(known) = self.entries.borrow().get(token)
            && now < known.expires_at
        {
            return Ok(known.clone());
        }
        let claims = authenticator.verify(token)?;
        let identity = Identity {
            user_id: HeaderValue::from_str(&claims.sub).map_err(|_| TokenError::Invalid)?,
            role: claims.role,
            expires_at: claims.exp,
        };
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= CACHE_CAPACITY {
            entries.retain(|_, e| now < e.expires_at);
            if entries.len() >= CACHE_CAPACITY {
                entries.clear();
            }
        }
        entries.insert(token.into(), identity.clone());
        Ok(identity)
    }
}

fn refused(err: AppError) -> Response<Full<Bytes>> {
    let mut response = error(err);
    no_store(response.headers_mut());
    response
}

pub fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// Cross-origin access for browsers: closed unless origins are configured.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    origins: Vec<HeaderValue>,
    any: bool,
}

const ALLOWED_METHODS: HeaderValue =
    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE");
const ALLOWED_HEADERS: HeaderValue =
    HeaderValue::from_static("authorization, content-type, idempotency-key, x-request-id");
const EXPOSED_HEADERS: HeaderValue =
    HeaderValue::from_static("location, retry-after, x-request-id, idempotent-replayed");

impl Cors {
    /// `*` or a comma-separated list of origins (`https://shop.example.com`).
    pub fn parse(value: &str) -> Result<Option<Self>, String> {
        let mut cors = Cors::default();
        for origin in value.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            if origin == "*" {
                cors.any = true;
                continue;
            }
            let well_formed = (origin.starts_with("https://") || origin.starts_with("http://"))
                && !origin.ends_with('/')
                && origin
                    .split("://")
                    .nth(1)
                    .is_some_and(|h| !h.is_empty() && !h.contains('/'));
            if !well_formed {
                return Err(format!(
                    "{origin:?} is not an origin (scheme://host[:port], no path)"
                ));
            }
            cors.origins
                .push(HeaderValue::from_str(origin).map_err(|e| e.to_string())?);
        }
        Ok((cors.any || !cors.origins.is_empty()).then_some(cors))
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        self.any || self.origins.iter().any(|o| o == origin)
    }

    /// Answers a preflight (`OPTIONS` with `Access-Control-Request-Method`) itself.
    pub fn preflight(&self, method: &Method, headers: &HeaderMap) -> Option<Response<Full<Bytes>>> {
        if *method != Method::OPTIONS
            || !headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return None;
        }
        let origin = headers.get(header::ORIGIN)?;
        if !self.allows(origin) {
            return Some(error(forbidden("this origin may not call the API")));
        }
        let mut response = local(StatusCode::NO_CONTENT, "text/plain", "");
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, ALLOWED_METHODS);
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOWED_HEADERS);
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        h.insert(header::VARY, HeaderValue::from_static("origin"));
        Some(response)
    }

    /// Marks a response readable by the request's origin, if that origin is allowed.
    pub fn decorate(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        if let Some(origin) = origin
            && self.allows(origin)
        {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSED_HEADERS);
            headers.append(header::VARY, HeaderValue::from_static("origin"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shop_platform::auth::{KeyPair, TokenSigner};
    use shop_platform::{AuthConfig, Authenticator};
    use std::time::Duration;

    fn setup() -> (Authenticator, TokenSigner) {
        let pair = KeyPair::generate().unwrap();
        (
            Authenticator::new(&AuthConfig::with_pair(&pair)).unwrap(),
            TokenSigner::new(&pair, "shop", "shop", Duration::from_secs(60)),
        )
    }

    fn with_token(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        headers
    }

    /// A new key set empties the cache: a token signed by a removed key is refused at
    /// once, not when it expires; a token of the key now published passes.
    #[test]
    fn a_key_rotation_empties_the_cache() {
        let old = KeyPair::generate().unwrap();
        let new = KeyPair::generate().unwrap();
        let authn = Authenticator::new(&AuthConfig::with_pair(&old)).unwrap();
        let sign = |pair| TokenSigner::new(pair, "shop", "shop", Duration::from_secs(60));
        let cache = TokenCache::default();
        let old_token = sign(&old).issue("alice", Role::Customer).access_token;
        let mut headers = with_token(&old_token);
        cache.authorize(&authn, Policy::User, &mut headers).unwrap();

        authn.install_keys_for_test(&[&new]);
        let refused = cache.authorize(&authn, Policy::User, &mut with_token(&old_token));
        assert!(matches!(refused, Err(Refusal::Unauthenticated(_))));
        let new_token = sign(&new).issue("bob", Role::Customer).access_token;
        let mut headers = with_token(&new_token);
        cache.authorize(&authn, Policy::User, &mut headers).unwrap();
        assert_eq!(headers[USER_ID], "bob");
    }

    #[test]
    fn client_identity_headers_never_pass() {
        let (authn, signer) = setup();
        let cache = TokenCache::default();
        let mut headers = with_token(&signer.issue("alice", Role::Customer).access_token);
        headers.insert(USER_ID, HeaderValue::from_static("root"));
        headers.insert(USER_ROLE, HeaderValue::from_static("admin"));
        cache
            .authorize(&authn, Policy::Public, &mut headers)
            .unwrap();
        assert!(!headers.contains_key(USER_ID) && !headers.contains_key(USER_ROLE));

        headers.insert(USER_ID, HeaderValue::from_static("root"));
        headers.insert(USER_ROLE, HeaderValue::from_static("admin"));
        cache.authorize(&authn, Policy::User, &mut headers).unwrap();
        assert_eq!(headers[USER_ID], "alice");
        assert_eq!(headers[USER_ROLE], "customer");
    }

    #[test]
    fn policies_decide_401_and_403() {
        let (authn, signer) = setup();
        let cache = TokenCache::default();
        let status = |policy, mut headers: HeaderMap| {
            cache
                .authorize(&authn, policy, &mut headers)
                .err()
                .map(|r| r.into_response().status())
        };
        assert_eq!(
            status(Policy::User, HeaderMap::new()),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(status(Policy::Public, HeaderMap::new()), None);
        let customer = signer.issue("alice", Role::Customer).access_token;
        let admin = signer.issue("root", Role::Admin).access_token;
        assert_eq!(status(Policy::User, with_token(&customer)), None);
        assert_eq!(
            status(Policy::Admin, with_token(&customer)),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(status(Policy::Admin, with_token(&admin)), None);
        assert_eq!(
            status(Policy::User, with_token("not.a.token")),
            Some(StatusCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn a_cached_entry_past_its_expiry_is_verified_again() {
        let pair = KeyPair::generate().unwrap();
        let authn = Authenticator::new(&AuthConfig::with_pair(&pair)).unwrap();
        let cache = TokenCache::default();
        let signer = TokenSigner::new(&pair, "shop", "shop", Duration::from_secs(60));
        let token = signer.issue("alice", Role::Customer).access_token;
        let mut headers = with_token(&token);
        cache.authorize(&authn, Policy::User, &mut headers).unwrap();
        // Pretend the clock moved past expiry: the cached entry must not be trusted.
        cache
            .entries
            .borrow_mut()
            .values_mut()
            .for_each(|e| e.expires_at = now_secs() - 1);
        let mut again = with_token(&token);
        cache.authorize(&authn, Policy::User, &mut again).unwrap();
        assert!(cache.entries.borrow()[token.as_str()].expires_at > now_secs());
    }

    #[test]
    fn cors_is_closed_unless_configured() {
        assert!(Cors::parse("").unwrap().is_none());
        assert!(Cors::parse("example.com").is_err());
        assert!(Cors::parse("https://a.example/path").is_err());
        let cors = Cors::parse("https://shop.example, http://localhost:3000")
            .unwrap()
            .unwrap();
        let mut preflight = HeaderMap::new();
        preflight.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://shop.example"),
        );
        preflight.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("POST"),
        );
        let ok = cors.preflight(&Method::OPTIONS, &preflight).unwrap();
        assert_eq!(ok.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            ok.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://shop.example"
        );
        preflight.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        let refused = cors.preflight(&Method::OPTIONS, &preflight).unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let mut headers = HeaderMap::new();
        cors.decorate(
            Some(&HeaderValue::from_static("https://evil.example")),
            &mut headers,
        );
        assert!(headers.is_empty());
    }
}
