//! Access tokens: EdDSA (Ed25519) JWTs signed by the user service and verified by the
//! gateway and by each service (defence in depth). One module so that the claims, the
//! checks and the error a client sees are the same everywhere.
//!
//! Keys are PEM files (a Kubernetes Secret in the chart). For the local launcher a key
//! pair is generated on first run and kept under `DATA_DIR`; the public half is published
//! as a JWK set for verifiers.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::AppError;

/// Default `iss` and `aud`: tokens are minted by and for this service set.
pub const DEFAULT_ISSUER: &str = "shop";
pub const DEFAULT_AUDIENCE: &str = "shop";
/// Clock skew tolerated between the signer's and a verifier's clocks.
pub(crate) const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Admin => "admin",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "customer" => Some(Role::Customer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub exp: u64,
    pub iat: u64,
    pub iss: String,
    pub aud: String,
}

/// A key pair in PKCS#8 / SPKI PEM form.
#[derive(Clone)]
pub struct KeyPair {
    pub private_pem: String,
    pub public_pem: String,
    public_raw: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    // Never print the private key, not even in a debug dump.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("key_id", &key_id(&self.public_raw))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an Ed25519 private key in PKCS#8 PEM form")]
    Invalid { path: PathBuf },
    #[error("no secure random source: {0}")]
    Random(String),
}

impl KeyPair {
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_signing_key(&SigningKey::from_bytes(&seed)))
    }

    fn from_signing_key(key: &SigningKey) -> Self {
        let private_pem = key
            .to_pkcs8_pem(LineEnding::LF)
            .expect("an Ed25519 key encodes")
            .to_string();
        let verifying = key.verifying_key();
        let public_pem = verifying
            .to_public_key_pem(LineEnding::LF)
            .expect("an Ed25519 key encodes");
        Self {
            private_pem,
            public_pem,
            public_raw: verifying.to_bytes(),
        }
    }

    /// Reads the private key at `path`.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_pem(&pem, path)
    }

    /// A private key given as PEM text; `source` names where it came from in errors.
    pub fn from_pem(pem: &str, source: &Path) -> Result<Self, KeyError> {
        use ed25519_dalek::pkcs8::DecodePrivateKey;
        let key = SigningKey::from_pkcs8_pem(pem.trim()).map_err(|_| KeyError::Invalid {
            path: source.to_owned(),
        })?;
        Ok(Self::from_signing_key(&key))
    }

    /// Reads the private key at `path`, or creates one there (owner-only permissions)
    /// with its public half beside it as `<path>.pub`. For the local launcher.
    pub fn load_or_generate(path: &Path) -> Result<Self, KeyError> {
        if path.exists() {
            return Self::load(path);
        }
        let pair = Self::generate()?;
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        write_secret_file(path, &pair.private_pem).map_err(io)?;
        std::fs::write(public_path(path), &pair.public_pem).map_err(io)?;
        Ok(pair)
    }

    /// The public key as a JWK set (`/.well-known/jwks.json`).
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({"keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": "EdDSA",
            "use": "sig",
            "kid": key_id(&self.public_raw),
            "x": URL_SAFE_NO_PAD.encode(self.public_raw),
        }]})
    }
}

/// Where `load_or_generate` keeps the public half of the key at `private`.
pub fn public_path(private: &Path) -> PathBuf {
    let mut name = private.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Creates `path` readable only by its owner; refuses to overwrite an existing file.
pub fn write_secret_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents.as_bytes())
}

/// A short, stable name for a public key (first 8 bytes of it, base64url).
fn key_id(public: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(&public[..8])
}

pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An access token as OAuth2 clients expect it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct IssuedToken {
    /// Send as `Authorization: Bearer <access_token>`.
    pub access_token: String,
    #[schema(value_type = String, pattern = "^Bearer$")]
    pub token_type: &'static str,
    /// Seconds until the token expires.
    #[schema(minimum = 1)]
    pub expires_in: u64,
}

pub struct TokenSigner {
    key: EncodingKey,
    kid: String,
    issuer: String,
    audience: String,
    ttl: Duration,
}

impl TokenSigner {
    pub fn new(pair: &KeyPair, issuer: &str, audience: &str, ttl: Duration) -> Self {
        Self {
            key: EncodingKey::from_ed_pem(pair.private_pem.as_bytes())
                .expect("a KeyPair holds a valid Ed25519 key"),
            kid: key_id(&pair.public_raw),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            ttl,
        }
    }

    pub fn issue(&self, subject: &str, role: Role) -> IssuedToken {
        self.issue_at(subject, role, now_secs())
    }

