"""The HTTP edge: authenticates, validates, deduplicates, publishes commands, answers reads."""
