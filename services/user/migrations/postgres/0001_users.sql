-- The same table as migrations/sqlite, in PostgreSQL types.
CREATE TABLE users (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id            TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    -- Stored lower-cased, so uniqueness ignores case.
    email         TEXT NOT NULL UNIQUE,
    -- PHC string: algorithm, parameters, salt and hash. Never the password.
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL
);
