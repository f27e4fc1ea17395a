//! The merge of the services' OpenAPI documents under the gateway's paths, with the
//! gateway's access policies and its own answers added.

use std::collections::HashSet;

use serde_json::{Map, Value, json};
use shop_platform::openapi::{self, BEARER_SCHEME};

use super::{DOCUMENT, PAGE, SCRIPT, STYLE, expose, is_local};
use crate::policy::access::Policy;
use crate::policy::routes::{Route, RouteTable};

const METHODS: [&str; 5] = ["get", "put", "post", "patch", "delete"];

/// Merges the services' documents (`docs[i]` is upstream `names[i]`'s) under the public
/// paths of `table`, adding the gateway's policies, answers and own endpoints.
pub fn merge(table: &RouteTable, names: &[&str], docs: &[Value]) -> Value {
    let mut schemas = Map::new();
    let mut paths = Map::new();
    let mut used_ids = HashSet::new();
    let mut secured = false;
    for (upstream, doc) in docs.iter().enumerate() {
        let renames = merge_schemas(&mut schemas, names[upstream], doc);
        let mut doc = doc.clone();
        for (from, to) in &renames {
            rename_refs(&mut doc, from, to);
        }
        let Some(service_paths) = doc["paths"].as_object() else {
            continue;
        };
        for (route_id, route) in table.routes.iter().enumerate() {
            if route.upstream != upstream {
                continue;
            }
            for (upstream_path, item) in service_paths {
                let Some(public) = expose(route, upstream_path) else {
                    continue;
                };
                // The table decides: a longer prefix or an exact path may take it.
                if table.find(&public).map(|(id, _)| id) != Some(route_id) {
                    continue;
                }
                for method in METHODS {
                    let Some(op) = item.get(method) else { continue };
                    let mut op = op.clone();
                    let policy = if method == "get" {
                        route.access.read
                    } else {
                        route.access.write
                    };
                    secured |= decorate(
                        &mut op,
                        method,
                        route,
                        policy,
                        names[upstream],
                        &mut used_ids,
                    );
                    let entry = paths.entry(public.clone()).or_insert_with(|| json!({}));
                    entry[method] = op;
                }
            }
        }
    }
    add_links(&mut paths);
    for (path, item) in local_paths() {
        paths.insert(path, item);
    }
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "shop API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": DESCRIPTION,
        },
        "tags": [
            {"name": "products", "description": "The catalogue."},
            {"name": "orders", "description": "Orders."},
            {"name": "users", "description": "Accounts."},
            {"name": "auth", "description": "Access tokens and the key that signs them."},
            {"name": "compatibility", "description": "The seed API's routes (`/api/...`), kept so its walkthrough runs unchanged. New clients use `/api/v1`."},
            {"name": "gateway", "description": "Answered by the gateway itself."},
        ],
        "paths": paths,
        "components": {"schemas": schemas},
    });
    if secured {
        doc["components"]["securitySchemes"][BEARER_SCHEME] = openapi::bearer_scheme();
    }
    doc
}

const DESCRIPTION: &str = "The shop's public API, as the gateway exposes it. Generated from the services' code.\n\n\
Errors are JSON: `{\"error\": {\"code\", \"message\", \"field\"?}}`; each response lists the codes it can carry. \
A path no route matches answers 404 `not_found`.\n\n\
Operations marked with the `bearer` security scheme need `Authorization: Bearer <token>`; get a token from \
`POST /api/v1/users` (register) then `POST /api/v1/auth/login`. `x-required-role` says whether any user or only an admin may call.";

