-- Webhook endpoints and deliveries.
--
-- Endpoints are configuration without external side effects, written by the edge directly.
-- Their signing secret is derived from the endpoint id with the server secret
-- (contracts/ids.py), so it is never stored; the dispatcher derives it again to sign.
CREATE TABLE webhook_endpoints (
    id              text PRIMARY KEY CHECK (id ~ '^we_[0-9A-Za-z]{24}$'),
    account_id      text NOT NULL REFERENCES accounts (id),
    url             text NOT NULL CHECK (length(url) BETWEEN 1 AND 2048),
    description     text CHECK (length(description) <= 5000),
    metadata        jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    -- Event types, or '*' for all of them.
    enabled_events  text[] NOT NULL CHECK (cardinality(enabled_events) BETWEEN 1 AND 256),
    status          text NOT NULL DEFAULT 'enabled' CHECK (status IN ('enabled', 'disabled')),
    -- Why it was disabled by payonce (410, failing for days); NULL when enabled or disabled
    -- by the merchant.
    disabled_reason text,
    -- The first failure of the current unbroken run of failed attempts; NULL after a success.
    failing_since   timestamptz,
    deleted_at      timestamptz,
    created         timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_account ON webhook_endpoints (account_id, created DESC, id DESC)
    WHERE deleted_at IS NULL;

-- One row per (endpoint, event): the durable task that delivers the event there, claimed
-- under a lease as payment attempts are, so several dispatchers never send an attempt twice
-- and a dispatcher that dies leaves work another one resumes. Each names the events exchange
-- of its deployment, so deployments (or test stacks) sharing a database stay apart.
--   pending:   an attempt is due at next_attempt_at;
--   succeeded: the endpoint answered 2xx;
--   failed:    every attempt failed, or the endpoint was disabled or deleted meanwhile.
CREATE TABLE webhook_deliveries (
    id               text PRIMARY KEY CHECK (id ~ '^whd_[0-9A-Za-z]{24}$'),
    account_id       text NOT NULL REFERENCES accounts (id),
    endpoint_id      text NOT NULL REFERENCES webhook_endpoints (id),
    event_id         text NOT NULL REFERENCES events (id),
    -- The event's object and its place in the outbox, to send one object's events in order.
    object_id        text NOT NULL,
    event_seq        bigint NOT NULL,
    exchange         text NOT NULL CHECK (length(exchange) BETWEEN 1 AND 255),
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'succeeded', 'failed')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz,
    locked_until     timestamptz,
    created          timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (endpoint_id, event_id),
    CHECK ((state = 'pending') = (next_attempt_at IS NOT NULL))
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (exchange, next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, created DESC);

-- Every attempt of a delivery, as `GET /v1/webhook_endpoints/{id}/deliveries` shows it.
CREATE TABLE webhook_attempts (
    delivery_id      text NOT NULL REFERENCES webhook_deliveries (id),
    attempt          integer NOT NULL CHECK (attempt >= 1),
    created          timestamptz NOT NULL DEFAULT now(),
    status_code      integer CHECK (status_code BETWEEN 100 AND 599),
    latency_ms       integer NOT NULL CHECK (latency_ms >= 0),
    error            text CHECK (length(error) <= 1000),
    next_attempt_at  timestamptz,
    PRIMARY KEY (delivery_id, attempt),
    CHECK (status_code IS NOT NULL OR error IS NOT NULL)
);

-- The Events API lists an account's events newest first.
CREATE INDEX events_account ON events (account_id, seq DESC);
