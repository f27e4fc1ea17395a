//! `<binary> smoke URL`: the end-to-end check run by `helm test` (and usable against any
//! deployment): through the gateway at URL it waits for readiness, picks a product in
//! stock, registers a fresh user, logs in, places an order for one unit with the token and
//! reads it back, checking every answer. It lives in the platform so every image can run it without a shell or curl.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// How long the gateway may take to become ready (pods still starting after an install).
const READY_WAIT: Duration = Duration::from_secs(90);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub fn main(name: &str, args: &[String]) -> ExitCode {
    let [base] = args else {
        eprintln!(
            "{name} smoke: expected the gateway's base URL, e.g. `smoke http://shop-gateway:8080`"
        );
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{name} smoke: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(base.trim_end_matches('/'))) {
        Ok(()) => {
            println!("smoke: passed");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("smoke: FAILED: {err}");
            ExitCode::FAILURE
        }
    }
}

struct Gateway {
    http: reqwest::Client,
    base: String,
    /// The smoke user's access token, once logged in.
    token: Option<String>,
}

impl Gateway {
    /// Sends one request; returns the status and the JSON body (Null when empty).
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), String> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| format!("{method} {url}: reading body: {e}"))?;
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .map_err(|e| format!("{method} {url}: {status}, body is not JSON ({e}): {text}"))?
        };
        Ok((status, value))
    }

    async fn expect(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        want: StatusCode,
    ) -> Result<Value, String> {
        let (status, value) = self.call(method.clone(), path, body).await?;
        if status != want {
            return Err(format!(
                "{method} {path}: expected {want}, got {status}: {value}"
            ));
        }
        Ok(value)
    }
}

async fn run(base: &str) -> Result<(), String> {
    let gateway = Gateway {
        http: reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?,
        base: base.to_owned(),
        token: None,
    };

    let deadline = Instant::now() + READY_WAIT;
    loop {
        match gateway
            .call(Method::GET, crate::probes::READY_PATH, None)
            .await
        {
            Ok((StatusCode::OK, _)) => break,
            outcome if Instant::now() >= deadline => {
                return Err(format!(
                    "gateway not ready within {}s: {outcome:?}",
                    READY_WAIT.as_secs()
                ));
            }
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    println!("ok   gateway {base} is ready");

    let products = gateway
        .expect(
            Method::GET,
            "/api/v1/products?limit=100",
            None,
            StatusCode::OK,
        )
        .await?;
    let product = products
        .as_array()
        .and_then(|list| {
            list.iter()
                .find(|p| p["quantity"].as_i64().is_some_and(|q| q >= 1))
        })
        .ok_or_else(|| format!("no product in stock in the first page: {products}"))?;
    let product_id = text(product, "id")?;
    println!(
        "ok   product {product_id} ({}) is in stock",
        product["name"]
    );

    let unique = uuid::Uuid::new_v4().simple().to_string();
    let email = format!("smoke-{unique}@example.com");
    let password = format!("pw-{unique}");
    let mut gateway = gateway;
    let user = gateway
        .expect(
            Method::POST,
            "/api/v1/users",
            Some(json!({
                "name": "Smoke Test",
                "email": email,
                "password": password,
            })),
            StatusCode::CREATED,
        )
        .await?;
    let user_id = text(&user, "id")?;
    if user.get("password").is_some() || user.get("password_hash").is_some() {
        return Err(format!("the created user leaks its password: {user}"));
    }
    println!("ok   user {user_id} created");

    let login = gateway
        .expect(
            Method::POST,
            "/api/v1/auth/login",
            Some(json!({"email": email, "password": password})),
            StatusCode::OK,
        )
        .await?;
    if login["token_type"] != "Bearer" || !login["expires_in"].is_u64() {
        return Err("the login answer is not an OAuth2 bearer token response".to_owned());
    }
    gateway.token = Some(text(&login, "access_token")?);
    println!("ok   user {user_id} logged in");

    let order = gateway
        .expect(
            Method::POST,
            "/api/v1/orders",
            Some(json!({"user_id": user_id, "items": [{"product_id": product_id, "quantity": 1}]})),
            StatusCode::CREATED,
        )
        .await?;
    let order_id = text(&order, "id")?;
    if order["total"] != product["price"] || order["user_id"] != user["id"] {
        return Err(format!(
            "order {order_id} does not match: total {} for price {}, user {}",
            order["total"], product["price"], order["user_id"]
        ));
    }
    println!("ok   order {order_id} placed, total {}", order["total"]);

    let fetched = gateway
        .expect(
            Method::GET,
            &format!("/api/v1/orders/{order_id}"),
            None,
            StatusCode::OK,
        )
        .await?;
    if fetched["id"] != order["id"] || fetched["total"] != order["total"] {
        return Err(format!(
            "order {order_id} reads back differently: {fetched}"
        ));
    }
    let listed = gateway
        .expect(
            Method::GET,
            &format!("/api/v1/orders?user_id={user_id}"),
            None,
            StatusCode::OK,
        )
        .await?;
    if !listed
        .as_array()
        .is_some_and(|list| list.iter().any(|o| o["id"] == order["id"]))
    {
        return Err(format!(
            "order {order_id} missing from the user's orders: {listed}"
        ));
    }
    println!("ok   order {order_id} reads back and is listed for user {user_id}");
    Ok(())
}

fn text(value: &Value, field: &str) -> Result<String, String> {
    value[field]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("answer without a string {field:?}: {value}"))
}
