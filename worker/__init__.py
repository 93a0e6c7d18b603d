"""Model workers: an RQ worker that collects jobs into micro-batches and runs
them through the engine, publishing token events on Redis pub/sub."""
