//! Messages the product service's event tests feed it, as the order service's relay
//! would publish them.

#![allow(dead_code)]

use serde_json::json;
use shop_platform::events::NewEvent;
use shop_platform::events::outbox::Message;

/// `order.cancelled` for the order holding `reservation_id`, with a fresh event id.
pub fn cancelled(reservation_id: &str) -> Message {
    let event = NewEvent::new(
        "order.cancelled",
        &json!({"order_id": format!("order-{reservation_id}"), "user_id": "1",
                "status": "cancelled", "items": [], "total_cents": 0,
                "reservation_id": reservation_id}),
    );
    message(&event.body, &event.id)
}

/// Any body, routed as `order.cancelled`: how poison is fed.
pub fn message(body: &str, id: &str) -> Message {
    Message {
        event_id: id.to_owned(),
        kind: "order.cancelled".into(),
        body: body.to_owned(),
        traceparent: None,
        attempt: 0,
    }
}
