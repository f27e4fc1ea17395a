//! `cargo run --release`: the gateway and every shop service in one process on localhost,
//! with embedded storage under `DATA_DIR`. Each service is configured exactly as its own binary would
//! be (same variables), except for the launcher's port and address settings below.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use shop_platform::config::{ConfigError, Env, ServerConfig, Var};
use shop_platform::identity::KeySource;
use shop_platform::{AuthConfig, Binary, Runtime, Shutdown, StorageConfig};

const HOST: Var = Var::new(
    "HOST",
    "127.0.0.1",
    "Address every service listens on (loopback by default: this is a development launcher).",
);
const PRODUCT_PORT: Var = Var::new(
    "PRODUCT_PORT",
    "8081",
    "Product service port (0 = any free port).",
);
const GATEWAY_PORT: Var = Var::new(
    "GATEWAY_PORT",
    "8080",
    "Gateway port: the front door (0 = any free port).",
);
const ORDER_PORT: Var = Var::new(
    "ORDER_PORT",
    "8082",
    "Order service port (0 = any free port).",
);
const USER_PORT: Var = Var::new(
    "USER_PORT",
    "8083",
    "User service port (0 = any free port).",
);
const SHUTDOWN_DELAY: Var = Var::new(
    "SHUTDOWN_DELAY",
    "0s",
    "No load balancer to wait for locally, so Ctrl-C drains at once.",
);

const ADMIN_EMAIL: Var = Var::new(
    "ADMIN_EMAIL",
    "admin@shop.local",
    "Admin account, created on first run with a random password written to DATA_DIR/admin-password (owner-only).",
);

const BINARY: Binary = Binary {
    name: "shop",
    about: "Local launcher: runs the gateway and the product, order and user services together.",
    vars: &[
        (
            "Launcher",
            &[
                HOST,
                GATEWAY_PORT,
                PRODUCT_PORT,
                ORDER_PORT,
                USER_PORT,
                SHUTDOWN_DELAY,
                ADMIN_EMAIL,
            ],
        ),
        (
            "Storage (shared by all services, one database file each)",
            StorageConfig::VARS,
        ),
        (
            "Every service",
            &[
                ServerConfig::SHUTDOWN_TIMEOUT,
                ServerConfig::REQUEST_TIMEOUT,
                ServerConfig::BODY_LIMIT,
                shop_product::SEED_PRODUCTS,
                shop_product::CATALOGUE_RESYNC,
                shop_order::UPSTREAM_TIMEOUT,
                shop_order::CHECKOUT_TIMEOUT,
                shop_platform::events::Broker::AMQP_URL,
                AuthConfig::MODE,
                shop_user::TOKEN_TTL,
            ],
        ),
    ],
    runtime: Runtime::MultiThread,
};

struct Config {
    gateway: shop_gateway::Config,
    product: shop_product::Config,
    order: shop_order::Config,
    user: shop_user::Config,
}

impl Config {
    fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let host: IpAddr = env.parse(&HOST)?;
        let delay = env.string(&SHUTDOWN_DELAY)?;
        let service_env = |port_var: &Var| -> Result<Env, ConfigError> {
            let port: u16 = env.parse(port_var)?;
            Ok(env
                .clone()
                .with("HOST", host.to_string())
                .with("PORT", port.to_string())
                .with("SHUTDOWN_DELAY", delay.clone()))
        };
        let product = shop_product::Config::from_env(&service_env(&PRODUCT_PORT)?)?;
        let data_dir: PathBuf = env.parse(&StorageConfig::DATA_DIR)?;
        let admin_password = data_dir.join("admin-password");
        let user = shop_user::Config::from_env(
            &service_env(&USER_PORT)?
                .with("ADMIN_EMAIL", env.string(&ADMIN_EMAIL)?)
                .with("ADMIN_PASSWORD_FILE", admin_password.display().to_string()),
        )?;
        let order_env = service_env(&ORDER_PORT)?
            .with("PRODUCT_URL", url(host, product.server.port))
            .with("USER_URL", url(host, user.server.port));
        let order = shop_order::Config::from_env(&order_env)?;
        let gateway = shop_gateway::Config::from_env(&service_env(&GATEWAY_PORT)?)?;
        Ok(Self {
            gateway,
            product,
            order,
            user,
        })
    }
}

fn url(host: IpAddr, port: u16) -> String {
    match host {
        IpAddr::V6(v6) => format!("http://[{v6}]:{port}"),
        IpAddr::V4(v4) if v4.is_unspecified() => format!("http://127.0.0.1:{port}"),
        IpAddr::V4(v4) => format!("http://{v4}:{port}"),
    }
}

async fn run(mut config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    // One signing key for the set, kept under DATA_DIR; the verifiers in this process take
    // its public half directly instead of fetching the JWK set.
    let keys = config.user.key_pair()?;
    config.product.auth.keys = KeySource::Pair(keys.clone());
    config.order.auth.keys = KeySource::Pair(keys.clone());
    config.gateway.auth.keys = KeySource::Pair(keys);
    // One in-process broker: the order and product services hear each other's events
    // without RabbitMQ.
    // Unless AMQP_URL names RabbitMQ: then each service connects to it as on its own.
    if matches!(config.order.events, shop_platform::events::Broker::Local(_)) {
        let broker = shop_platform::events::Broker::default();
        config.product.events = broker.clone();
        config.user.events = broker.clone();
        config.order.events = broker;
    }
    if let Some(path) = &config.user.admin_password_file {
        write_admin_password(path)?;
    }
    let admin = config
        .user
        .admin_email
        .clone()
        .zip(config.user.admin_password_file.clone());
    let product = shop_product::build(config.product).await?;
    let user = shop_user::build(config.user).await?;
    // With port 0 the real ports are known only now.
    let host = config.order.server.host;
    config.order.product_url = url(host, product.port());
    config.order.user_url = url(host, user.port());
    let order = shop_order::build(config.order).await?;
    let mut gateway_config = config.gateway;
    for app in [&product, &order, &user] {
        gateway_config.set_upstream(app.name(), vec![url(host, app.port())]);
    }
    let gateway = shop_gateway::build(gateway_config)?;

    println!("shop is running (Ctrl-C to stop):");
    println!("  {:<8} {}", "gateway", url(host, gateway.port()));
    for app in [&product, &order, &user] {
        println!("  {:<8} {}", app.name(), url(host, app.port()));
    }
    println!("  try: curl {}/api/products", url(host, gateway.port()));
    if let Some((email, path)) = admin {
        println!("  admin: {email} (password in {})", path.display());
    }

    let (gateway, product, order, user) = tokio::join!(
        gateway.run(shutdown.clone()),
        product.run(shutdown.clone()),
        order.run(shutdown.clone()),
        user.run(shutdown.clone()),
    );
    gateway.and(product).and(order).and(user)
}

/// A random password for the local admin, created once and readable only by its owner.
fn write_admin_password(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let mut random = [0u8; 18];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("no secure random source: {e}"))?;
    let password = hex::encode(random);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    shop_platform::auth::write_secret_file(path, &format!("{password}\n"))
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

fn main() -> ExitCode {
    BINARY.main(Config::from_env, run)
}
