-- payonce core schema. Invariants are enforced here as well as in Python: a bug in the
-- processor must fail a constraint rather than record an impossible payment.

CREATE TYPE payment_intent_status AS ENUM (
    'requires_payment_method', 'requires_confirmation', 'requires_action', 'processing',
    'requires_capture', 'succeeded', 'canceled'
);
CREATE TYPE charge_status AS ENUM ('pending', 'succeeded', 'failed');

CREATE TABLE accounts (
    id          text PRIMARY KEY CHECK (id ~ '^acct_[0-9A-Za-z]{16,32}$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- API keys are stored as SHA-256 digests: they only ever need checking.
CREATE TABLE api_keys (
    key_hash    bytea PRIMARY KEY CHECK (length(key_hash) = 32),
    account_id  text NOT NULL REFERENCES accounts (id),
    kind        text NOT NULL CHECK (kind IN ('secret', 'publishable')),
    last4       text NOT NULL CHECK (length(last4) = 4),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_account ON api_keys (account_id);

-- Written only by the processor.
CREATE TABLE payment_intents (
    id                  text PRIMARY KEY CHECK (id ~ '^pi_[0-9A-Za-z]{24}$'),
    account_id          text NOT NULL REFERENCES accounts (id),
    amount              bigint NOT NULL CHECK (amount BETWEEN 1 AND 99999999),
    amount_received     bigint NOT NULL DEFAULT 0 CHECK (amount_received BETWEEN 0 AND amount),
    currency            text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    status              payment_intent_status NOT NULL,
    capture_method      text NOT NULL DEFAULT 'automatic'
                        CHECK (capture_method IN ('automatic', 'automatic_async', 'manual')),
    customer            text CHECK (length(customer) <= 255),
    description         text CHECK (length(description) <= 1000),
    metadata            jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    payment_method      text CHECK (length(payment_method) <= 255),
    last_payment_error  jsonb CHECK (last_payment_error IS NULL
                                     OR jsonb_typeof(last_payment_error) = 'object'),
    latest_charge       text,
    created             timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'processing' OR payment_method IS NOT NULL),
    CHECK (status <> 'succeeded' OR amount_received = amount)
);
CREATE INDEX payment_intents_account ON payment_intents (account_id, created DESC, id DESC);

-- The authority on idempotency: one row per client command, written in the transaction that
-- applies it, so a redelivered or re-published command is a no-op.
CREATE TABLE inbox (
    account_id       text NOT NULL REFERENCES accounts (id),
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    fingerprint      text NOT NULL CHECK (fingerprint ~ '^[0-9a-f]{64}$'),
    command          text NOT NULL,
    object_id        text NOT NULL,
    outcome          text NOT NULL CHECK (outcome IN ('applied', 'rejected')),
    error            jsonb,
    request_id       text,
    applied_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, idempotency_key),
    CHECK ((outcome = 'rejected') = (error IS NOT NULL))
);

-- One row per authorization sent to the PSP; also the durable task that makes the PSP call,
-- so a processor that dies mid-call leaves work that another one resumes.
--   pending:  the PSP call is to be made (result NULL) or its result to be reported;
--   reported: the result was published as a command on the intent's partition;
--   settled:  the result is applied to the intent.
CREATE TABLE payment_attempts (
    id                 text PRIMARY KEY CHECK (id ~ '^pa_[0-9A-Za-z]{24}$'),
    account_id         text NOT NULL REFERENCES accounts (id),
    payment_intent_id  text NOT NULL REFERENCES payment_intents (id),
    charge_id          text NOT NULL UNIQUE CHECK (charge_id ~ '^ch_[0-9A-Za-z]{24}$'),
    psp_key            text NOT NULL UNIQUE,
    amount             bigint NOT NULL CHECK (amount > 0),
    currency           text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    payment_method     text NOT NULL,
    state              text NOT NULL DEFAULT 'pending'
                       CHECK (state IN ('pending', 'reported', 'settled')),
    result             jsonb,
    tries              integer NOT NULL DEFAULT 0 CHECK (tries >= 0),
    next_try_at        timestamptz NOT NULL DEFAULT now(),
    locked_until       timestamptz,
    request_id         text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (state = 'pending' OR result IS NOT NULL)
);
CREATE INDEX payment_attempts_due ON payment_attempts (next_try_at) WHERE state = 'pending';
CREATE INDEX payment_attempts_intent ON payment_attempts (payment_intent_id);

CREATE TABLE charges (
    id                 text PRIMARY KEY CHECK (id ~ '^ch_[0-9A-Za-z]{24}$'),
    account_id         text NOT NULL REFERENCES accounts (id),
    payment_intent_id  text NOT NULL REFERENCES payment_intents (id),
    attempt_id         text NOT NULL UNIQUE REFERENCES payment_attempts (id),
    amount             bigint NOT NULL CHECK (amount > 0),
    amount_captured    bigint NOT NULL CHECK (amount_captured BETWEEN 0 AND amount),
    currency           text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    status             charge_status NOT NULL,
    payment_method     text NOT NULL,
    authorization_code text,
    failure_code       text,
    failure_message    text,
    decline_code       text,
    created            timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'succeeded') = (authorization_code IS NOT NULL)),
    CHECK ((status = 'failed') = (failure_code IS NOT NULL))
);
CREATE INDEX charges_intent ON charges (payment_intent_id, created DESC);

-- The outbox: events are written with the state change that causes them and published by
-- the relay; seq orders them, published_at marks the ones RabbitMQ confirmed.
CREATE TABLE events (
    seq                  bigserial PRIMARY KEY,
    id                   text NOT NULL UNIQUE CHECK (id ~ '^evt_[0-9A-Za-z]{24}$'),
    account_id           text NOT NULL REFERENCES accounts (id),
    type                 text NOT NULL CHECK (type ~ '^[a-z_]+\.[a-z_]+$'),
    object_id            text NOT NULL,
    data                 jsonb NOT NULL CHECK (jsonb_typeof(data) = 'object'),
    previous_attributes  jsonb,
    request_id           text,
    idempotency_key      text,
    created              timestamptz NOT NULL DEFAULT now(),
    published_at         timestamptz
);
CREATE INDEX events_unpublished ON events (seq) WHERE published_at IS NULL;
CREATE INDEX events_object ON events (object_id, seq);

-- The PSP simulator's own books, as a real PSP keeps them: one row per idempotency key.
CREATE SCHEMA psp;
CREATE TABLE psp.charges (
    idempotency_key     text PRIMARY KEY,
    request_hash        text NOT NULL,
    amount              bigint NOT NULL CHECK (amount > 0),
    currency            text NOT NULL,
    payment_method      text NOT NULL,
    outcome             text NOT NULL CHECK (outcome IN ('captured', 'declined')),
    authorization_code  text,
    failure_code        text,
    decline_code        text,
    failure_message     text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((outcome = 'captured') = (authorization_code IS NOT NULL))
);
