//! Real product and user services on port 0, for the order service's tests.

#![allow(dead_code)]

use std::time::Duration;

use serde_json::{Value, json};
use shop_platform::config::Env;
use shop_platform::events::{Broker, LocalBroker};
use shop_platform::testing::{Backend, RunningApp, TestDatabase};
use shop_platform::{AuthConfig, ServerConfig};

pub struct Peers {
    pub product: RunningApp,
    pub user: RunningApp,
    pub http: reqwest::Client,
    pub backend: Backend,
    /// The product service's events broker, shared with the order services of
    /// [`Peers::order_config`] (in-process, as the launcher shares one, or RabbitMQ).
    pub broker: Broker,
    _dirs: (TestDatabase, TestDatabase),
}

impl Peers {
    /// Product (seeded with the demo catalogue) and user services, with user "1".
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, Broker::Local(LocalBroker::default())).await
    }

    pub async fn start_with(backend: Backend, broker: Broker) -> Self {
        let (product_dir, user_dir) = (
            TestDatabase::new(backend).await,
            TestDatabase::new(backend).await,
        );
        let product = shop_product::build(shop_product::Config {
            server: ServerConfig::ephemeral(),
            storage: product_dir.storage(),
            seed_products: true,
            catalogue_resync: std::time::Duration::from_secs(1),
            auth: AuthConfig::demo(),
            events: broker.clone(),
        })
        .await
        .unwrap();
        let user = shop_user::build(shop_user::Config {
            events: broker.clone(),
            ..user_config(&user_dir)
        })
        .await
        .unwrap();
        let peers = Self {
            product: RunningApp::start(product),
            user: RunningApp::start(user),
            http: reqwest::Client::new(),
            backend,
            broker,
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

    pub fn order_config(&self, dir: &TestDatabase) -> shop_order::Config {
        shop_order::Config {
            events: self.broker.clone(),
            ..order_config(dir, &self.product.url, &self.user.url)
        }
    }

    /// A database for the order service, on the peers' backend.
    pub async fn order_db(&self) -> TestDatabase {
        TestDatabase::new(self.backend).await
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

pub fn order_config(dir: &TestDatabase, product_url: &str, user_url: &str) -> shop_order::Config {
    shop_order::Config {
        server: ServerConfig::ephemeral(),
        storage: dir.storage(),
        product_url: product_url.to_owned(),
        user_url: user_url.to_owned(),
        upstream_timeout: Duration::from_secs(2),
        checkout_timeout: Duration::from_secs(30),
        auth: AuthConfig::demo(),
        events: Broker::default(),
    }
}

/// Authentication off: these tests are about orders; access is tested through the gateway.
pub fn user_config(dir: &TestDatabase) -> shop_user::Config {
    shop_user::Config {
        server: ServerConfig::ephemeral(),
        storage: dir.storage(),
        ..shop_user::Config::from_env(&Env::from_pairs([("AUTH_MODE", "demo")])).unwrap()
    }
}
