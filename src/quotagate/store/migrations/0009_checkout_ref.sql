-- What ties a Stripe event to a checkout session quotagate created: a random reference quotagate puts in the
-- session's and the PaymentIntent's metadata and keeps here, so a failed-card event (which names no session)
-- is matched to quotagate's own row instead of to whatever user its metadata names.
ALTER TABLE payments ADD COLUMN checkout_ref text;
CREATE UNIQUE INDEX payments_checkout_ref ON payments (checkout_ref) WHERE checkout_ref IS NOT NULL;

-- One PaymentIntent pays one session: a refund of it debits exactly one purchase.
CREATE UNIQUE INDEX payments_session_payment_intent ON payments (payment_intent)
    WHERE session_id IS NOT NULL AND payment_intent IS NOT NULL;
