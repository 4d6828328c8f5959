-- The notices shown inside the conversation (80% and 95%): one row per account, cycle and threshold, written
-- by the completion that carries the notice. The primary key makes the claim atomic across processes: the
-- first INSERT wins and every other one finds the row, so each notice is shown once per cycle.
CREATE TABLE conversation_notices (
    user_id     text NOT NULL REFERENCES accounts (user_id),
    cycle       text NOT NULL,
    threshold   text NOT NULL CHECK (threshold IN ('warn', 'critical')),
    request_id  text NOT NULL,
    shown_at    timestamptz NOT NULL,
    PRIMARY KEY (user_id, cycle, threshold)
);
