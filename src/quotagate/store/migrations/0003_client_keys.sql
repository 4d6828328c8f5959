-- Client keys for Check created through the Admin API; only the SHA-256 of each secret is kept.
CREATE TABLE client_keys (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    key_sha256  text NOT NULL UNIQUE,
    trusted     boolean NOT NULL,
    user_id     text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL DEFAULT '',
    revoked_at  timestamptz,
    CHECK (trusted OR user_id IS NOT NULL)
);
