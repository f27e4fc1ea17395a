//! The published API contract: `GET /api/openapi.json` is every service's own OpenAPI
//! document (generated from its handlers) merged under the paths this gateway exposes,
//! with the gateway's access policies and its own answers added; `GET /api/docs` is a
//! page that renders it, with its script and style served from the binary (no CDN).
//!
//! Reached only for requests that matched no route, so proxied requests never pay for it.
//! The merged document is rebuilt at most every [`TTL`], so it follows the deployed
//! services and the route table actually loaded.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use shop_platform::AppError;
use shop_platform::openapi::{self, BEARER_SCHEME};

use crate::Shared;
use crate::policy::access::Policy;
use crate::policy::routes::{Route, RouteTable};
use crate::proxy::{ResponseBody, error, local};

pub const DOCUMENT: &str = "/api/openapi.json";
pub const PAGE: &str = "/api/docs";
const SCRIPT: &str = "/api/docs/docs.js";
const STYLE: &str = "/api/docs/docs.css";
const TTL: Duration = Duration::from_secs(30);
/// A service document larger than this is refused rather than buffered.
const MAX_DOCUMENT: usize = 4 << 20;

const PAGE_HTML: &str = include_str!("apidocs/index.html");
const PAGE_JS: &str = include_str!("apidocs/docs.js");
const PAGE_CSS: &str = include_str!("apidocs/docs.css");

/// The merged document, rebuilt when older than [`TTL`].
#[derive(Default)]
pub struct ApiDocs {
    cached: Mutex<Option<(Instant, Bytes)>>,
}

/// Whether a path is one of ours (for the route-table test).
pub fn is_local(path: &str) -> bool {
    matches!(path, DOCUMENT | PAGE | SCRIPT | STYLE)
}

/// Answers the documentation paths; `None` for any other path.
pub async fn serve(shared: &Shared, path: &str, method: &Method) -> Option<Response<ResponseBody>> {
    if !is_local(path) {
        return None;
    }
    if !matches!(*method, Method::GET | Method::HEAD) {
        let mut response = error(AppError::from_status(StatusCode::METHOD_NOT_ALLOWED));
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Some(response);
    }
    let mut response = match path {
        PAGE => local(StatusCode::OK, "text/html; charset=utf-8", PAGE_HTML),
        SCRIPT => local(StatusCode::OK, "text/javascript; charset=utf-8", PAGE_JS),
        STYLE => local(StatusCode::OK, "text/css; charset=utf-8", PAGE_CSS),
        _ => match document(shared).await {
            Ok(body) => local(StatusCode::OK, "application/json", body),
            Err(reason) => {
                let mut err = AppError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "docs_unavailable",
                    format!("the API document cannot be assembled right now: {reason}"),
                );
                err.retry_after_secs = Some(5);
                return Some(error(err));
            }
        },
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=30"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    Some(response)
}

async fn document(shared: &Shared) -> Result<Bytes, String> {
    let docs = &shared.docs;
    if let Some((at, body)) = docs.cached.lock().expect("not poisoned").as_ref()
        && at.elapsed() < TTL
    {
        return Ok(body.clone());
    }
    let timeout = shared.options.upstream_timeout;
    let mut fetched = Vec::with_capacity(shared.upstreams.len());
    for upstream in &shared.upstreams {
        let endpoint = upstream
            .pick(None)
            .ok_or_else(|| format!("{} has no healthy endpoint", upstream.name))?;
        let doc = tokio::time::timeout(timeout, fetch(endpoint.authority.as_str()))
            .await
            .map_err(|_| format!("{} did not send its document in time", upstream.name))?
            .map_err(|e| format!("{}: {e}", upstream.name))?;
        fetched.push(doc);
    }
    let names: Vec<&str> = shared.upstreams.iter().map(|u| u.name.as_str()).collect();
    let merged = merge(&shared.table, &names, &fetched);
    let body = Bytes::from(merged.to_string());
    *docs.cached.lock().expect("not poisoned") = Some((Instant::now(), body.clone()));
    Ok(body)
}

/// `GET /openapi.json` from one endpoint, on a connection of its own (this is rare).
async fn fetch(authority: &str) -> Result<Value, String> {
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::task::spawn_local(async move {
        let _ = connection.await;
    });
    let request = Request::get("/openapi.json")
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let outcome = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if response.status() != StatusCode::OK {
            return Err(format!("answered {}", response.status().as_u16()));
        }
        let body = Limited::new(response.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
    }
    .await;
    driver.abort();
    outcome
}

