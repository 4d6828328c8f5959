-- Plans managed through the Admin API: a display name and an active flag. Once a plan is in this table it is
-- the record; the config file only seeds plans that are missing.
ALTER TABLE plans
    ADD COLUMN name   text NOT NULL DEFAULT '',
    ADD COLUMN active boolean NOT NULL DEFAULT true;

-- The signed HTTP webhook delivers the same outbox as the e-mails, tracked apart from them: a failing webhook
-- never sends the e-mail again, nor the other way round. 'none': no webhook was configured when the row was
-- written. event_id is sent with every attempt, so a receiver can drop repeats.
ALTER TABLE notifications
    ADD COLUMN event_id              uuid NOT NULL DEFAULT gen_random_uuid(),
    ADD COLUMN hook_status           text NOT NULL DEFAULT 'none' CHECK (hook_status IN ('none', 'pending', 'sent')),
    ADD COLUMN hook_attempts         integer NOT NULL DEFAULT 0,
    ADD COLUMN hook_next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN hook_last_error       text NOT NULL DEFAULT '',
    ADD COLUMN hook_sent_at          timestamptz;
CREATE UNIQUE INDEX notifications_event_id ON notifications (event_id);
CREATE INDEX notifications_hook_due ON notifications (hook_next_attempt_at) WHERE hook_status = 'pending';
