"""Speculative decoding: drafting tokens cheaply and checking them against the model."""
