-- A reservation line's key to its reservation is checked when the transaction commits
-- instead of after each statement. Checked at once, it made SQLite journal every page
-- the lines' insert touched, in case it had to undo that statement (the platform's
-- SqliteBatches says more); the rule is the same, only its moment moves. SQLite cannot
-- alter a constraint, so the table is built again; nothing refers to it.
CREATE TABLE reservation_items_deferred (
    reservation_id   TEXT    NOT NULL
        REFERENCES reservations (id) DEFERRABLE INITIALLY DEFERRED,
    product_id       TEXT    NOT NULL,
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    unit_price_cents INTEGER NOT NULL,
    PRIMARY KEY (reservation_id, product_id)
);
INSERT INTO reservation_items_deferred (reservation_id, product_id, quantity, unit_price_cents)
SELECT reservation_id, product_id, quantity, unit_price_cents FROM reservation_items;
DROP TABLE reservation_items;
ALTER TABLE reservation_items_deferred RENAME TO reservation_items;
