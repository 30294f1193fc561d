-- The PaymentIntents and Charges lists (edge/reads.py): newest first by (created, id), walked
-- by keyset. Each index below serves one list or filter as an index scan in that order, so a
-- page reads its rows and one more, whatever the page's depth.

-- GET /v1/payment_intents?customer=…: the customer's intents in the list's order. Intents
-- without a customer never match the filter, and are left out of the index.
CREATE INDEX payment_intents_customer
    ON payment_intents (account_id, customer, created DESC, id DESC)
    WHERE customer IS NOT NULL;

-- GET /v1/charges.
CREATE INDEX charges_account ON charges (account_id, created DESC, id DESC);

-- GET /v1/charges?payment_intent=…: charges_intent orders by created alone, and charges made in
-- one transaction share it, so the page order needs the id too.
CREATE INDEX charges_intent_page ON charges (payment_intent_id, created DESC, id DESC);

-- GET /v1/charges?customer=… (a semi-join on the charge's intent: charges have no customer of
-- their own to index) walks charges_account checking each charge's intent by its primary key,
-- or reads the customer's intents through payment_intents_customer and their charges through
-- charges_intent_page, whichever the planner finds cheaper for that customer.
