"""Engines run one request body for an endpoint. The router picks one by body.model."""
