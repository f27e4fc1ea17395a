-- Each account's orders, counted from the order service's events (order.placed,
-- order.cancelled) for an account page; they may trail the orders by a moment.
ALTER TABLE users ADD COLUMN orders_placed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN orders_cancelled INTEGER NOT NULL DEFAULT 0;

-- Events applied, written in the transaction that applies each one.
CREATE TABLE inbox (
    queue           TEXT    NOT NULL,
    event_id        TEXT    NOT NULL,
    processed_at_ms INTEGER NOT NULL,
    PRIMARY KEY (queue, event_id)
);
