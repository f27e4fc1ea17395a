-- A product's stock changes with every reservation, hundreds of times a second under
-- checkouts, and each change announced from this trigger cost a NOTIFY in the
-- reservation's commit: the cluster's notification lock, taken while the product's row
-- is still held, and a wake-up of every listener. Grouped reservations
-- (storage.rs, RESERVE_GROUP_POSTGRES) set `shop.announce_catalogue` to 'after_commit'
-- for their transaction and announce the products' latest rows themselves, coalesced
-- (platform db/announce.rs). Every other change is announced here as before, including
-- one made by hand in psql.
DROP TRIGGER products_announce ON products;
CREATE TRIGGER products_announce AFTER INSERT OR UPDATE ON products
    FOR EACH ROW
    WHEN (current_setting('shop.announce_catalogue', true) IS DISTINCT FROM 'after_commit')
    EXECUTE FUNCTION announce_product_change();
