-- The same tables as migrations/sqlite, in PostgreSQL types: money in integer cents,
-- timestamps as RFC 3339 UTC text written by the service.
CREATE TABLE orders (
    seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id             TEXT   NOT NULL UNIQUE,
    user_id        TEXT   NOT NULL,
    total_cents    BIGINT NOT NULL CHECK (total_cents >= 0),
    status         TEXT   NOT NULL,
    -- The product service's reservation holding this order's stock.
    reservation_id TEXT   NOT NULL,
    created_at     TEXT   NOT NULL
);

CREATE INDEX orders_by_user ON orders (user_id, seq);

CREATE TABLE order_items (
    order_id         TEXT   NOT NULL REFERENCES orders (id),
    position         BIGINT NOT NULL,
    product_id       TEXT   NOT NULL,
    name             TEXT   NOT NULL,
    quantity         BIGINT NOT NULL CHECK (quantity > 0),
    unit_price_cents BIGINT NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (order_id, position)
);
