-- Each attempt names the commands exchange its PSP result goes back to, and a processor
-- resumes only attempts of its own exchange: deployments (or test stacks) sharing a database
-- never apply each other's results.
ALTER TABLE payment_attempts ADD COLUMN commands_exchange text NOT NULL
    DEFAULT 'payonce.commands' CHECK (length(commands_exchange) BETWEEN 1 AND 255);
ALTER TABLE payment_attempts ALTER COLUMN commands_exchange DROP DEFAULT;
DROP INDEX payment_attempts_due;
CREATE INDEX payment_attempts_due ON payment_attempts (commands_exchange, next_try_at)
    WHERE state = 'pending';
