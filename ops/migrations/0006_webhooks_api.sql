-- The webhook endpoints API (edge/webhook_endpoints.py).
--
-- An endpoint's id is derived from (account, Idempotency-Key), so a create retried after
-- Redis forgot its answer lands on the row already there. The create's request fingerprint,
-- kept with it, tells a retry of the same request (answered with that endpoint) from the key
-- reused for another one (an idempotency error), as the inbox's fingerprint does for
-- commands. NULL for endpoints not created through the API.
ALTER TABLE webhook_endpoints ADD COLUMN fingerprint text
    CHECK (fingerprint ~ '^[0-9a-f]{64}$');
