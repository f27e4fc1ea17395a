-- Stock returned by a cancelled order is announced (`stock.released`), and the order
-- events this service applies are remembered: the same outbox and inbox as the order
-- service's (its 0003 migration says what each column is for).
CREATE TABLE outbox (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      TEXT   NOT NULL UNIQUE,
    kind          TEXT   NOT NULL,
    body          TEXT   NOT NULL,
    traceparent   TEXT,
    created_at_ms BIGINT NOT NULL,
    sent_at_ms    BIGINT,
    attempts      BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX outbox_unsent ON outbox (seq) WHERE sent_at_ms IS NULL;

CREATE TABLE inbox (
    queue           TEXT   NOT NULL,
    event_id        TEXT   NOT NULL,
    processed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (queue, event_id)
);

-- Wakes the relay of whichever replica holds the relay lock, once per committing
-- transaction that wrote events; its poll covers a notification lost in a reconnect.
CREATE FUNCTION announce_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_announce AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION announce_outbox();
