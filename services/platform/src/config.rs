//! 12-factor configuration: every setting is an environment variable with a documented
//! default. Each binary declares its variables once as [`Var`]s; the same list drives
//! parsing and `--help`, so the two cannot drift.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

/// One documented environment variable.
#[derive(Debug, Clone, Copy)]
pub struct Var {
    pub name: &'static str,
    /// `None` means "unset unless given".
    pub default: Option<&'static str>,
    pub help: &'static str,
}

impl Var {
    pub const fn new(name: &'static str, default: &'static str, help: &'static str) -> Self {
        Self {
            name,
            default: Some(default),
            help,
        }
    }

    pub const fn optional(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            default: None,
            help,
        }
    }
}

/// A configuration value that could not be used; rendered as the single line printed
/// before exiting with status 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {var}={value:?}: {reason}")]
pub struct ConfigError {
    pub var: std::borrow::Cow<'static, str>,
    pub value: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(var: &Var, value: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self::named(var.name, value, reason)
    }

    /// For variables whose name is built at runtime (e.g. one per upstream).
    pub fn named(
        var: impl Into<std::borrow::Cow<'static, str>>,
        value: impl Into<String>,
        reason: impl fmt::Display,
    ) -> Self {
        Self {
            var: var.into(),
            value: value.into(),
            reason: reason.to_string(),
        }
    }
}

/// Where variables come from: the process environment, or a map in tests and in the
/// launcher (which runs several services in one process with different settings).
#[derive(Debug, Clone, Default)]
pub struct Env {
    overrides: HashMap<String, String>,
    use_process_env: bool,
}

impl Env {
    pub fn from_process() -> Self {
        Self {
            overrides: HashMap::new(),
            use_process_env: true,
        }
    }

    /// Only the given pairs; the process environment is ignored.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            overrides: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            use_process_env: false,
        }
    }

    /// Returns a copy where `name` is set to `value`, taking precedence over the process.
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.overrides.insert(name.to_owned(), value.into());
        self
    }

    pub fn raw(&self, name: &str) -> Option<String> {
        self.overrides.get(name).cloned().or_else(|| {
            self.use_process_env
                .then(|| std::env::var(name).ok())
                .flatten()
        })
    }

    /// The value, or its default; an empty value counts as unset.
    fn value(&self, var: &Var) -> Option<String> {
        self.raw(var.name)
            .filter(|v| !v.trim().is_empty())
            .or_else(|| var.default.map(str::to_owned))
    }

    pub fn parse<T>(&self, var: &Var) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.parse_with(var, |v| v.trim().parse::<T>().map_err(|e| e.to_string()))
    }

    pub fn parse_opt<T>(&self, var: &Var) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.value(var) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<T>()
                .map(Some)
                .map_err(|e| ConfigError::new(var, v.as_str(), e)),
        }
    }

    pub fn parse_with<T>(
        &self,
        var: &Var,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let value = self
            .value(var)
            .ok_or_else(|| ConfigError::new(var, "", "is required"))?;
        parse(&value).map_err(|reason| ConfigError::new(var, value.as_str(), reason))
    }

    pub fn string(&self, var: &Var) -> Result<String, ConfigError> {
        self.parse_with(var, |v| Ok(v.to_owned()))
    }

    pub fn duration(&self, var: &Var) -> Result<Duration, ConfigError> {
        self.parse_with(var, parse_duration)
    }

    pub fn bytes(&self, var: &Var) -> Result<usize, ConfigError> {
        self.parse_with(var, parse_bytes)
    }

    pub fn flag(&self, var: &Var) -> Result<bool, ConfigError> {
        self.parse_with(var, |v| match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err("expected true or false".to_owned()),
        })
    }
}

/// `250ms`, `5s`, `2m`, or a bare number of seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let v = value.trim();
    let (number, unit) = match v.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => v.split_at(i),
        None => (v, "s"),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| "expected a duration such as 500ms, 5s or 2m".to_owned())?;
    let seconds = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    };
    if !seconds.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&seconds) {
        return Err("out of range".to_owned());
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `1048576`, `512KiB`, `1MiB` (also `KB`/`MB`, read as binary units).
pub fn parse_bytes(value: &str) -> Result<usize, String> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let n: usize = number
        .parse()
        .map_err(|_| "expected a size such as 1048576, 512KiB or 1MiB".to_owned())?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(factor)
        .filter(|&b| b > 0)
        .ok_or_else(|| "must be between 1 byte and the address space".to_owned())
}

/// Renders `--help` for a binary from the same variable lists it parses.
pub fn help_text(binary: &str, about: &str, groups: &[(&str, &[Var])]) -> String {
    let mut out = format!(
        "{binary} {}\n{about}\n\nUSAGE:\n    {binary}                run the service\n    {binary} healthcheck    probe the running service's /ready on PORT (exit 0 = ready)\n    {binary} describe       print port, probe paths and variables as JSON\n    {binary} sleep 5s       wait, then exit 0 (a preStop hook without a shell)\n    {binary} smoke URL      place an order through the gateway at URL, checking each step\n    {binary} --help         print this help\n\nConfiguration comes from environment variables:\n",
        env!("CARGO_PKG_VERSION")
    );
    for (title, vars) in groups {
        out.push_str(&format!("\n{title}:\n"));
        for var in *vars {
            let default = var.default.unwrap_or("(unset)");
            out.push_str(&format!(
                "    {:<30} default: {}\n        {}\n",
                var.name, default, var.help
            ));
        }
    }
    out
}

