-- The ledger of record. Redis only caches what is derived from these tables (plus reservations in flight).

CREATE TABLE plans (
    id                  text PRIMARY KEY,
    monthly_allowance   bigint NOT NULL CHECK (monthly_allowance >= 0),
    warn_threshold      double precision NOT NULL DEFAULT 0.80,
    critical_threshold  double precision NOT NULL DEFAULT 0.95,
    model_weights       jsonb NOT NULL DEFAULT '[]',
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE accounts (
    user_id             text PRIMARY KEY,
    email               text NOT NULL DEFAULT '',
    name                text NOT NULL DEFAULT '',
    plan_id             text NOT NULL REFERENCES plans (id),
    status              text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    status_reason       text NOT NULL DEFAULT '',
    allowance_override  bigint CHECK (allowance_override >= 0),
    warn_threshold      double precision,
    critical_threshold  double precision,
    -- Grows with every change to the balance; the Redis copy refuses older snapshots.
    version             bigint NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- Allowance spent per calendar cycle ("2026-11"); a new cycle starts with no row, i.e. nothing spent.
CREATE TABLE account_cycles (
    user_id         text NOT NULL REFERENCES accounts (user_id),
    cycle           text NOT NULL,
    allowance_used  bigint NOT NULL DEFAULT 0,
    tokens_charged  bigint NOT NULL DEFAULT 0,
    requests        bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, cycle)
);

CREATE TABLE credit_grants (
    id          bigserial PRIMARY KEY,
    user_id     text NOT NULL REFERENCES accounts (user_id),
    amount      bigint NOT NULL CHECK (amount > 0),
    remaining   bigint NOT NULL CHECK (remaining >= 0),
    reason      text NOT NULL,
    source      text NOT NULL DEFAULT 'admin',
    source_ref  text,
    expires_at  timestamptz,
    created_by  text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_grants_open ON credit_grants (user_id) WHERE remaining > 0;
-- A payment (or any external reference) credits at most once.
CREATE UNIQUE INDEX credit_grants_source_ref ON credit_grants (source, source_ref) WHERE source_ref IS NOT NULL;

CREATE TABLE usage_events (
    request_id          text PRIMARY KEY,
    user_id             text NOT NULL REFERENCES accounts (user_id),
    model               text NOT NULL DEFAULT '',
    prompt_tokens       bigint NOT NULL DEFAULT 0,
    completion_tokens   bigint NOT NULL DEFAULT 0,
    cost                bigint NOT NULL,
    cycle               text NOT NULL,
    status              text NOT NULL DEFAULT 'succeeded',
    estimated           boolean NOT NULL DEFAULT false,
    source              text NOT NULL DEFAULT '',
    occurred_at         timestamptz NOT NULL,
    recorded_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_events_user_cycle ON usage_events (user_id, cycle);

-- Every movement of tokens: negative amounts are spend, positive ones are grants and adjustments.
CREATE TABLE ledger_entries (
    id          bigserial PRIMARY KEY,
    user_id     text NOT NULL REFERENCES accounts (user_id),
    cycle       text NOT NULL,
    kind        text NOT NULL,   -- usage | grant | adjustment
    draws_from  text NOT NULL,   -- allowance | credit | overdraft | grant
    amount      bigint NOT NULL,
    grant_id    bigint REFERENCES credit_grants (id),
    request_id  text,
    reason      text NOT NULL DEFAULT '',
    actor       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_user ON ledger_entries (user_id, id);

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    actor       text NOT NULL,
    action      text NOT NULL,
    target      text NOT NULL,
    before      jsonb,
    after       jsonb,
    reason      text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_target ON audit_log (target, id);
