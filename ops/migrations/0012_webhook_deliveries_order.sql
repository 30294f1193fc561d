-- The claim looks at due deliveries in (next_attempt_at, event_seq) order, LIMITed
-- (processor/webhooks.py): with event_seq in the index the scan stops at the limit, instead of
-- reading and sorting every due delivery, which made a backlog slower to drain the larger it was.
DROP INDEX webhook_deliveries_due;
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (exchange, next_attempt_at, event_seq)
    WHERE state = 'pending';
-- The intake takes a new delivery for itself unless an earlier event of the same object is due
-- for the same endpoint elsewhere (processor/webhook_intake.py): one index probe per delivery.
CREATE INDEX webhook_deliveries_object ON webhook_deliveries (endpoint_id, object_id, event_seq)
    WHERE state = 'pending';
