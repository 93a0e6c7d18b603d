"""The browser playground served on the inference port: a single page (static files in
`static/`, no build step, nothing loaded from elsewhere) and the one read-only route it
needs beyond the public API (see routes.py)."""
