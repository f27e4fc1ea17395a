-- `seq` orders pages and cursors; `id` is the public identifier (seed ids are "1", "2").
CREATE TABLE products (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT    NOT NULL UNIQUE,
    name        TEXT    NOT NULL,
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    quantity    INTEGER NOT NULL CHECK (quantity >= 0),
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL
);

-- Stock taken for an order. Releasing gives the units back exactly once.
CREATE TABLE reservations (
    id         TEXT PRIMARY KEY,
    order_id   TEXT,
    status     TEXT NOT NULL CHECK (status IN ('held', 'released')),
    created_at TEXT NOT NULL
);

CREATE TABLE reservation_items (
    reservation_id   TEXT    NOT NULL REFERENCES reservations (id),
    product_id       TEXT    NOT NULL,
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    unit_price_cents INTEGER NOT NULL,
    PRIMARY KEY (reservation_id, product_id)
);
