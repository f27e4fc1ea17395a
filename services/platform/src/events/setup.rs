//! Choosing the broker and starting a service's relay and consumers on it.

use std::sync::Arc;

use super::amqp::{AmqpLink, AmqpPublisher, spawn_consumer};
use super::consume::{Consumer, EventMetrics};
use super::local::LocalBroker;
use super::outbox::{Outbox, POLL, spawn_relay};
use crate::Database;
use crate::config::{ConfigError, Env, Var};

/// Where a service's events go.
#[derive(Clone)]
pub enum Broker {
    /// In-process: the consumers attached to this broker, in this process.
    Local(LocalBroker),
    /// RabbitMQ at this URL.
    Amqp(String),
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broker::Local(local) => local.fmt(f),
            Broker::Amqp(url) => write!(f, "Amqp({})", crate::db::redact_url(url)),
        }
    }
}

impl Default for Broker {
    fn default() -> Self {
        Broker::Local(LocalBroker::default())
    }
}

impl Broker {
    pub const AMQP_URL: Var = Var::optional(
        "AMQP_URL",
        "RabbitMQ for events (amqp://user:password@host:5672/%2f). Empty: events are delivered in-process, to the services of the same process only (the local launcher's mode).",
    );

    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        match env.parse_opt::<String>(&Self::AMQP_URL)? {
            None => Ok(Self::default()),
            Some(url) => {
                let url = url.trim().to_owned();
                let refuse = |reason: &str| {
                    ConfigError::new(&Self::AMQP_URL, crate::db::redact_url(&url), reason)
                };
                if url.starts_with("amqps://") {
                    return Err(refuse(
                        "amqps is not built in: brokers are reached in-cluster over amqp:// (a mesh adds mTLS)",
                    ));
                }
                let rest = url
                    .strip_prefix("amqp://")
                    .ok_or_else(|| refuse("must start with amqp://"))?;
                if rest.is_empty() || rest.starts_with('/') {
                    return Err(refuse("must name a host"));
                }
                super::amqp::endpoint(&url).map_err(|reason| refuse(&reason))?;
                Ok(Broker::Amqp(url))
            }
        }
    }

    /// Starts the outbox relay (for a service that publishes: `outbox`) and the
    /// consumers. Returns what stops them.
    pub fn start(
        &self,
        service: &str,
        db: &Database,
        outbox: Option<&Outbox>,
        metrics: EventMetrics,
        consumers: Vec<Arc<dyn Consumer>>,
    ) -> Running {
        let mut tasks = Vec::new();
        let mut attached = Vec::new();
        match self {
            Broker::Local(local) => {
                if let Some(outbox) = outbox {
                    let publisher = Arc::new(local.clone());
                    tasks.push(spawn_relay(db, outbox, publisher, metrics.clone(), POLL));
                }
                for consumer in consumers {
                    attached.push(consumer.queue());
                    local.attach(consumer, metrics.clone());
                }
            }
            Broker::Amqp(url) => {
                // One connection for the relay and every consumer, made on first use.
                let link = AmqpLink::new(url, service);
                if let Some(outbox) = outbox {
                    let publisher = Arc::new(AmqpPublisher::new(link.clone()));
                    tasks.push(spawn_relay(db, outbox, publisher, metrics.clone(), POLL));
                }
                for consumer in consumers {
                    tasks.push(spawn_consumer(&link, consumer, metrics.clone()));
                }
            }
        }
        Running {
            tasks,
            local: match self {
                Broker::Local(local) => Some((local.clone(), attached)),
                Broker::Amqp(_) => None,
            },
        }
    }
}

/// A service's relay and consumers; [`Running::stop`] ends them.
pub struct Running {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    local: Option<(LocalBroker, Vec<&'static super::Queue>)>,
}

impl Running {
    /// Unsent events stay in the outbox, and unacked deliveries go back to their queue,
    /// for the next process.
    pub fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
        if let Some((local, queues)) = self.local {
            for queue in queues {
                local.detach(queue);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Broker, ConfigError> {
        Broker::from_env(&Env::from_pairs([("AMQP_URL", url.to_owned())]))
    }

    #[test]
    fn amqp_url_is_checked_at_start_up_without_printing_its_password() {
        assert!(matches!(
            Broker::from_env(&Env::from_pairs([("X", "1".to_owned())])),
            Ok(Broker::Local(_))
        ));
        let ok = parse("amqp://shop:s3cret@rabbitmq:5672/%2f").unwrap();
        assert!(matches!(&ok, Broker::Amqp(url) if url.ends_with("/%2f")));
        assert!(!format!("{ok:?}").contains("s3cret"), "{ok:?}");
        for bad in [
            "amqps://shop:s3cret@rabbitmq/",
            "http://rabbitmq",
            "amqp://",
            "amqp://shop:s3cret@rabbitmq:notaport/",
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.var, "AMQP_URL", "{bad}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn connections_ask_for_small_frames_unless_the_url_says_otherwise() {
        let uri = super::super::amqp::endpoint("amqp://rabbitmq/%2f").unwrap();
        assert_eq!(uri.query.frame_max, Some(8 * 1024));
        let uri = super::super::amqp::endpoint("amqp://rabbitmq/%2f?frame_max=65536").unwrap();
        assert_eq!(uri.query.frame_max, Some(65536));
    }
}
