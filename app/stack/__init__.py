"""The local stack: real etcd, PostgreSQL, provider and replica processes on loopback."""

from __future__ import annotations

from app.errors import PaydispatchError


class StackError(PaydispatchError):
    """A local stack process could not be started or stopped."""
