-- A line's key to its order is checked when the transaction commits instead of after
-- each statement. Checked at once, it made SQLite journal every page the lines' insert
-- touched, in case it had to undo that statement (the platform's SqliteBatches says
-- more); the rule is the same, only its moment moves. SQLite cannot alter a constraint,
-- so the table is built again; nothing refers to it.
CREATE TABLE order_items_deferred (
    order_id         TEXT    NOT NULL REFERENCES orders (id) DEFERRABLE INITIALLY DEFERRED,
    position         INTEGER NOT NULL,
    product_id       TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    unit_price_cents INTEGER NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (order_id, position)
);
INSERT INTO order_items_deferred (order_id, position, product_id, name, quantity, unit_price_cents)
SELECT order_id, position, product_id, name, quantity, unit_price_cents FROM order_items;
DROP TABLE order_items;
ALTER TABLE order_items_deferred RENAME TO order_items;
