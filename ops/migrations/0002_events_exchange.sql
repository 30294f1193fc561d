-- Each event names the exchange it is published to, and each relay publishes only its own
-- exchange's events: deployments (or test stacks) that share a database never publish each
-- other's events.
ALTER TABLE events ADD COLUMN exchange text NOT NULL DEFAULT 'payonce.events'
    CHECK (length(exchange) BETWEEN 1 AND 255);
ALTER TABLE events ALTER COLUMN exchange DROP DEFAULT;
DROP INDEX events_unpublished;
CREATE INDEX events_unpublished ON events (exchange, seq) WHERE published_at IS NULL;
