//! Real product and user services on port 0, for the order service's tests.

#![allow(dead_code)]

use std::time::Duration;

use serde_json::{Value, json};
use shop_platform::testing::{RunningApp, temp_dir};
use shop_platform::{ServerConfig, StorageConfig};
use tempfile::TempDir;

pub struct Peers {
    pub product: RunningApp,
    pub user: RunningApp,
    pub http: reqwest::Client,
    _dirs: (TempDir, TempDir),
}

impl Peers {
    /// Product (seeded with the demo catalogue) and user services, with user "1".
    pub async fn start() -> Self {
        let (product_dir, user_dir) = (temp_dir(), temp_dir());
        let product = shop_product::build(shop_product::Config {
            server: ServerConfig::ephemeral(),
            storage: StorageConfig::in_dir(product_dir.path()),
            seed_products: true,
        })
        .await
        .unwrap();
        let user = shop_user::build(shop_user::Config {
            server: ServerConfig::ephemeral(),
            storage: StorageConfig::in_dir(user_dir.path()),
        })
        .await
        .unwrap();
        let peers = Self {
            product: RunningApp::start(product),
            user: RunningApp::start(user),
            http: reqwest::Client::new(),
            _dirs: (product_dir, user_dir),
        };
        let created = peers
            .http
            .post(format!("{}/users", peers.user.url))
            .json(&json!({"id": "1", "name": "John Doe", "email": "john@example.com", "password": "secret"}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        peers
    }

    pub fn order_config(&self, dir: &TempDir) -> shop_order::Config {
        order_config(dir, &self.product.url, &self.user.url)
    }

    pub async fn stock(&self, product_id: &str) -> i64 {
        let product: Value = self
            .http
            .get(format!("{}/products/{product_id}", self.product.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        product["quantity"].as_i64().unwrap()
    }
}

pub fn order_config(dir: &TempDir, product_url: &str, user_url: &str) -> shop_order::Config {
    shop_order::Config {
        server: ServerConfig::ephemeral(),
        storage: StorageConfig::in_dir(dir.path()),
        product_url: product_url.to_owned(),
        user_url: user_url.to_owned(),
        upstream_timeout: Duration::from_secs(2),
    }
}
