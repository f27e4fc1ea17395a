-- Roles for access control, and the counters that throttle password guessing.
ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'customer'
    CHECK (role IN ('customer', 'admin'));

-- One row per throttled key ("account:<email>" or "ip:<address>"): failed logins since
-- window_start (Unix milliseconds). Shared by every replica through the database.
CREATE TABLE login_failures (
    key          TEXT PRIMARY KEY,
    window_start INTEGER NOT NULL,
    failures     INTEGER NOT NULL
);
