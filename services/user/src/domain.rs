//! Users and the rules for registering one. Passwords exist in clear only inside the
//! request that carries them: they are hashed with argon2id before anything is stored.

use std::fmt;

use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version};
use serde::{Deserialize, Serialize};
pub use shop_platform::auth::Role;
use shop_platform::{AppError, validate};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub id: String,
    pub name: String,
    /// Lower-cased.
    pub email: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// `customer` for every registration; `admin` only by configuration.
    pub role: Role,
    /// The account's orders, counted from the order service's events: they may trail a
    /// placed or cancelled order by a moment.
    #[serde(default)]
    pub orders: OrderCounts,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderCounts {
    pub placed: i64,
    pub cancelled: i64,
}

/// A password that never prints itself.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Password(String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// `POST /users` (and the seed's `POST /user`) body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "Ada", "email": "ada@example.com", "password": "correct horse"}))]
pub struct NewUser {
    /// Optional client-chosen id; generated (a UUID) when absent.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$", min_length = 1, max_length = 64)]
    pub id: Option<String>,
    /// Trimmed; no control characters.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub name: String,
    /// Unique, compared case-insensitively.
    #[schema(
        max_length = 254,
        pattern = "^\\s*[^@\\s\\x00-\\x1f\\x7f-\\x9f]{1,64}@(?:[^.@\\s\\x00-\\x1f\\x7f-\\x9f-](?:[^.@\\s\\x00-\\x1f\\x7f-\\x9f]*[^.@\\s\\x00-\\x1f\\x7f-\\x9f-])?\\.)+[^.@\\s\\x00-\\x1f\\x7f-\\x9f-](?:[^.@\\s\\x00-\\x1f\\x7f-\\x9f]*[^.@\\s\\x00-\\x1f\\x7f-\\x9f-])?\\s*$"
    )]
    pub email: String,
    /// Stored only as an argon2id hash; never returned.
    #[schema(value_type = String, format = Password, min_length = 6, max_length = 1024)]
    pub password: Password,
}

/// A validated registration, ready to hash and store.
#[derive(Debug)]
pub struct Registration {
    pub id: String,
    pub name: String,
    pub email: String,
    pub password: Password,
}

/// The seed's walkthrough registers with "secret"; longer is better and up to the user.
pub const MIN_PASSWORD_CHARS: usize = 6;
/// Characters, as the published schema's `maxLength` counts.
pub const MAX_PASSWORD_CHARS: usize = 1024;

impl NewUser {
    pub fn validate(self) -> Result<Registration, AppError> {
        let id = validate::id_or_new("id", self.id)?;
        let too_long = self.name.chars().count() > 100;
        let name = self.name.trim();
        if name.is_empty() {
            return Err(AppError::validation("name", "must not be empty"));
        }
        if too_long || name.chars().any(char::is_control) {
            return Err(AppError::validation(
                "name",
                "must be at most 100 characters, without control characters",
            ));
        }
        let email = normalize_email(&self.email)?;
        let password = self.password.0;
        if password.chars().count() < MIN_PASSWORD_CHARS {
            return Err(AppError::validation(
                "password",
                format!("must be at least {MIN_PASSWORD_CHARS} characters"),
            ));
        }
        if password.chars().count() > MAX_PASSWORD_CHARS {
            return Err(AppError::validation(
                "password",
                format!("must be at most {MAX_PASSWORD_CHARS} characters"),
            ));
        }
        Ok(Registration {
            id,
            name: name.to_owned(),
            email,
            password: Password(password),
        })
    }
}

/// A pragmatic check (one `@`, a dotted domain, no spaces), lower-cased for uniqueness.
pub fn normalize_email(raw: &str) -> Result<String, AppError> {
    let invalid = || AppError::validation("email", "must be an address like name@example.com");
    // Lengths in characters of what was sent, as the published schema counts them.
    if raw.chars().count() > 254 {
        return Err(invalid());
    }
    let email = raw.trim().to_lowercase();
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid());
    }
    let (local, domain) = email.split_once('@').ok_or_else(invalid)?;
    let labels_ok = domain
        .split('.')
        .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'));
    if local.is_empty()
        || local.chars().count() > 64
        || domain.contains('@')
        || !domain.contains('.')
        || !labels_ok
    {
        return Err(invalid());
    }
    Ok(email)
}

