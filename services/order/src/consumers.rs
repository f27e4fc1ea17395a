//! Events from other services that change orders.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use shop_platform::events::{Consumer, Event, Handled, Queue, Rejection};

use crate::storage::{OrderStore, StoreError};

/// `stock.released` from the product service: a cancelled order's stock is on sale again.
pub struct StockReleased {
    pub store: Arc<dyn OrderStore>,
}

/// What this consumer reads of `stock.released` (version 1).
#[derive(Deserialize)]
struct Released {
    reservation_id: String,
}

impl StockReleased {
    pub fn queue() -> &'static Queue {
        Queue::named("order.stock-released").expect("declared in events::QUEUES")
    }
}

#[async_trait]
impl Consumer for StockReleased {
    fn queue(&self) -> &'static Queue {
        Self::queue()
    }

    async fn handle(&self, event: &Event) -> Result<Handled, Rejection> {
        if event.version != 1 {
            return Err(Rejection::Poison(format!(
                "stock.released version {} is unknown here",
                event.version
            )));
        }
        let released: Released = event.data()?;
        self.store
            .stock_returned(
                Self::queue().name,
                &event.id,
                &released.reservation_id,
                &event.occurred_at,
            )
            .await
            .map_err(|err| match err {
                StoreError::Database(db) => Rejection::from(db),
                other => Rejection::Retry(other.to_string()),
            })
    }
}
