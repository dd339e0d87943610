"""A leadership term as the elector publishes it, and the arithmetic of its validity.

The leader trusts itself only until ``start of the last confirmed lease refresh + TTL -
margin`` on the monotonic clock. etcd extends a lease from when it *receives* a refresh,
which is no earlier than when it was sent, so measuring from the send time never
over-estimates; the margin absorbs clock-rate differences and the time a call already
under way needs to notice. Past the deadline, with no newer confirmation, the term is over
as far as this process is concerned — before etcd could hand leadership to anyone else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from app.errors import LeadershipLost

Clock = Callable[[], float]


class LeaseState(Protocol):
    """What a term needs from its lease keep-alive (``KeepAlive`` is the real one)."""

    @property
    def last_ok_sent(self) -> float:
        """Monotonic instant at which the newest confirmed refresh was sent."""
        ...

    @property
    def lost_reason(self) -> str | None:
        """Why the lease is gone, or None while it is held."""
        ...


@dataclass
class Term:
    """This replica's term as leader. Trust it only while ``remaining() > 0``.

    ``token`` is the leader key's create revision: strictly increasing across terms, it is
    the fencing token every leader write carries. ``stopping`` is set when the term ends
    gracefully (resign, handover): the work should stop taking new work and return.
    """

    token: int
    key: str
    lease_id: int
    node_id: str
    lease: LeaseState
    ttl: float
    margin: float
    clock: Clock = time.monotonic
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    elected_at: float = field(default=0.0)
    # Set by the subscriber once it may act (the dispatch side: after raising the fence);
    # until then the replica does not report itself as the leader.
    acting: bool = False
    # Why the term ended before its lease did (its leader key was deleted or overwritten).
    lost_reason: str | None = None

    def __post_init__(self) -> None:
        if not self.elected_at:
            self.elected_at = self.clock()

    def begin_acting(self) -> None:
        """The subscriber has taken the term up: from now on this replica reports itself
        as the leader (``Elector.is_leader``)."""
        self.acting = True

    @property
    def deadline(self) -> float:
        """Monotonic instant after which this leader must not act: last confirmed refresh
        *sent* + TTL - safety margin."""
        return self.lease.last_ok_sent + self.ttl - self.margin

    def remaining(self) -> float:
        """Seconds of validity left (≤ 0: no longer leader)."""
        if self.lost_reason is not None:
            return 0.0
        return self.deadline - self.clock()

    def renewed_ago(self) -> float:
        """Seconds since the last confirmed refresh was sent."""
        return self.clock() - self.lease.last_ok_sent

    def lose(self, reason: str) -> None:
        """End the term's validity now, for a reason other than its lease (which keeps its
        own): from here on ``ensure_valid`` raises, as after a lost lease."""
        self.lost_reason = reason

    def ensure_valid(self) -> None:
        """Raise LeadershipLost unless this leader may still act."""
        reason = self.lost_reason or self.lease.lost_reason
        if reason is not None:
            raise LeadershipLost(reason)
        left = self.remaining()
        if left <= 0:
            raise LeadershipLost(
                f"validity deadline passed {-left:.3f}s ago with no confirmed lease renewal"
            )

    def call_timeout(self, cap: float) -> float:
        """A timeout for one call made as leader: at most ``cap``, always shorter than the
        remaining validity. Raises LeadershipLost when no time is left."""
        self.ensure_valid()
        return max(0.001, min(cap, self.remaining() - 0.01))
