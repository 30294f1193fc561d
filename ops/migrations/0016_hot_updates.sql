-- Updates that change no indexed column can be HOT: PostgreSQL then writes the new row version
-- beside the old one, on the same page, and touches no index. The lease protocol's frequent
-- updates (processor/attempts.py: claim, renew, store the result) change only `locked_until`,
-- `tries`, `result` and `updated_at`, and the dispatcher's claims of webhook deliveries only
-- `locked_until`, `attempts` and `updated_at`. Two things kept them from being HOT.

-- 1. The sweeps of reported results were indexed on `updated_at`, which every update changes.
-- They now read `reported_at`, set when a row is marked reported, in the statement that also
-- changes its state (so never HOT anyway). A row an older processor marked reported has none:
-- it is swept by `updated_at`, as before.
ALTER TABLE payment_attempts ADD COLUMN reported_at timestamptz;
ALTER TABLE psp_tasks ADD COLUMN reported_at timestamptz;
ALTER TABLE refunds ADD COLUMN reported_at timestamptz;
UPDATE payment_attempts SET reported_at = updated_at WHERE state = 'reported';
UPDATE psp_tasks SET reported_at = updated_at WHERE state = 'reported';
UPDATE refunds SET reported_at = updated_at WHERE task = 'reported';
DROP INDEX payment_attempts_reported;
DROP INDEX psp_tasks_reported;
DROP INDEX refunds_reported;
-- Few rows are reported at any time (until their result is applied), so the sweep filters
-- them by time without an index on it.
CREATE INDEX payment_attempts_reported ON payment_attempts (commands_exchange)
    WHERE state = 'reported';
CREATE INDEX psp_tasks_reported ON psp_tasks (commands_exchange) WHERE state = 'reported';
CREATE INDEX refunds_reported ON refunds (commands_exchange) WHERE task = 'reported';

-- 2. A page filled by inserts has no room for a new version of its rows. These tables keep
-- room on each page for the updates that follow an insert within seconds. It applies to
-- pages written from now on.
ALTER TABLE payment_attempts SET (fillfactor = 70);
ALTER TABLE psp_tasks SET (fillfactor = 70);
ALTER TABLE refunds SET (fillfactor = 80);
ALTER TABLE webhook_deliveries SET (fillfactor = 80);

-- One index fewer for every delivery written: the uniqueness of (endpoint, event) led by the
-- event serves the look-ups by event (pending_webhooks) that had an index of their own.
ALTER TABLE webhook_deliveries
    ADD CONSTRAINT webhook_deliveries_event_endpoint_key UNIQUE (event_id, endpoint_id);
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_endpoint_id_event_id_key;
DROP INDEX webhook_deliveries_event;
