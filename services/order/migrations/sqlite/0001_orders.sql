CREATE TABLE orders (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT    NOT NULL UNIQUE,
    user_id        TEXT    NOT NULL,
    total_cents    INTEGER NOT NULL CHECK (total_cents >= 0),
    status         TEXT    NOT NULL,
    -- The product service's reservation holding this order's stock.
    reservation_id TEXT    NOT NULL,
    created_at     TEXT    NOT NULL
);

CREATE INDEX orders_by_user ON orders (user_id, seq);

CREATE TABLE order_items (
    order_id         TEXT    NOT NULL REFERENCES orders (id),
    position         INTEGER NOT NULL,
    product_id       TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    unit_price_cents INTEGER NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (order_id, position)
);
