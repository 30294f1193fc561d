-- An intent's timeline (ops/timeline.py: `GET /v1/payment_intents/{id}/timeline` and
-- `payonce trace`) reads the commands and PSP tasks of one intent: without these indexes each
-- read scanned the whole inbox and every task, and grew slower with every payment taken.
CREATE INDEX inbox_object ON inbox (object_id);
CREATE INDEX psp_tasks_intent ON psp_tasks (payment_intent_id);
