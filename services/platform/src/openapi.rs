//! OpenAPI 3.1 documents generated from the handlers' `#[utoipa::path]` annotations, and
//! the conventions every service shares so the documents say what the code does:
//!
//! - An error response's description starts with the codes it can carry, in backticks
//!   (`` `not_found`: no product with this id ``); [`finish`] turns them into an `enum` on
//!   `error.code`, so clients can switch on codes the document lists.
//! - Answers the platform gives for any operation (malformed JSON, wrong content type,
//!   too large, bad query, timeouts, database outages, internal errors) are added to
//!   every operation they can happen to, instead of being repeated on each handler.
//!
//! The gateway merges the services' documents with the same helpers.

use serde_json::{Map, Value, json};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::Schema;
use utoipa::{PartialSchema, ToSchema};

use crate::money::{MAX_CENTS, Money};

/// Public identifiers (see [`crate::validate::id`]).
pub const ID_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";
pub const ERROR_SCHEMA: &str = "Error";
pub const BEARER_SCHEME: &str = "bearer";
const METHODS: [&str; 5] = ["get", "put", "post", "patch", "delete"];

/// The body of every error response.
#[derive(ToSchema)]
#[schema(as = Error)]
#[allow(dead_code)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// Machine-readable; each response lists the codes it can carry.
    code: String,
    /// For humans; may change between versions.
    message: String,
    /// The request field at fault (`items[0].quantity`), on validation errors.
    field: Option<String>,
}

impl PartialSchema for Money {
    fn schema() -> RefOr<Schema> {
        let max = MAX_CENTS / 100;
        serde_json::from_value(json!({
            "description": "An amount of money with at most two decimal places (exact: stored as cents). Sent as a JSON number; a decimal string is accepted too.",
            "oneOf": [
                {"type": "number", "minimum": 0, "maximum": max},
                {"type": "string", "pattern": "^[0-9]+(\\.[0-9]{1,2})?$"}
            ],
            "examples": [24.99]
        }))
        .expect("a valid schema")
    }
}

impl ToSchema for Money {}

/// Adds what every operation shares to a service's document and returns it as JSON.
pub fn finish(doc: utoipa::openapi::OpenApi) -> Value {
    let mut doc = serde_json::to_value(doc).expect("an OpenAPI document serialises");
    let schemas = &mut doc["components"]["schemas"];
    if !schemas.is_object() {
        *schemas = json!({});
    }
    schemas[ERROR_SCHEMA] = serde_json::to_value(ErrorBody::schema()).expect("schema");
    schemas["ErrorDetail"] = serde_json::to_value(ErrorDetail::schema()).expect("schema");
    let mut secured = false;
    for_each_operation(&mut doc, |_, _, op| {
        let has_body = op.get("requestBody").is_some();
        let params = op["parameters"].as_array().cloned().unwrap_or_default();
        let in_ = |place: &str| params.iter().any(|p| p["in"] == place);
        if has_body {
            add_error(
                op,
                400,
                &["malformed_json", "unreadable_body"],
                "the body is not JSON, or could not be read",
            );
            add_error(
                op,
                413,
                &["payload_too_large"],
                "the body is larger than the limit",
            );
            add_error(
                op,
                415,
                &["unsupported_media_type"],
                "the body is not `Content-Type: application/json`",
            );
            add_error(
                op,
                422,
                &["validation_failed"],
                "a field breaks its constraints; `error.field` names it",
            );
        }
        if in_("query") {
            add_error(
                op,
                400,
                &["invalid_query"],
                "a query parameter has the wrong type",
            );
        }
        if in_("path") {
            add_error(
                op,
                400,
                &["bad_request"],
                "a path parameter is not valid UTF-8",
            );
        }
        if op.get("security").is_some() {
            secured = true;
            add_error(
                op,
                401,
                &["unauthenticated", "invalid_token"],
                "no bearer token, or not a valid one (see `WWW-Authenticate`)",
            );
            set_header(
                op,
                401,
                "WWW-Authenticate",
                "RFC 6750 challenge, e.g. `Bearer realm=\"shop\", error=\"invalid_token\"`",
            );
        }
        add_error(
            op,
            500,
            &["internal"],
            "a bug; the server log has the details under this request's `x-request-id`",
        );
        add_error(
            op,
            503,
            &["dependency_unavailable"],
            "the database or another service cannot answer right now; retry after `Retry-After` seconds",
        );
        add_error(
            op,
            504,
            &["timeout"],
            "the request took longer than the server's limit",
        );
        set_header(op, 503, "Retry-After", "seconds to wait before retrying");
    });
    if secured {
        doc["components"]["securitySchemes"][BEARER_SCHEME] = bearer_scheme();
    }
    for (path, item) in platform_paths() {
        doc["paths"][path] = item;
    }
    doc
}

