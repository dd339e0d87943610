"""The leader's side of fast crash detection: hold the liveness lock while the term acts."""

from __future__ import annotations

from app.leadership.term import Term
from app.store.liveness import hold_liveness_lock, liveness_key


class LivenessBeacon:
    """``await beacon(term)`` holds the term's liveness lock until cancelled.

    Runs beside the dispatcher (``DispatchLeader`` owns and cancels it); it never ends the
    term: when Postgres is away it retries, and crash detection falls back to the lease.
    """

    def __init__(
        self, database_url: str, fence_name: str, node_id: str, connect_timeout: float
    ) -> None:
        self.database_url = database_url
        self.fence_name = fence_name
        self.node_id = node_id
        self.connect_timeout = connect_timeout
        self.armed = False  # read by tests and /v1/node through FailoverStats

    def _set_armed(self, armed: bool) -> None:
        self.armed = armed

    async def __call__(self, term: Term) -> None:
        """Hold the lock of ``term.token`` until cancelled (the term's end)."""
        try:
            await hold_liveness_lock(
                self.database_url,
                liveness_key(self.fence_name, term.token),
                node_id=self.node_id,
                connect_timeout=self.connect_timeout,
                on_armed=self._set_armed,
            )
        finally:
            self.armed = False
