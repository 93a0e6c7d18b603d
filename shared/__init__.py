"""What the API and the workers both import: payload schema, Redis key names,
event protocol, reader registry and settings. Imports neither api/ nor worker/,
and nothing heavier than redis and pydantic."""
