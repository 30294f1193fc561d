-- Redelivered commands being applied (processor/consumer.py): a row is written before such a
-- command runs, alone in its process, and deleted in the transaction that applies it. A row
-- that keeps coming back names a command that kills the processor: it is dead-lettered.
CREATE TABLE command_starts (
    queue       text NOT NULL CHECK (length(queue) BETWEEN 1 AND 255),
    message_id  text NOT NULL CHECK (length(message_id) BETWEEN 1 AND 255),
    starts      integer NOT NULL CHECK (starts >= 1),
    first_at    timestamptz NOT NULL DEFAULT now(),
    last_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, message_id)
);

-- A reported result that was never applied (dead-lettered, or lost with a broker's data) is
-- published again, at most a few times, further apart each time: `reports` counts them.
ALTER TABLE payment_attempts ADD COLUMN reports integer NOT NULL DEFAULT 0
    CHECK (reports >= 0);
CREATE INDEX payment_attempts_reported ON payment_attempts (commands_exchange, updated_at)
    WHERE state = 'reported';

-- Intents in processing, for the gauge that tells one is stuck.
CREATE INDEX payment_intents_processing ON payment_intents (updated_at)
    WHERE status = 'processing';
