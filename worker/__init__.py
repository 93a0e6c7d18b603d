"""Model workers: an RQ worker (rq_worker) that runs generation jobs in batches
through the engine (engine/), as the scheduler decides, publishing token events on Redis pub/sub."""
