"""What the API and the workers both import, declared once: Redis keys (keys),
the event protocol (events), the payload and job shapes (payload, jobs), the
reader registry (registry), reader calls and request/reply (reader_calls, rpc),
defaults, limits and settings. Imports neither api/ nor worker/, and nothing
heavier than redis and pydantic."""