/// Settings every HTTP server binary shares.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: IpAddr,
    pub port: u16,
    pub shutdown_delay: Duration,
    pub shutdown_timeout: Duration,
    pub request_timeout: Duration,
    pub body_limit: usize,
}

impl ServerConfig {
    pub const HOST: Var = Var::new("HOST", "0.0.0.0", "Address to listen on.");
    pub const SHUTDOWN_DELAY: Var = Var::new(
        "SHUTDOWN_DELAY",
        "5s",
        "After SIGTERM, keep serving (with /ready at 503) this long so load balancers stop routing here.",
    );
    pub const SHUTDOWN_TIMEOUT: Var = Var::new(
        "SHUTDOWN_TIMEOUT",
        "20s",
        "After the delay, how long in-flight requests may take to finish before they are cut.",
    );
    pub const REQUEST_TIMEOUT: Var = Var::new(
        "REQUEST_TIMEOUT",
        "10s",
        "A request still running after this gets 504.",
    );
    pub const BODY_LIMIT: Var = Var::new(
        "BODY_LIMIT",
        "1MiB",
        "Largest accepted request body; larger ones get 413.",
    );

    /// `PORT` is per binary (its default is the binary's well-known port).
    pub const fn vars(port: Var) -> [Var; 6] {
        [
            Self::HOST,
            port,
            Self::SHUTDOWN_DELAY,
            Self::SHUTDOWN_TIMEOUT,
            Self::REQUEST_TIMEOUT,
            Self::BODY_LIMIT,
        ]
    }

    pub fn from_env(env: &Env, port: &Var) -> Result<Self, ConfigError> {
        Ok(Self {
            host: env.parse(&Self::HOST)?,
            port: env.parse(port)?,
            shutdown_delay: env.duration(&Self::SHUTDOWN_DELAY)?,
            shutdown_timeout: env.duration(&Self::SHUTDOWN_TIMEOUT)?,
            request_timeout: env.duration(&Self::REQUEST_TIMEOUT)?,
            body_limit: env.bytes(&Self::BODY_LIMIT)?,
        })
    }

    /// Loopback, port 0, short delays: what tests and examples want.
    pub fn ephemeral() -> Self {
        Self {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 0,
            shutdown_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            body_limit: 1 << 20,
        }
    }
}

/// Variables read by the telemetry setup and the OpenTelemetry SDK, listed for `--help`.
pub const TELEMETRY_VARS: &[Var] = &[
    Var::new(
        "LOG_FORMAT",
        "json",
        "json (one object per line) or pretty.",
    ),
    Var::new(
        "RUST_LOG",
        "info",
        "Log filter, e.g. info,sqlx=warn,shop_order=debug.",
    ),
    Var::optional(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTLP collector base URL; unset means no trace export at all.",
    ),
    Var::new(
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "http/protobuf",
        "grpc, http/protobuf or http/json.",
    ),
    Var::optional(
        "OTEL_SERVICE_NAME",
        "Overrides the service.name resource attribute.",
    ),
    Var::optional(
        "OTEL_RESOURCE_ATTRIBUTES",
        "Extra resource attributes, k1=v1,k2=v2.",
    ),
    Var::new(
        "OTEL_TRACES_SAMPLER",
        "parentbased_always_on",
        "Sampler, e.g. parentbased_traceidratio with OTEL_TRACES_SAMPLER_ARG=0.1.",
    ),
    Var::optional(
        "OTEL_TRACES_SAMPLER_ARG",
        "The sampler's argument, e.g. the ratio 0.1 for parentbased_traceidratio.",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: Var = Var::new("PORT", "8081", "port");

    #[test]
    fn defaults_apply_when_unset_or_empty() {
        let env = Env::from_pairs([("HOST", "")]);
        let cfg = ServerConfig::from_env(&env, &PORT).unwrap();
        assert_eq!(cfg.port, 8081);
        assert_eq!(cfg.host.to_string(), "0.0.0.0");
        assert_eq!(cfg.shutdown_delay, Duration::from_secs(5));
        assert_eq!(cfg.shutdown_timeout, Duration::from_secs(20));
        assert_eq!(cfg.body_limit, 1 << 20);
    }

    #[test]
    fn invalid_value_names_variable_and_reason() {
        let env = Env::from_pairs([("PORT", "80808")]);
        let err = ServerConfig::from_env(&env, &PORT).unwrap_err();
        assert_eq!(err.var, "PORT");
        let line = err.to_string();
        assert!(line.starts_with("invalid PORT=\"80808\": "), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_bytes("512KiB").unwrap(), 512 * 1024);
        assert_eq!(parse_bytes("2MiB").unwrap(), 2 << 20);
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn flags() {
        let v = Var::new("SEED", "true", "");
        assert!(Env::from_pairs([("SEED", "yes")]).flag(&v).unwrap());
        assert!(!Env::from_pairs([("SEED", "0")]).flag(&v).unwrap());
        assert!(Env::from_pairs([("SEED", "maybe")]).flag(&v).is_err());
    }

    #[test]
    fn help_lists_every_variable_with_default() {
        let text = help_text("product", "about", &[("Server", &ServerConfig::vars(PORT))]);
        for name in [
            "HOST",
            "PORT",
            "SHUTDOWN_DELAY",
            "SHUTDOWN_TIMEOUT",
            "BODY_LIMIT",
        ] {
            assert!(text.contains(name), "{name} missing from help");
        }
        assert!(text.contains("default: 8081"));
    }
}
