"""Observability: Prometheus metrics (one registry per app) and structured JSON logs."""
