"""The HTTP API of a replica (aiohttp): ingest and reads on any replica, the cluster view,
admin actions, health, metrics, the OpenAPI document and the dashboard page.

Bad input always gets a 4xx ``application/problem+json`` body naming the field; checks run
in a fixed order (413 → 415 → 400 → 422). Postgres unavailable → 503 with ``Retry-After``.
"""
