"""Where a load scenario sends its traffic and what it observes: the local stack describes
itself this way, and so does a deployment named on the command line."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Target:
    """Where the scenario sends load and what it observes."""

    ingress: Sequence[str]  # load balancer URL, or every replica
    database_url: str
    provider_url: str
    node_urls: Sequence[str] = ()  # replicas' own URLs, for /v1/leader and /v1/node
    inject: Callable[[str], None] | None = None  # applies a fault by name (blocking)
    api_key: str | None = None  # bearer token for /v1/*
    # Only for one's own deployment reached over its own network (the compose `load`
    # service); tests, the demo and CI always stay on loopback.
    allow_remote: bool = False
