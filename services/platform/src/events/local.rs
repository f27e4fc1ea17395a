//! The broker when there is none: the outbox delivered in-process to the consumers
//! attached to the same [`LocalBroker`] (the local launcher gives all its services one).
//! Delivery is synchronous, so the relay marks an event sent only once every queue it is
//! routed to has applied it; a queue with no consumer attached yet holds the relay back,
//! and the event waits in the outbox, never lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::Queue;
use super::consume::{Consumer, EventMetrics, Outcome, deliver};
use super::outbox::{Message, Publisher, Unconfirmed};

#[derive(Clone, Default)]
pub struct LocalBroker {
    consumers: Arc<Mutex<HashMap<&'static str, Attached>>>,
}

#[derive(Clone)]
struct Attached {
    consumer: Arc<dyn Consumer>,
    metrics: EventMetrics,
}

impl std::fmt::Debug for LocalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queues: Vec<_> = self
            .consumers
            .lock()
            .expect("not poisoned")
            .keys()
            .copied()
            .collect();
        f.debug_struct("LocalBroker")
            .field("queues", &queues)
            .finish()
    }
}

impl LocalBroker {
    pub fn attach(&self, consumer: Arc<dyn Consumer>, metrics: EventMetrics) {
        let queue = consumer.queue().name;
        self.consumers
            .lock()
            .expect("not poisoned")
            .insert(queue, Attached { consumer, metrics });
    }

    /// Detaches a stopping service's consumer: its events wait for the next one.
    pub fn detach(&self, queue: &Queue) {
        self.consumers
            .lock()
            .expect("not poisoned")
            .remove(queue.name);
    }

    fn attached(&self, queue: &str) -> Option<Attached> {
        self.consumers
            .lock()
            .expect("not poisoned")
            .get(queue)
            .cloned()
    }
}

#[async_trait]
impl Publisher for LocalBroker {
    async fn publish(&self, messages: &[Message]) -> Result<(), Unconfirmed> {
        for (confirmed, message) in messages.iter().enumerate() {
            for queue in Queue::routed(&message.kind) {
                let Some(attached) = self.attached(queue.name) else {
                    return Err(Unconfirmed {
                        confirmed,
                        reason: format!("no consumer attached to queue {} yet", queue.name),
                    });
                };
                let outcome = deliver(
                    "in-process",
                    attached.consumer.as_ref(),
                    &attached.metrics,
                    message.body.as_bytes(),
                    message.traceparent.as_deref(),
                    message.attempt > 0,
                )
                .await;
                if let Outcome::Retry(reason) = outcome {
                    return Err(Unconfirmed { confirmed, reason });
                }
            }
        }
        Ok(())
    }
}
