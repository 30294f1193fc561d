-- Events the outbox relay (processor/outbox.py) has not published yet. The insert of an event
-- writes its row here in the same statement (the trigger below), whoever inserts it; the
-- relay deletes the rows of a batch once RabbitMQ confirmed it. Marking the event itself
-- published wrote each event row a second time, with its index entries (the unpublished
-- index's predicate ruled out a HOT update): a quarter of all WAL under `make bench`.
CREATE TABLE events_outbox (
    exchange  text   NOT NULL,
    seq       bigint NOT NULL,
    PRIMARY KEY (exchange, seq)
);
INSERT INTO events_outbox (exchange, seq)
SELECT exchange, seq FROM events WHERE published_at IS NULL;
DROP INDEX events_unpublished;
ALTER TABLE events DROP COLUMN published_at;

CREATE FUNCTION events_to_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events_outbox (exchange, seq) SELECT exchange, seq FROM added;
    RETURN NULL;
END
$$;
-- Once per statement, with the rows it inserted (an event skipped by ON CONFLICT is not).
CREATE TRIGGER events_to_outbox AFTER INSERT ON events REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION events_to_outbox();
