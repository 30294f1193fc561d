-- charges_intent (payment_intent_id, created DESC) is a prefix of charges_intent_page
-- (ops/migrations/0007_lists.sql), which also orders by id: it serves every query the shorter
-- one did, and with both the planner may pick the one that needs a sort for a list's order.
DROP INDEX IF EXISTS charges_intent;
