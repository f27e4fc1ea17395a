-- The same as migrations/sqlite, in PostgreSQL types.
ALTER TABLE users ADD COLUMN orders_placed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN orders_cancelled BIGINT NOT NULL DEFAULT 0;

CREATE TABLE inbox (
    queue           TEXT   NOT NULL,
    event_id        TEXT   NOT NULL,
    processed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (queue, event_id)
);
