"""The processor: applies commands to PaymentIntents in Postgres, calls the PSP, relays events."""
