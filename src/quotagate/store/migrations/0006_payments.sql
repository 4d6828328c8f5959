-- Card payments through Stripe Checkout. A checkout session is one row, created when the buyer is sent to
-- Stripe (status 'open') and credited at most once (grant_id set in the same transaction as the grant).
-- A failed card attempt that no session row explains is a row of its own (session_id NULL), once per
-- PaymentIntent, so a redelivered failure event notifies once.

CREATE TABLE payments (
    id                bigserial PRIMARY KEY,
    session_id        text UNIQUE,
    payment_intent    text,
    user_id           text NOT NULL,
    package_id        text NOT NULL DEFAULT '',
    tokens            bigint NOT NULL DEFAULT 0 CHECK (tokens >= 0),
    amount            bigint NOT NULL DEFAULT 0,          -- smallest currency unit (centavos)
    currency          text NOT NULL DEFAULT '',
    status            text NOT NULL DEFAULT 'open'
                      CHECK (status IN ('open', 'paid', 'unpaid', 'failed', 'expired', 'refunded', 'partially_refunded')),
    grant_id          bigint UNIQUE REFERENCES credit_grants (id),
    refunded_amount   bigint NOT NULL DEFAULT 0,          -- cumulative, as Stripe reports it on the charge
    tokens_removed    bigint NOT NULL DEFAULT 0,          -- taken back from the grant by refunds
    failure_message   text NOT NULL DEFAULT '',
    last_event_id     text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (session_id IS NOT NULL OR payment_intent IS NOT NULL)
);
CREATE INDEX payments_user ON payments (user_id, id);
CREATE INDEX payments_payment_intent ON payments (payment_intent) WHERE payment_intent IS NOT NULL;
CREATE UNIQUE INDEX payments_failed_attempt ON payments (payment_intent) WHERE session_id IS NULL;

-- The buyer is told when a card payment fails.
ALTER TABLE notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_kind_check
    CHECK (kind IN ('warn', 'critical', 'blocked', 'credits', 'renewed', 'payment_failed'));
