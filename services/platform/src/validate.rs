//! Input rules shared by every service, so ids look the same everywhere.

use serde::Deserialize;

use crate::error::AppError;

pub const MAX_ID_LEN: usize = 64;

/// Public identifiers: 1 to 64 ASCII letters, digits, `-` or `_` (safe in paths, logs and
/// URLs without escaping). Client-chosen ids (the seed's `"1"`) follow the same rule.
pub fn id(field: &str, id: &str) -> Result<(), AppError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(AppError::validation(
            field,
            "must be 1 to 64 letters, digits, '-' or '_'",
        ))
    }
}

/// A new resource's id: the client's (validated), or a fresh time-ordered UUID.
pub fn id_or_new(field: &str, given: Option<String>) -> Result<String, AppError> {
    match given {
        Some(given) => id(field, &given).map(|()| given),
        None => Ok(uuid::Uuid::now_v7().to_string()),
    }
}

/// The seed API's `?id=` lookups (`GET /product?id=1`, `GET /users?id=1`).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct IdQuery {
    /// The id to look up (required).
    #[param(
        required = true,
        min_length = 1,
        max_length = 64,
        pattern = "^[A-Za-z0-9_-]{1,64}$"
    )]
    id: Option<String>,
}

impl IdQuery {
    pub fn required(self) -> Result<String, AppError> {
        self.id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                AppError::bad_request("missing_parameter", "query parameter id is required")
                    .with_field("id")
            })
            .and_then(|given| id("id", &given).map(|()| given))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["1", "a-b_C", &"x".repeat(64)] {
            assert!(id("id", good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "../etc", "é", &"x".repeat(65)] {
            assert_eq!(
                id("id", bad).unwrap_err().field.as_deref(),
                Some("id"),
                "{bad}"
            );
        }
        assert_eq!(id_or_new("id", None).unwrap().len(), 36);
    }
}
