-- A checkout between "reserve stock" and "order stored" (the saga in docs/ARCHITECTURE.md):
-- written before the product service is asked to reserve, deleted in the transaction that
-- stores the order. A row older than CHECKOUT_TIMEOUT belongs to a checkout that died;
-- the recovery loop marks it 'compensating' (so it can no longer store its order) and
-- releases the reservation.
CREATE TABLE checkouts (
    reservation_id TEXT    PRIMARY KEY,
    order_id       TEXT    NOT NULL,
    state          TEXT    NOT NULL CHECK (state IN ('reserving', 'compensating')),
    started_at_ms  INTEGER NOT NULL
);

CREATE INDEX checkouts_by_age ON checkouts (started_at_ms);

-- `Idempotency-Key` on POST /orders: the request's fingerprint and the first response,
-- stored in the transaction that stores the order.
CREATE TABLE idempotency_keys (
    key          TEXT    PRIMARY KEY,
    request_hash TEXT    NOT NULL,
    order_id     TEXT    NOT NULL,
    status       INTEGER NOT NULL,
    response     TEXT    NOT NULL,
    created_at   TEXT    NOT NULL
);
