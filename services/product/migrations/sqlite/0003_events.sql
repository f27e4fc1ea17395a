-- Stock returned by a cancelled order is announced (`stock.released`), and the order
-- events this service applies are remembered: the same outbox and inbox as the order
-- service's (its 0003 migration says what each column is for).
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
