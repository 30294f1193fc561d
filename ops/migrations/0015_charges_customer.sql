-- A charge carries its intent's customer and description, copied when it is made, as
-- Stripe's charges do.
ALTER TABLE charges ADD COLUMN customer text, ADD COLUMN description text;
UPDATE charges c SET customer = p.customer, description = p.description
FROM payment_intents p
WHERE p.id = c.payment_intent_id AND (p.customer IS NOT NULL OR p.description IS NOT NULL);
