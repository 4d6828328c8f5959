-- Indexes for the admin queries: usage by time range, accounts by plan, the audit log by action.
CREATE INDEX usage_events_user_occurred ON usage_events (user_id, occurred_at);
CREATE INDEX accounts_plan ON accounts (plan_id, user_id);
CREATE INDEX audit_log_action ON audit_log (action, id);