/// Adds the gateway's side of an operation; returns whether it needs a token.
fn decorate(
    op: &mut Value,
    method: &str,
    route: &Route,
    policy: Policy,
    upstream: &str,
    used_ids: &mut HashSet<String>,
) -> bool {
    let base = op["operationId"].as_str().unwrap_or(upstream).to_owned();
    let base = if route.compatibility && !base.ends_with("_seed") {
        format!("{base}_seed")
    } else {
        base
    };
    let mut id = base.clone();
    let mut n = 2;
    while used_ids.contains(&id) {
        id = format!("{base}_{n}");
        n += 1;
    }
    used_ids.insert(id.clone());
    op["operationId"] = id.into();

    let tags: Vec<Value> = op["tags"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t != "compatibility")
        .collect();
    if route.compatibility {
        op["tags"] = json!(["compatibility"]);
        op["x-compatibility"] = true.into();
        let summary = op["summary"].as_str().unwrap_or_default().to_owned();
        op["summary"] = format!("{summary} (seed API compatibility route)").into();
    } else if tags.is_empty() {
        op["tags"] = json!([upstream]);
    } else {
        op["tags"] = tags.into();
    }

    let has_params = |place: &str| {
        op["parameters"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["in"] == place))
    };
    let path_params = has_params("path");
    let secured = policy != Policy::Public;
    if secured {
        op["security"] = json!([{BEARER_SCHEME: []}]);
        op["x-required-role"] = (if policy == Policy::Admin {
            "admin"
        } else {
            "user"
        })
        .into();
    }
    if op.get("security").is_some() {
        openapi::add_error(
            op,
            401,
            &["unauthenticated", "invalid_token"],
            "no bearer token, or not a valid one (see `WWW-Authenticate`)",
        );
        openapi::set_header(
            op,
            401,
            "WWW-Authenticate",
            "RFC 6750 challenge, e.g. `Bearer realm=\"shop\", error=\"invalid_token\"`",
        );
    }
    if policy == Policy::Admin {
        openapi::add_error(op, 403, &["forbidden"], "the token's user is not an admin");
    }
    if path_params {
        openapi::add_error(
            op,
            400,
            &["invalid_path"],
            "the path has dot segments, empty segments or encoded separators",
        );
        openapi::add_error(op, 404, &["not_found"], "nothing at this path");
    }
    gateway_errors(op, method);
    secured || op.get("security").is_some()
}

/// What the gateway itself may answer to any request it would proxy.
fn gateway_errors(op: &mut Value, method: &str) {
    if method == "get" {
        openapi::add_error(
            op,
            400,
            &["body_not_allowed"],
            "a GET request carries no body",
        );
    }
    openapi::add_error(
        op,
        431,
        &["too_many_headers"],
        "more header lines than the gateway forwards",
    );
    openapi::add_error(
        op,
        413,
        &["payload_too_large"],
        "the body (or its `Content-Length`) is over the gateway's limit",
    );
    document_rate_limit(op);
    openapi::add_error(
        op,
        502,
        &["bad_gateway"],
        "the service closed the connection without a whole answer",
    );
    openapi::add_error(
        op,
        503,
        &["circuit_open", "dependency_unavailable"],
        "the service is failing or has no healthy endpoint; retry after `Retry-After` seconds",
    );
    openapi::set_header(op, 503, "Retry-After", "seconds to wait before retrying");
    openapi::add_error(
        op,
        504,
        &["upstream_timeout"],
        "the service did not answer in time",
    );
}

/// A created resource links to where it can be read: `POST /x` 201 -> `GET /x/{id}`.
/// The per-address rate limit's answer, on every operation it applies to.
fn document_rate_limit(op: &mut Value) {
    openapi::add_error(
        op,
        429,
        &["rate_limited"],
        "too many requests from this address; wait `Retry-After` seconds",
    );
    openapi::set_header(op, 429, "Retry-After", "seconds to wait before retrying");
}

fn add_links(paths: &mut Map<String, Value>) {
    let targets: Vec<(String, String)> = paths
        .iter()
        .filter_map(|(path, item)| {
            let collection = path.strip_suffix("/{id}")?;
            let id = item["get"]["operationId"].as_str()?;
            Some((collection.to_owned(), id.to_owned()))
        })
        .collect();
    for (collection, target) in targets {
        if let Some(created) = paths
            .get_mut(&collection)
            .and_then(|item| item.get_mut("post"))
            .and_then(|op| op["responses"].get_mut("201"))
        {
            created["links"]["read"] = json!({
                "operationId": target,
                "parameters": {"id": "$response.body#/id"},
                "description": "The resource just created."
            });
        }
    }
}

