-- The same tables as migrations/sqlite, in PostgreSQL types. Money is integer cents and
-- timestamps are RFC 3339 UTC text written by the service, so both backends store the
-- same values.

-- `seq` orders pages and cursors; `id` is the public identifier (seed ids are "1", "2").
CREATE TABLE products (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          TEXT   NOT NULL UNIQUE,
    name        TEXT   NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    quantity    BIGINT NOT NULL CHECK (quantity >= 0),
    created_at  TEXT   NOT NULL,
    updated_at  TEXT   NOT NULL
);

-- Stock taken for an order. Releasing gives the units back exactly once; releasing an id
-- never reserved leaves a 'released' row with no items, so a late reserve under that id
-- is refused.
CREATE TABLE reservations (
    id         TEXT PRIMARY KEY,
    order_id   TEXT,
    status     TEXT NOT NULL CHECK (status IN ('held', 'released')),
    created_at TEXT NOT NULL
);

CREATE TABLE reservation_items (
    reservation_id   TEXT   NOT NULL REFERENCES reservations (id),
    product_id       TEXT   NOT NULL,
    quantity         BIGINT NOT NULL CHECK (quantity > 0),
    unit_price_cents BIGINT NOT NULL,
    PRIMARY KEY (reservation_id, product_id)
);
