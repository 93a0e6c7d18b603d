"""The generation engine: a batched decode loop over a transformers model.
Knows nothing of Redis, RQ or HTTP; the batcher drives it."""
