-- Links, API keys, the outbox that keeps Redis in sync, and idempotency
-- records. Codes are compared byte-wise (COLLATE "C"): they are
-- case-sensitive, and "C" keeps the unique index cheap.

CREATE TABLE api_keys (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL,
    -- SHA-256 of the key. Keys are 256-bit random strings, so a fast hash
    -- is enough; the key itself is never stored.
    key_hash    BYTEA NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ
);

CREATE TABLE links (
    id               BIGSERIAL PRIMARY KEY,
    code             TEXT COLLATE "C" NOT NULL UNIQUE,
    url              TEXT NOT NULL,
    redirect_status  SMALLINT NOT NULL DEFAULT 302
                     CHECK (redirect_status IN (301, 302, 307, 308)),
    expires_at       TIMESTAMPTZ,
    disabled         BOOLEAN NOT NULL DEFAULT FALSE,
    is_alias         BOOLEAN NOT NULL,
    created_by       BIGINT REFERENCES api_keys (id),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per change to a link, written in the same transaction as the
-- change. The relay reads the link's current state when it processes a row,
-- so rows carry only the code and may be applied in any order.
CREATE TABLE link_outbox (
    id            BIGSERIAL PRIMARY KEY,
    code          TEXT COLLATE "C" NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    processed_at  TIMESTAMPTZ
);
CREATE INDEX link_outbox_pending ON link_outbox (id) WHERE processed_at IS NULL;

CREATE TABLE idempotency_keys (
    api_key_id     BIGINT NOT NULL REFERENCES api_keys (id),
    idem_key       TEXT NOT NULL,
    request_hash   BYTEA NOT NULL,
    response_body  TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (api_key_id, idem_key)
);
