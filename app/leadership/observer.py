"""Who leads, as every replica observes it: a watch on the election prefix.

The leader is the candidate key with the lowest create revision; its revision is the fencing
token. Followers and the leader alike serve this view (``/v1/leader``, ``/v1/cluster``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from app.leadership.elector import ElectionConfig
from app.leadership.etcd import EtcdClient, KeyValue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads, as every replica observes it through etcd."""

    node_id: str
    url: str
    token: int
    since: str
    key: str


class LeaderObserver:
    """Tracks the current leader through a watch on the election prefix (every replica)."""

    def __init__(self, config: ElectionConfig, client: EtcdClient) -> None:
        self.config = config
        self.client = client
        self.leader: LeaderInfo | None = None
        self.changes: list[LeaderInfo] = []  # recent leaders, newest last (bounded)
        self.candidates: list[LeaderInfo] = []  # every campaigning replica, leader first

    async def run(self) -> None:
        """Follow the prefix until cancelled; reconnects from a fresh read after errors."""
        prefix = self.config.prefix
        while True:
            try:
                kvs, revision = await self.client.get_prefix_sorted_by_create(
                    prefix, timeout=self.config.etcd_timeout
                )
                candidates = {kv.key: kv for kv in kvs}
                self._update(candidates)
                async for event in self.client.watch(
                    prefix, start_revision=revision + 1, prefix=True
                ):
                    if event.type == "delete":
                        candidates.pop(event.key, None)
                    else:
                        candidates[event.key] = KeyValue(
                            key=event.key,
                            value=event.value,
                            create_revision=event.create_revision,
                            mod_revision=event.mod_revision,
                            lease=event.lease,
                        )
                    self._update(candidates)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd unreachable: keep the last view, retry soon
                log.debug("leader watch interrupted: %s", exc)
                await asyncio.sleep(0.2)

    def _update(self, candidates: dict[str, KeyValue]) -> None:
        # Only keys with a lease are candidates (see Elector._wait_for_predecessors).
        ordered = sorted(
            (kv for kv in candidates.values() if kv.lease), key=lambda kv: kv.create_revision
        )
        self.candidates = [_info(kv, since="") for kv in ordered]
        if not ordered:
            if self.leader is not None:
                log.info("observed: no leader")
            self.leader = None
            return
        first = ordered[0]
        if self.leader is not None and self.leader.token == first.create_revision:
            return
        self.leader = _info(first, since=datetime.now(UTC).isoformat())
        self.changes = [*self.changes[-49:], self.leader]
        log.info("observed new leader %s with token %s", self.leader.node_id, self.leader.token)


def _info(kv: KeyValue, *, since: str) -> LeaderInfo:
    """A candidate key as LeaderInfo (the token is its create revision)."""
    try:
        value = json.loads(kv.value)
    except ValueError:
        value = {}
    if not isinstance(value, dict):
        value = {}
    return LeaderInfo(
        node_id=str(value.get("node_id", "?")),
        url=str(value.get("url", "")),
        token=kv.create_revision,
        since=since,
        key=kv.key,
    )
