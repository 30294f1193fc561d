-- What the webhook dispatcher (processor/webhooks.py) asks of webhook_deliveries beyond 0005.
--
-- A delivery is not claimed while an earlier event of the same object is due for the same
-- endpoint, so one object's events reach an endpoint in order. Every claim asks that of each
-- candidate; this index answers it from the pending rows alone.
CREATE INDEX webhook_deliveries_order ON webhook_deliveries (endpoint_id, object_id, event_seq)
    WHERE state = 'pending';
