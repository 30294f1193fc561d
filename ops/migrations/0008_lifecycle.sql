-- The PaymentIntent lifecycle beyond confirm: manual capture, cancel, expiry of uncaptured
-- authorizations, and the PSP tasks (capture, void, reversal) that move the money for them.

-- What an authorization still holds for a capture. Positive only while the intent waits for
-- a capture (requires_capture) or while a capture of it is under way (processing).
ALTER TABLE payment_intents
    ADD COLUMN amount_capturable bigint NOT NULL DEFAULT 0
        CHECK (amount_capturable BETWEEN 0 AND amount),
    ADD COLUMN canceled_at timestamptz,
    ADD COLUMN cancellation_reason text
        CHECK (cancellation_reason IN ('abandoned', 'automatic', 'duplicate', 'fraudulent',
                                       'requested_by_customer')),
    ADD CONSTRAINT payment_intents_capturable_status
        CHECK (amount_capturable = 0 OR status IN ('requires_capture', 'processing')),
    ADD CONSTRAINT payment_intents_canceled_at
        CHECK ((status = 'canceled') = (canceled_at IS NOT NULL)),
    ADD CONSTRAINT payment_intents_cancellation_reason
        CHECK (status = 'canceled' OR cancellation_reason IS NULL),
    -- A partial capture succeeds with less than the amount: what was received is at most
    -- the amount (the column's own CHECK), and something.
    ADD CONSTRAINT payment_intents_received
        CHECK (status <> 'succeeded' OR amount_received >= 1);
ALTER TABLE payment_intents DROP CONSTRAINT payment_intents_check2;

-- Authorizations left uncaptured, for the sweeper that expires them.
CREATE INDEX payment_intents_requires_capture ON payment_intents (latest_charge)
    WHERE status = 'requires_capture';

-- A manual intent's attempt authorizes only.
ALTER TABLE payment_attempts ADD COLUMN capture boolean NOT NULL DEFAULT true;

-- What of an authorization was given back without being captured: released by a void or a
-- partial capture, or reversed after an automatic capture. Never more than was authorized.
ALTER TABLE charges
    ADD COLUMN amount_released bigint NOT NULL DEFAULT 0 CHECK (amount_released >= 0),
    ADD CONSTRAINT charges_released CHECK (amount_released <= amount);

-- PSP work on an authorization that exists: capture it, void (release) it, or reverse a
-- captured one. The same lease protocol as payment_attempts (processor/psp_tasks.py):
--   pending:  the PSP call is to be made (result NULL) or its result to be reported;
--   reported: the result was published as a command on the intent's partition;
--   settled:  the result is applied to the intent and its charge.
CREATE TABLE psp_tasks (
    id                 text PRIMARY KEY CHECK (id ~ '^pt_[0-9A-Za-z]{24}$'),
    account_id         text NOT NULL REFERENCES accounts (id),
    payment_intent_id  text NOT NULL REFERENCES payment_intents (id),
    charge_id          text NOT NULL REFERENCES charges (id),
    kind               text NOT NULL CHECK (kind IN ('capture', 'void', 'reverse')),
    psp_key            text NOT NULL UNIQUE,
    -- The attempt's PSP key: the authorization the task acts on.
    authorization_key  text NOT NULL,
    amount             bigint NOT NULL CHECK (amount > 0),
    state              text NOT NULL DEFAULT 'pending'
                       CHECK (state IN ('pending', 'reported', 'settled')),
    result             jsonb,
    tries              integer NOT NULL DEFAULT 0 CHECK (tries >= 0),
    reports            integer NOT NULL DEFAULT 0 CHECK (reports >= 0),
    next_try_at        timestamptz NOT NULL DEFAULT now(),
    locked_until       timestamptz,
    request_id         text,
    commands_exchange  text NOT NULL CHECK (length(commands_exchange) BETWEEN 1 AND 255),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (state = 'pending' OR result IS NOT NULL)
);
CREATE INDEX psp_tasks_charge ON psp_tasks (charge_id);
CREATE INDEX psp_tasks_due ON psp_tasks (commands_exchange, next_try_at)
    WHERE state = 'pending';
CREATE INDEX psp_tasks_reported ON psp_tasks (commands_exchange, updated_at)
    WHERE state = 'reported';

-- The simulator's books: an authorization is captured at once (automatic) or held
-- (authorized) until a capture or a void settles it; a captured charge may be reversed.
ALTER TABLE psp.charges DROP CONSTRAINT charges_outcome_check;
ALTER TABLE psp.charges DROP CONSTRAINT charges_check;
ALTER TABLE psp.charges
    ADD CONSTRAINT charges_outcome_check
        CHECK (outcome IN ('captured', 'authorized', 'declined')),
    ADD CONSTRAINT charges_authorization_code
        CHECK ((outcome <> 'declined') = (authorization_code IS NOT NULL));
CREATE TABLE psp.operations (
    idempotency_key  text PRIMARY KEY,
    charge_key       text NOT NULL REFERENCES psp.charges (idempotency_key),
    kind             text NOT NULL CHECK (kind IN ('capture', 'void', 'reverse')),
    amount           bigint NOT NULL CHECK (amount > 0),
    created_at       timestamptz NOT NULL DEFAULT now()
);
-- An authorization is settled once, by a capture or a void; a charge is reversed once.
CREATE UNIQUE INDEX psp_operations_one_settlement ON psp.operations (charge_key)
    WHERE kind IN ('capture', 'void');
CREATE UNIQUE INDEX psp_operations_one_reversal ON psp.operations (charge_key)
    WHERE kind = 'reverse';