/// How a route exposes an upstream path, if it does: the public path.
fn expose(route: &Route, upstream_path: &str) -> Option<String> {
    match route.label.strip_suffix("/*") {
        None => (route.rewrite(&route.label, None) == upstream_path).then(|| route.label.clone()),
        Some(prefix) => {
            let base = route.rewrite(prefix, None);
            let inside = upstream_path == base
                || base == "/"
                || upstream_path
                    .strip_prefix(base.as_str())
                    .is_some_and(|rest| rest.starts_with('/'));
            inside.then(|| format!("{}{upstream_path}", route.strip()))
        }
    }
}

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
    openapi::add_error(
        op,
        429,
        &["rate_limited"],
        "too many requests from this address; wait `Retry-After` seconds",
    );
    openapi::set_header(op, 429, "Retry-After", "seconds to wait before retrying");
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
fn merge_schemas(
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
            openapi::add_error(
                op,
                429,
                &["rate_limited"],
                "too many requests from this address; wait `Retry-After` seconds",
            );
            openapi::set_header(op, 429, "Retry-After", "seconds to wait before retrying");
        }
    }
    ops.into_iter()
        .map(|(path, op)| (path.to_owned(), json!({"get": op})))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::routes::TableFile;

    fn table() -> (RouteTable, Vec<String>) {
        let file: TableFile = serde_yaml::from_str(crate::policy::routes::DEFAULT_TABLE).unwrap();
        let mut names: Vec<String> = file.upstreams.keys().cloned().collect();
        names.sort();
        (RouteTable::compile(&file.routes, &names).unwrap(), names)
    }

    fn service(paths: &[(&str, &str, &str)]) -> Value {
        let mut doc = json!({"openapi": "3.1.0", "paths": {}, "components": {"schemas": {}}});
        for (path, method, id) in paths {
            let status = if *method == "post" { "201" } else { "200" };
            doc["paths"][*path][*method] =
                json!({"operationId": id, "responses": {status: {"description": "ok"}}});
        }
        doc
    }

    #[test]
    fn paths_are_exposed_as_the_table_routes_them() {
        let (table, names) = table();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let docs: Vec<Value> = names
            .iter()
            .map(|n| match *n {
                "product" => service(&[
                    ("/products", "get", "list_products"),
                    ("/products/{id}", "get", "get_product"),
                    ("/products", "post", "create_product"),
                    ("/reservations", "post", "reserve"),
                ]),
                "user" => service(&[
                    ("/users", "post", "register"),
                    ("/auth/login", "post", "login"),
                ]),
                _ => service(&[]),
            })
            .collect();
        let doc = merge(&table, &names, &docs);
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.contains_key("/api/v1/products/{id}"));
        assert!(paths.contains_key("/api/products"));
        assert!(!paths.contains_key("/api/product"), "no such upstream path");
        assert!(
            !paths.keys().any(|p| p.contains("reservations")),
            "internal"
        );
        assert_eq!(
            paths["/api/products"]["get"]["operationId"],
            "list_products_seed"
        );
        assert_eq!(paths["/api/products"]["get"]["x-compatibility"], true);
        assert_eq!(
            paths["/api/v1/products"]["get"]["operationId"],
            "list_products"
        );
        assert!(paths["/api/v1/products"]["get"].get("security").is_none());
        let create = &paths["/api/v1/products"]["post"];
        assert_eq!(create["x-required-role"], "admin");
        assert!(
            create["responses"]["401"]["headers"]
                .get("WWW-Authenticate")
                .is_some()
        );
        assert!(create["responses"]["403"].is_object());
        assert_eq!(
            create["responses"]["201"]["links"]["read"]["operationId"],
            "get_product"
        );
        assert!(
            paths["/api/v1/auth/login"]["post"]
                .get("security")
                .is_none()
        );
        assert!(paths.contains_key(DOCUMENT));
    }

    #[test]
    fn clashing_schemas_are_renamed() {
        let mut into = Map::new();
        into.insert("Item".into(), json!({"type": "string"}));
        let doc = json!({"components": {"schemas": {"Item": {"type": "integer"}, "Box": {"$ref": "#/components/schemas/Item"}}}});
        let renames = merge_schemas(&mut into, "order", &doc);
        assert_eq!(renames, vec![("Item".to_owned(), "order_Item".to_owned())]);
        assert_eq!(into["order_Item"], json!({"type": "integer"}));
        assert_eq!(into["Box"]["$ref"], "#/components/schemas/order_Item");
    }
}