/// What every binary serves besides its API (see [`crate::probes`] and
/// [`crate::ServiceParts::openapi`]).
pub const PLATFORM_PATHS: [&str; 4] = ["/health", "/ready", "/metrics", "/openapi.json"];

fn platform_paths() -> [(&'static str, Value); 4] {
    let object = json!({"type": "object"});
    let op = |id: &str, summary: &str, responses: Value| json!({"get": {"tags": ["operations"], "operationId": id, "summary": summary, "responses": responses}});
    [
        (
            "/health",
            op(
                "health",
                "Liveness: 200 while the process runs",
                json!({"200": {
                "description": "Alive",
                "content": {"application/json": {"schema": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}}}}}),
            ),
        ),
        (
            "/ready",
            op(
                "ready",
                "Readiness: every dependency check passes and not shutting down",
                json!({
                "200": {"description": "Ready", "content": {"application/json": {"schema": object}}},
                "503": {"description": "Not ready; the body names each failing check", "content": {"application/json": {"schema": object}}}}),
            ),
        ),
        (
            "/metrics",
            op(
                "metrics",
                "Prometheus metrics",
                json!({"200": {
                "description": "Text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}),
            ),
        ),
        (
            "/openapi.json",
            op(
                "openapi",
                "This document",
                json!({"200": {
                "description": "OpenAPI 3.1",
                "content": {"application/json": {"schema": object}}}}),
            ),
        ),
    ]
}

pub fn bearer_scheme() -> Value {
    json!({
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "An access token from `POST /api/v1/auth/login` (EdDSA-signed JWT)."
    })
}

/// Calls `f(path, method, operation)` for every operation of a document.
pub fn for_each_operation(doc: &mut Value, mut f: impl FnMut(&str, &str, &mut Value)) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        for method in METHODS {
            if let Some(op) = item.get_mut(method) {
                f(path, method, op);
            }
        }
    }
}

/// Declares an error answer on an operation, or adds `codes` to the one already declared
/// for that status. The description of a new response is `` `code`, `code`: text ``.
pub fn add_error(op: &mut Value, status: u16, codes: &[&str], text: &str) {
    let responses = &mut op["responses"];
    if !responses.is_object() {
        *responses = json!({});
    }
    let key = status.to_string();
    let response = &mut responses[&key];
    if response.is_null() {
        *response = json!({"description": format!("{}: {text}", backticked(codes))});
    } else {
        let mut description = response["description"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let missing: Vec<&str> = codes
            .iter()
            .copied()
            .filter(|c| !description_codes(&description).iter().any(|d| d == c))
            .collect();
        if missing.is_empty() && response["content"].is_object() {
            return;
        }
        if !missing.is_empty() {
            description.push_str(&format!("\n\n{}: {text}", backticked(&missing)));
        }
        response["description"] = description.into();
    }
    let codes = description_codes(response["description"].as_str().unwrap_or_default());
    response["content"] = json!({"application/json": {"schema": error_schema(&codes)}});
}

/// The codes named by a description: the backticked words before each paragraph's colon.
pub fn description_codes(description: &str) -> Vec<String> {
    let mut codes = Vec::new();
    for paragraph in description.split("\n\n") {
        let Some((head, _)) = paragraph.split_once(':') else {
            continue;
        };
        for part in head.split(',') {
            let part = part.trim();
            if let Some(code) = part.strip_prefix('`').and_then(|p| p.strip_suffix('`'))
                && !code.is_empty()
                && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                && !codes.iter().any(|c| c == code)
            {
                codes.push(code.to_owned());
            }
        }
    }
    codes
}

fn backticked(codes: &[&str]) -> String {
    codes
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The error body with `error.code` narrowed to `codes`.
pub fn error_schema(codes: &[String]) -> Value {
    json!({
        "allOf": [
            {"$ref": format!("#/components/schemas/{ERROR_SCHEMA}")},
            {"type": "object", "properties": {"error": {"type": "object", "properties": {"code": {"enum": codes}}}}}
        ]
    })
}

/// Rewrites every error response whose description names codes to carry the narrowed
/// schema (responses written in handler annotations).
pub fn narrow_error_codes(doc: &mut Value) {
    for_each_operation(doc, |_, _, op| {
        let Some(responses) = op["responses"].as_object_mut() else {
            return;
        };
        for (status, response) in responses.iter_mut() {
            if !status.starts_with(['4', '5']) {
                continue;
            }
            let codes = description_codes(response["description"].as_str().unwrap_or_default());
            if !codes.is_empty() {
                response["content"] = json!({"application/json": {"schema": error_schema(&codes)}});
            }
        }
    });
}

pub fn set_header(op: &mut Value, status: u16, name: &str, description: &str) {
    let response = &mut op["responses"][status.to_string()];
    if response.is_object() {
        response["headers"][name] =
            json!({"description": description, "schema": {"type": "string"}});
    }
}

/// Every `(path, method)` of a document, sorted.
pub fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut ops = Vec::new();
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            for method in METHODS {
                if item.get(method).is_some() {
                    ops.push((path.clone(), method.to_owned()));
                }
            }
        }
    }
    ops.sort();
    ops
}

