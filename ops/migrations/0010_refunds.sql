-- Refunds (processor/refunds.py, edge/refunds.py).
--
-- A refund row is both the API object and the durable task that asks the PSP for it, as
-- payment_attempts is for authorizations:
--   task pending:  the PSP is to be asked (result NULL) or its answer to be reported;
--   task reported: the answer was published as a command on the intent's partition;
--   task settled:  the answer is applied and final.
-- A refund the PSP may still fail (`final` false in its answer) goes back to `pending` after
-- it is applied, due again later, and asks the PSP again with the same key.
--
-- The amount a charge has refunded counts pending and succeeded refunds; a refund that fails
-- gives its amount back. It never exceeds what was captured.

ALTER TABLE charges ADD COLUMN amount_refunded bigint NOT NULL DEFAULT 0
    CHECK (amount_refunded >= 0);
ALTER TABLE charges ADD CONSTRAINT charges_refunded_within_captured
    CHECK (amount_refunded <= amount_captured);

CREATE TABLE refunds (
    id                 text PRIMARY KEY CHECK (id ~ '^re_[0-9A-Za-z]{24}$'),
    -- The order refunds were made in, for lists: `created` is in whole seconds.
    seq                bigserial NOT NULL UNIQUE,
    account_id         text NOT NULL REFERENCES accounts (id),
    payment_intent_id  text NOT NULL REFERENCES payment_intents (id),
    charge_id          text NOT NULL REFERENCES charges (id),
    amount             bigint NOT NULL CHECK (amount > 0),
    currency           text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    status             text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    reason             text CHECK (reason IN ('duplicate', 'fraudulent', 'requested_by_customer')),
    failure_reason     text CHECK (length(failure_reason) <= 100),
    metadata           jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    -- The charge's psp key: what the PSP knows the charge by.
    charge_psp_key     text NOT NULL,
    psp_key            text NOT NULL UNIQUE,
    task               text NOT NULL DEFAULT 'pending'
                       CHECK (task IN ('pending', 'reported', 'settled')),
    result             jsonb,
    tries              integer NOT NULL DEFAULT 0 CHECK (tries >= 0),
    reports            integer NOT NULL DEFAULT 0 CHECK (reports >= 0),
    next_try_at        timestamptz NOT NULL DEFAULT now(),
    locked_until       timestamptz,
    request_id         text,
    commands_exchange  text NOT NULL CHECK (length(commands_exchange) BETWEEN 1 AND 255),
    created            timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'failed') = (failure_reason IS NOT NULL)),
    CHECK (task <> 'reported' OR result IS NOT NULL),
    -- A refund born failed (it would have exceeded the charge) never reaches the PSP.
    CHECK (status <> 'failed' OR task = 'settled')
);
CREATE INDEX refunds_account ON refunds (account_id, seq DESC);
CREATE INDEX refunds_charge ON refunds (charge_id, seq DESC);
CREATE INDEX refunds_intent ON refunds (payment_intent_id, seq DESC);
CREATE INDEX refunds_due ON refunds (commands_exchange, next_try_at) WHERE task = 'pending';
CREATE INDEX refunds_reported ON refunds (commands_exchange, updated_at) WHERE task = 'reported';

-- The PSP simulator's books of refunds: one row per idempotency key, against the charge's.
CREATE TABLE psp.refunds (
    idempotency_key  text PRIMARY KEY,
    charge_key       text NOT NULL REFERENCES psp.charges (idempotency_key),
    request_hash     text NOT NULL,
    amount           bigint NOT NULL CHECK (amount > 0),
    status           text NOT NULL CHECK (status IN ('succeeded', 'failed')),
    failure_reason   text,
    -- When a refund that succeeded is to fail (Stripe's refundFail test card); NULL if never.
    fails_at         timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'failed') = (failure_reason IS NOT NULL))
);
CREATE INDEX psp_refunds_charge ON psp.refunds (charge_key);

-- Stripe's `charge.refund.updated` has three parts.
ALTER TABLE events DROP CONSTRAINT events_type_check;
ALTER TABLE events ADD CONSTRAINT events_type_check CHECK (type ~ '^[a-z_]+(\.[a-z_]+)+$');