/// Adds one document's component schemas; a name already taken by a different schema
/// is renamed `<upstream>_<name>`. Returns the renames to apply to its references.
pub(super) fn merge_schemas(
    into: &mut Map<String, Value>,
    upstream: &str,
    doc: &Value,
) -> Vec<(String, String)> {
    let Some(schemas) = doc["components"]["schemas"].as_object() else {
        return Vec::new();
    };
    let renames: Vec<(String, String)> = schemas
        .iter()
        .filter(|(name, schema)| into.get(*name).is_some_and(|e| e != *schema))
        .map(|(name, _)| (name.clone(), format!("{upstream}_{name}")))
        .collect();
    for (name, schema) in schemas {
        let mut schema = schema.clone();
        for (from, to) in &renames {
            rename_refs(&mut schema, from, to);
        }
        let name = renames
            .iter()
            .find(|(from, _)| from == name)
            .map_or_else(|| name.clone(), |(_, to)| to.clone());
        into.entry(name).or_insert(schema);
    }
    renames
}

fn rename_refs(value: &mut Value, from: &str, to: &str) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "$ref" && v.as_str() == Some(&format!("#/components/schemas/{from}")) {
                    *v = format!("#/components/schemas/{to}").into();
                } else {
                    rename_refs(v, from, to);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rename_refs(v, from, to)),
        _ => {}
    }
}

/// The gateway's own endpoints.
fn local_paths() -> Vec<(String, Value)> {
    let mut doc_op = json!({
        "tags": ["gateway"], "operationId": "api_document",
        "summary": "This document (OpenAPI 3.1)",
        "responses": {"200": {"description": "The merged API document", "content": {"application/json": {"schema": {"type": "object"}}}}}
    });
    openapi::add_error(
        &mut doc_op,
        503,
        &["docs_unavailable"],
        "a service's document cannot be fetched right now",
    );
    openapi::set_header(
        &mut doc_op,
        503,
        "Retry-After",
        "seconds to wait before retrying",
    );
    let text = |id: &str, summary: &str, media: &str| {
        json!({"tags": ["gateway"], "operationId": id, "summary": summary,
            "responses": {"200": {"description": summary, "content": {media: {"schema": {"type": "string"}}}}}})
    };
    let mut ops = vec![
        (DOCUMENT, doc_op),
        (
            PAGE,
            text("api_docs_page", "The API documentation page", "text/html"),
        ),
        (
            SCRIPT,
            text(
                "api_docs_script",
                "The documentation page's script",
                "text/javascript",
            ),
        ),
        (
            STYLE,
            text(
                "api_docs_style",
                "The documentation page's style",
                "text/css",
            ),
        ),
        (
            "/health",
            json!({"tags": ["gateway"], "operationId": "health", "summary": "Liveness: 200 while the process runs",
            "responses": {"200": {"description": "Alive", "content": {"application/json": {"schema": {
                "type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}}}}}}),
        ),
        (
            "/ready",
            json!({"tags": ["gateway"], "operationId": "ready", "summary": "Readiness, with the upstreams' health",
            "responses": {
                "200": {"description": "Ready", "content": {"application/json": {"schema": {"type": "object"}}}},
                "503": {"description": "Not ready (a check fails, or shutting down)", "content": {"application/json": {"schema": {"type": "object"}}}}}}),
        ),
        (
            "/metrics",
            text("metrics", "Prometheus metrics", "text/plain"),
        ),
    ];
    for (path, op) in ops.iter_mut() {
        // The probes are answered before rate limiting; the documentation after it.
        if is_local(path) {
            document_rate_limit(op);
        }
    }
    ops.into_iter()
        .map(|(path, op)| (path.to_owned(), json!({"get": op})))
        .collect()
}
