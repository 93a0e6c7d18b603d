"""mmserve's HTTP API: a Flask app (see api.app.create_app) that validates
generation requests, hands them to workers through Redis/RQ and relays the
workers' token events back as JSON or Server-Sent Events. It never imports
worker/ and never loads a model."""
