"""The local stack: real etcd, PostgreSQL, provider and replica processes on loopback — or,
partitioned, each in its own network namespace on one bridge (:mod:`app.stack.netns`), with a
nemesis that cuts links between them (:mod:`app.stack.nemesis`)."""

from __future__ import annotations

from app.errors import PaydispatchError


class StackError(PaydispatchError):
    """A local stack process could not be started or stopped."""
