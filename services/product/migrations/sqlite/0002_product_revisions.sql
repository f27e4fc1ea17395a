-- `rev` counts a product's changes: every write sets it one higher, so an in-memory copy
-- of the catalogue can tell a newer row from an older one whatever order it hears of
-- them in (its own writes, another replica's, a periodic re-read).
ALTER TABLE products ADD COLUMN rev INTEGER NOT NULL DEFAULT 1;
