//! One error type for every handler, rendered as
//! `{"error":{"code":"...","message":"...","field":"..."}}` with the matching status.
//! Internal causes are logged, never returned.

use std::borrow::Cow;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct AppError {
    pub status: StatusCode,
    pub code: Cow<'static, str>,
    pub message: String,
    pub field: Option<String>,
    /// Logged when the response is built; never serialised.
    #[source]
    pub cause: Option<anyhow::Error>,
    pub retry_after_secs: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl AppError {
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            field: None,
            cause: None,
            retry_after_secs: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 422 naming the offending field.
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        let message = message.into();
        Self {
            field: Some(field.clone()),
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                format!("{field}: {message}"),
            )
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// A dependency (database, another service) cannot answer.
    pub fn unavailable(dependency: &str, message: impl Into<String>) -> Self {
        Self {
            retry_after_secs: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "dependency_unavailable",
                format!("{dependency}: {}", message.into()),
            )
        }
    }

    pub fn timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the request took too long and was abandoned",
        )
    }

    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        Self {
            cause: Some(cause.into()),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the server log with this request's x-request-id",
            )
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// The canonical body for a bare status (used where no handler produced one).
    pub fn from_status(status: StatusCode) -> Self {
        let code = match status {
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => "timeout",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            StatusCode::TOO_MANY_REQUESTS => "rate_limited",
            s if s.is_server_error() => "internal",
            _ => "bad_request",
        };
        let message = status.canonical_reason().unwrap_or("error").to_lowercase();
        Self::new(status, code, message)
    }

    pub fn body_json(&self) -> String {
        serde_json::to_string(&Body {
            error: Inner {
                code: &self.code,
                message: &self.message,
                field: self.field.as_deref(),
            },
        })
        .expect("error body serialises")
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match &self.cause {
            Some(cause) if self.status.is_server_error() => {
                tracing::error!(code = %self.code, error = format!("{cause:#}"), "request failed")
            }
            Some(cause) => {
                tracing::warn!(code = %self.code, error = format!("{cause:#}"), "request failed")
            }
            None if self.status.is_server_error() => {
                tracing::warn!(code = %self.code, message = %self.message, "request failed")
            }
            None => {}
        }
        let mut response = (self.status, self.body_json()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<sqlx::Error> for AppError {
    fn from(err: sqlx::Error) -> Self {
        if crate::db::is_unavailable(&err) {
            AppError {
                cause: Some(err.into()),
                ..AppError::unavailable("database", "not reachable right now")
            }
        } else {
            AppError::internal(err)
        }
    }
}

pub type AppResult<T> = Result<T, AppError>;

/// JSON body extractor whose every rejection is an [`AppError`]: 415 without a JSON
/// content type, 413 over the body limit, 400 for malformed JSON, 422 naming the field
/// for wrong types, missing or unknown fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !has_json_content_type(req.headers()) {
            return Err(AppError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected a body with Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(bytes_rejection)?;
        parse_json(&bytes).map(ApiJson)
    }
}

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Deserialises a JSON object with the path of the failing field, for 422 messages.
/// Every request body of this API is an object; serde would otherwise also accept a
/// struct written as an array.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        None => {
            return Err(AppError::bad_request(
                "malformed_json",
                "the request body is empty",
            ));
        }
        Some(b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
            return Err(AppError::validation("body", "must be a JSON object"));
        }
        Some(_) => {
            return Err(AppError::bad_request(
                "malformed_json",
                "the request body is not JSON",
            ));
        }
    }
    // Tracking the path allocates as it goes, so it is only done again, for the message,
    // when the plain parse has failed (it fails the same way twice).
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let message = strip_position(&inner.to_string());
                let field = match (path.as_str(), missing_field(&message)) {
                    (".", Some(missing)) => missing.to_owned(),
                    (".", None) => "body".to_owned(),
                    (_, Some(missing)) => format!("{path}.{missing}"),
                    _ => path,
                };
                AppError::validation(field, message)
            }
            _ => AppError::bad_request("malformed_json", format!("malformed JSON: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| AppError::bad_request("malformed_json", format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// serde reports a missing field at its parent's path; the field is named in the message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

fn bytes_rejection(rejection: BytesRejection) -> AppError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body is larger than the configured limit",
        )
    } else {
        AppError::bad_request("unreadable_body", rejection.body_text())
    }
}

fn has_json_content_type(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// Query-string extractor with JSON errors (400 naming the parameter).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|rejection: QueryRejection| {
                AppError::bad_request("invalid_query", rejection.body_text())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Payload {
        name: String,
        quantity: u32,
    }

    #[test]
    fn malformed_json_is_400() {
        let err = parse_json::<Payload>(b"{\"name\": ").unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.code, "malformed_json");
    }

    #[test]
    fn wrong_type_is_422_naming_field() {
        let err = parse_json::<Payload>(br#"{"name":"a","quantity":-1}"#).unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(err.field.as_deref(), Some("quantity"));
    }

    #[test]
    fn unknown_and_missing_fields_are_422() {
        let err = parse_json::<Payload>(br#"{"name":"a","quantity":1,"x":1}"#).unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(err.message.contains("unknown field"), "{}", err.message);
        let err = parse_json::<Payload>(br#"{"name":"a"}"#).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("quantity"));
        let err = parse_json::<Payload>(b"[1]").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("body"));
    }

    #[test]
    fn trailing_garbage_is_400() {
        let err = parse_json::<Payload>(br#"{"name":"a","quantity":1} x"#).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn body_shape() {
        let body = AppError::validation("name", "must not be empty").body_json();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "validation_failed");
        assert_eq!(v["error"]["field"], "name");
        assert_eq!(v["error"]["message"], "name: must not be empty");
    }

    #[test]
    fn internal_detail_is_not_exposed() {
        let err = AppError::internal(anyhow::anyhow!("password=hunter2 leaked"));
        assert!(!err.body_json().contains("hunter2"));
    }
}
