//! Events from other services that change stock.

use async_trait::async_trait;
use serde::Deserialize;
use shop_platform::events::{Consumer, Event, Handled, Queue, Rejection};

use crate::routes::{AppState, release_stock};
use crate::storage::{Release, StoreError};

/// `order.cancelled`: the order's reserved stock goes back on sale, once.
pub struct OrderCancelled {
    pub state: AppState,
}

/// What this consumer reads of `order.cancelled` (version 1).
#[derive(Deserialize)]
struct Cancelled {
    reservation_id: String,
}

impl OrderCancelled {
    pub fn queue() -> &'static Queue {
        Queue::named("product.order-cancelled").expect("declared in events::QUEUES")
    }
}

#[async_trait]
impl Consumer for OrderCancelled {
    fn queue(&self) -> &'static Queue {
        Self::queue()
    }

    async fn handle(&self, event: &Event) -> Result<Handled, Rejection> {
        if event.version != 1 {
            return Err(Rejection::Poison(format!(
                "order.cancelled version {} is unknown here",
                event.version
            )));
        }
        let cancelled: Cancelled = event.data()?;
        shop_platform::validate::id("reservation_id", &cancelled.reservation_id)
            .map_err(|err| Rejection::Poison(err.message))?;
        let queue = Self::queue().name;
        match release_stock(
            &self.state,
            &cancelled.reservation_id,
            Some((queue, &event.id)),
        )
        .await
        {
            Ok(Release::Duplicate) => Ok(Handled::Duplicate),
            // Released now, before (by hand), or never held: the order holds nothing now.
            Ok(_) => Ok(Handled::Applied),
            Err(StoreError::Database(db)) => Err(db.into()),
            Err(other) => Err(Rejection::Retry(other.to_string())),
        }
    }
}