/// A document's finished form: annotations' error codes narrowed, shared answers added.
pub fn document(doc: utoipa::openapi::OpenApi) -> Value {
    let mut doc = finish(doc);
    narrow_error_codes(&mut doc);
    doc
}

/// Keeps the JSON object helpers in one place for the gateway's merge.
pub fn object(value: &mut Value) -> &mut Map<String, Value> {
    if !value.is_object() {
        *value = json!({});
    }
    value.as_object_mut().expect("just made an object")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_come_from_descriptions() {
        assert_eq!(
            description_codes("`a_b`, `c`: text, `not`: here\n\n`d`: more"),
            vec!["a_b", "c", "d"]
        );
        assert!(description_codes("plain: text").is_empty());
    }

    #[test]
    fn errors_merge_codes_per_status() {
        let mut op = json!({"responses": {"400": {"description": "`missing_parameter`: no id"}}});
        add_error(&mut op, 400, &["invalid_query"], "bad query");
        let codes = &op["responses"]["400"]["content"]["application/json"]["schema"]["allOf"][1]["properties"]
            ["error"]["properties"]["code"]["enum"];
        assert_eq!(codes, &json!(["missing_parameter", "invalid_query"]));
        add_error(&mut op, 400, &["invalid_query"], "bad query");
        assert_eq!(
            description_codes(op["responses"]["400"]["description"].as_str().unwrap()).len(),
            2
        );
    }

    #[test]
    fn the_error_schema_matches_the_body() {
        let schema = serde_json::to_value(ErrorBody::schema()).unwrap();
        assert_eq!(schema["required"], json!(["error"]));
        let detail = serde_json::to_value(ErrorDetail::schema()).unwrap();
        let mut required: Vec<&str> = detail["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        required.sort();
        assert_eq!(required, ["code", "message"]);
        let body: Value = serde_json::from_str(
            &crate::AppError::validation("name", "must not be empty").body_json(),
        )
        .unwrap();
        let keys: Vec<&String> = body["error"].as_object().unwrap().keys().collect();
        for key in keys {
            assert!(
                detail["properties"].get(key).is_some(),
                "{key} undocumented"
            );
        }
    }
}
