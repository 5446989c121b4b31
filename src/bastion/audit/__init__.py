"""The audit trail: typed events, redaction, a durable emitter, and search."""
