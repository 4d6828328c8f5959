-- The outbox of customer e-mails: a row is written in the same transaction as the balance change that calls
-- for it, and a sender delivers it later (at least once). Each kind at most once per account and cycle.

CREATE TABLE notifications (
    id               bigserial PRIMARY KEY,
    user_id          text NOT NULL REFERENCES accounts (user_id),
    cycle            text NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('warn', 'critical', 'blocked', 'credits', 'renewed')),
    amount           bigint NOT NULL DEFAULT 0,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'skipped')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    sent_at          timestamptz,
    UNIQUE (user_id, cycle, kind)
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'pending';