    /// A token as if issued at `iat` (Unix seconds): for tests of expiry.
    pub fn issue_at(&self, subject: &str, role: Role, iat: u64) -> IssuedToken {
        let claims = Claims {
            sub: subject.to_owned(),
            role,
            iat,
            exp: iat + self.ttl.as_secs(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        IssuedToken {
            access_token: jsonwebtoken::encode(&header, &claims, &self.key)
                .expect("signing with a valid key cannot fail"),
            token_type: "Bearer",
            expires_in: self.ttl.as_secs(),
        }
    }
}

/// Why a token was refused. The message is for the client; it never echoes the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("a bearer token is required")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid")]
    Invalid,
}

impl TokenError {
    /// 401 with the `WWW-Authenticate` challenge RFC 6750 describes.
    pub fn into_app_error(self) -> AppError {
        let code = match self {
            TokenError::Missing => "unauthenticated",
            TokenError::Expired | TokenError::Invalid => "invalid_token",
        };
        AppError::new(http::StatusCode::UNAUTHORIZED, code, self.to_string())
    }

    pub fn challenge(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            TokenError::Missing => r#"Bearer realm="shop""#,
            TokenError::Expired => {
                r#"Bearer realm="shop", error="invalid_token", error_description="the token has expired""#
            }
            TokenError::Invalid => r#"Bearer realm="shop", error="invalid_token""#,
        })
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A 401 response body and challenge header for `err`.
pub fn unauthorized(err: TokenError) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response = err.into_app_error().into_response();
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, err.challenge());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> KeyPair {
        KeyPair::generate().unwrap()
    }

    fn signer(pair: &KeyPair) -> TokenSigner {
        TokenSigner::new(pair, "shop", "shop", Duration::from_secs(900))
    }

    fn verifier(pair: &KeyPair) -> crate::Authenticator {
        crate::Authenticator::new(&crate::AuthConfig::with_pair(pair)).unwrap()
    }

    #[test]
    fn a_token_round_trips_with_all_claims() {
        let pair = pair();
        let issued = signer(&pair).issue("alice", Role::Customer);
        assert_eq!((issued.token_type, issued.expires_in), ("Bearer", 900));
        let claims = verifier(&pair).verify(&issued.access_token).unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.role, Role::Customer);
        assert_eq!(claims.exp - claims.iat, 900);
        assert_eq!((claims.iss.as_str(), claims.aud.as_str()), ("shop", "shop"));
    }

    #[test]
    fn expired_tokens_are_refused_as_expired() {
        let pair = pair();
        let old = signer(&pair).issue_at("alice", Role::Admin, now_secs() - 3600);
        assert_eq!(
            verifier(&pair).verify(&old.access_token),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn a_token_signed_by_another_key_is_refused() {
        let token = signer(&pair()).issue("alice", Role::Admin).access_token;
        assert_eq!(verifier(&pair()).verify(&token), Err(TokenError::Invalid));
    }

    #[test]
    fn alg_none_and_tampered_payloads_are_refused() {
        let pair = pair();
        let token = signer(&pair).issue("alice", Role::Customer).access_token;
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();

        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
        claims["role"] = "admin".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(verifier(&pair).verify(&tampered), Err(TokenError::Invalid));

        parts[0] = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        for unsigned in [
            format!("{}.{}.", parts[0], forged_payload),
            format!("{}.{}", parts[0], forged_payload),
        ] {
            assert_eq!(verifier(&pair).verify(&unsigned), Err(TokenError::Invalid));
        }
    }

    #[test]
    fn wrong_issuer_or_audience_is_refused() {
        let pair = pair();
        for (iss, aud) in [("elsewhere", "shop"), ("shop", "elsewhere")] {
            let token = TokenSigner::new(&pair, iss, aud, Duration::from_secs(60))
                .issue("alice", Role::Customer)
                .access_token;
            assert_eq!(verifier(&pair).verify(&token), Err(TokenError::Invalid));
        }
    }

    #[test]
    fn bearer_header_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        for (value, expected) in [
            ("Bearer abc", Some("abc")),
            ("bearer  abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer ", None),
            ("Bearer", None),
        ] {
            headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            assert_eq!(bearer(&headers), expected, "{value}");
        }
    }

    #[test]
    fn keys_are_generated_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/jwt-ed25519.pem");
        let first = KeyPair::load_or_generate(&path).unwrap();
        let again = KeyPair::load_or_generate(&path).unwrap();
        assert_eq!(first.public_pem, again.public_pem);
        assert_eq!(
            std::fs::read_to_string(public_path(&path)).unwrap(),
            first.public_pem
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let token = signer(&again).issue("bob", Role::Customer).access_token;
        assert!(verifier(&first).verify(&token).is_ok());
        assert!(!format!("{first:?}").contains("PRIVATE"));
    }

    #[test]
    fn jwks_publishes_the_raw_public_key() {
        let pair = pair();
        let jwks = pair.jwks();
        let key = &jwks["keys"][0];
        assert_eq!(key["kty"], "OKP");
        assert_eq!(key["crv"], "Ed25519");
        let x = URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap();
        assert_eq!(x, pair.public_raw);
    }

    #[test]
    fn a_refusal_is_a_401_with_a_challenge() {
        let response = unauthorized(TokenError::Expired);
        assert_eq!(response.status(), http::StatusCode::UNAUTHORIZED);
        let challenge = response.headers()[WWW_AUTHENTICATE].to_str().unwrap();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
        assert!(challenge.contains("invalid_token"), "{challenge}");
    }
}
