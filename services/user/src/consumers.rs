//! Events from other services that change accounts.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use shop_platform::events::{Consumer, Event, Handled, Queue, Rejection};

use crate::domain::OrderCounts;
use crate::storage::{StoreError, UserStore};

/// `order.placed` and `order.cancelled`: each account's order counts.
pub struct OrderCountsConsumer {
    pub store: Arc<dyn UserStore>,
}

/// What this consumer reads of the order events (version 1).
#[derive(Deserialize)]
struct OrderEvent {
    user_id: String,
}

impl OrderCountsConsumer {
    pub fn queue() -> &'static Queue {
        Queue::named("user.order-counts").expect("declared in events::QUEUES")
    }
}

#[async_trait]
impl Consumer for OrderCountsConsumer {
    fn queue(&self) -> &'static Queue {
        Self::queue()
    }

    async fn handle(&self, event: &Event) -> Result<Handled, Rejection> {
        let counts = match (event.kind.as_str(), event.version) {
            ("order.placed", 1) => OrderCounts {
                placed: 1,
                cancelled: 0,
            },
            ("order.cancelled", 1) => OrderCounts {
                placed: 0,
                cancelled: 1,
            },
            (kind, version) => {
                return Err(Rejection::Poison(format!(
                    "{kind} version {version} is not counted here"
                )));
            }
        };
        let order: OrderEvent = event.data()?;
        self.store
            .count_order(Self::queue().name, &event.id, &order.user_id, counts)
            .await
            .map_err(|err| match err {
                StoreError::Database(db) => Rejection::from(db),
                other => Rejection::Retry(other.to_string()),
            })
    }
}
