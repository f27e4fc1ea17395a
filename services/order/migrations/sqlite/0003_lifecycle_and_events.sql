-- Orders change after they are placed: `version` counts the changes (the ETag, and the
-- guard that stops two racing changes from both winning); each step's time is kept.
ALTER TABLE orders ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE orders ADD COLUMN confirmed_at TEXT;
ALTER TABLE orders ADD COLUMN cancelled_at TEXT;
-- When the product service reported the cancelled order's stock back on sale.
ALTER TABLE orders ADD COLUMN stock_returned_at TEXT;
CREATE INDEX orders_by_reservation ON orders (reservation_id);

-- Events written in the transaction of the change they announce; the relay publishes
-- them in `seq` order and sets `sent_at_ms` once the broker confirmed them.
CREATE TABLE outbox (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id      TEXT    NOT NULL UNIQUE,
    kind          TEXT    NOT NULL,
    body          TEXT    NOT NULL,
    traceparent   TEXT,
    created_at_ms INTEGER NOT NULL,
    sent_at_ms    INTEGER,
    attempts      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX outbox_unsent ON outbox (seq) WHERE sent_at_ms IS NULL;

-- Events this service applied, written in the transaction that applies each one.
CREATE TABLE inbox (
    queue           TEXT    NOT NULL,
    event_id        TEXT    NOT NULL,
    processed_at_ms INTEGER NOT NULL,
    PRIMARY KEY (queue, event_id)
);
