"""One round and one fit: the RPS math, the exchange, the aggregation rules, the clock, the session and the pipeline."""
