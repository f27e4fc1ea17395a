-- `rev` counts a product's changes: every write sets it one higher, so an in-memory copy
-- of the catalogue can tell a newer row from an older one whatever order it hears of
-- them in (its own writes, another replica's, a periodic re-read).
ALTER TABLE products ADD COLUMN rev BIGINT NOT NULL DEFAULT 1;

-- Every committed change to a product is announced on the `catalogue` channel with the
-- new row, so the other replicas update their copy without a query. A trigger rather
-- than application code: a change made by hand in psql is announced too. PostgreSQL
-- delivers the notification when (and only if) the transaction commits.
CREATE FUNCTION announce_product_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload TEXT := json_build_object(
        'seq', NEW.seq, 'id', NEW.id, 'name', NEW.name,
        'price_cents', NEW.price_cents, 'quantity', NEW.quantity, 'rev', NEW.rev)::text;
BEGIN
    -- A payload must stay under 8000 bytes; a row too large to carry is announced by
    -- id alone, and listeners re-read the catalogue.
    IF octet_length(payload) > 7900 THEN
        payload := json_build_object('id', NEW.id)::text;
    END IF;
    PERFORM pg_notify('catalogue', payload);
    RETURN NULL;
END
$$;

CREATE TRIGGER products_announce AFTER INSERT OR UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION announce_product_change();