/// `POST /auth/login` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    #[schema(
        max_length = 254,
        pattern = "^\\s*[^@\\s\\x00-\\x1f\\x7f-\\x9f]{1,64}@(?:[^.@\\s\\x00-\\x1f\\x7f-\\x9f-](?:[^.@\\s\\x00-\\x1f\\x7f-\\x9f]*[^.@\\s\\x00-\\x1f\\x7f-\\x9f-])?\\.)+[^.@\\s\\x00-\\x1f\\x7f-\\x9f-](?:[^.@\\s\\x00-\\x1f\\x7f-\\x9f]*[^.@\\s\\x00-\\x1f\\x7f-\\x9f-])?\\s*$"
    )]
    pub email: String,
    #[schema(value_type = String, format = Password, min_length = 1, max_length = 1024)]
    pub password: Password,
}

impl Credentials {
    /// The normalised email, or a 422 for input no account could have. Passwords of any
    /// content are only ever compared, so only their size is checked.
    pub fn validate(self) -> Result<(String, Password), AppError> {
        let email = normalize_email(&self.email)?;
        if self.password.0.is_empty() || self.password.0.chars().count() > MAX_PASSWORD_CHARS {
            return Err(AppError::validation(
                "password",
                format!("must be 1 to {MAX_PASSWORD_CHARS} characters"),
            ));
        }
        Ok((email, self.password))
    }
}

/// How many failed logins are allowed before further attempts wait, and for how long.
/// An account's counter is cleared by a successful login; an address's only by time.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    pub per_account: i64,
    pub per_address: i64,
    pub window: std::time::Duration,
}

/// The throttling keys of one attempt.
pub fn throttle_keys(email: &str, address: &str) -> [String; 2] {
    [format!("account:{email}"), format!("ip:{address}")]
}

/// argon2id with the OWASP-recommended minimum for argon2id: 19 MiB memory, 2 passes,
/// 1 lane (about 20-40 ms on one core here). Stored in PHC format, so parameters can be
/// raised later and old hashes still verify.
pub fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// CPU-heavy: call from a blocking thread.
pub fn hash_password(password: &Password) -> anyhow::Result<String> {
    let hash = hasher()
        .hash_password(password.0.as_bytes())
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
    Ok(hash.to_string())
}

/// Checks `password` against a stored PHC string in constant time. CPU-heavy.
pub fn verify_password(password: &Password, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|hash| {
        hasher()
            .verify_password(password.0.as_bytes(), &hash)
            .is_ok()
    })
}

/// A hash no password matches, verified when an email is unknown so that the answer
/// takes as long as for a known email (no account enumeration by timing).
pub fn decoy_hash() -> String {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).expect("a secure random source");
    let decoy = Password(hex::encode(random));
    hash_password(&decoy).expect("hashing a decoy")
}

impl Password {
    pub fn new(text: impl Into<String>) -> Self {
        Password(text.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_argon2id_and_verifies() {
        let password = Password("correct horse".into());
        let phc = hash_password(&password).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(!phc.contains("correct horse"));
        assert!(
            hasher()
                .verify_password(b"correct horse", phc.as_str())
                .is_ok()
        );
        assert!(hasher().verify_password(b"wrong", phc.as_str()).is_err());
    }

    #[test]
    fn verification_accepts_only_the_password() {
        let phc = hash_password(&Password::new("correct horse")).unwrap();
        assert!(verify_password(&Password::new("correct horse"), &phc));
        assert!(!verify_password(&Password::new("correct horsf"), &phc));
        assert!(!verify_password(
            &Password::new("correct horse"),
            "not a hash"
        ));
        let decoy = decoy_hash();
        assert!(decoy.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(!verify_password(&Password::new(""), &decoy));
    }

    #[test]
    fn password_debug_is_redacted() {
        let user: NewUser =
            serde_json::from_str(r#"{"name":"a","email":"a@b.co","password":"hunter22"}"#).unwrap();
        assert!(!format!("{user:?}").contains("hunter22"));
    }

    #[test]
    fn emails() {
        assert_eq!(
            normalize_email(" John@Example.COM ").unwrap(),
            "john@example.com"
        );
        for bad in [
            "",
            "john",
            "john@",
            "@example.com",
            "john@example",
            "jo hn@example.com",
            "a@b@c.com",
            "a@-b.com",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad:?} accepted");
        }
    }
}
