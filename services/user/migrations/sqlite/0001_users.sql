CREATE TABLE users (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    -- Stored lower-cased, so uniqueness ignores case.
    email         TEXT NOT NULL UNIQUE,
    -- PHC string: algorithm, parameters, salt and hash. Never the password.
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL
);
