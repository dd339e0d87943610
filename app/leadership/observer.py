"""Who leads, as every replica observes it: a watch on the election prefix, confirmed.

The leader is the candidate key with the lowest create revision; its revision is the fencing
token. Followers and the leader alike serve this view (``/v1/leader``, ``/v1/cluster``).

A view is only worth serving while etcd confirms it. A watch over a partitioned link does not
fail, it goes silent: the last view would be served for as long as the cut lasts, naming a
leader that may have lost its lease long ago. So a second loop re-reads the prefix every
``lease_ttl / 4`` (a linearizable read: an etcd member cut off from its quorum cannot answer
it) and the view counts as *confirmed* only while the last successful read is younger than
``lease_ttl`` — the time in which the leader named by that read could have lost its lease
without anyone here seeing it. Past that, :meth:`LeaderObserver.view` says "unknown since
<last confirmation>" and the routes stop naming a leader.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
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


@dataclass(frozen=True)
class LeaderView:
    """What this replica may say about leadership right now.

    ``confirmed`` is false when etcd has not confirmed the view for longer than the lease
    TTL: then ``leader`` is None (never the stale one) and ``unknown_since`` is the wall-clock
    time (ISO 8601, UTC) of the last confirmation, or of the observer's start if there was
    none."""

    leader: LeaderInfo | None
    candidates: list[LeaderInfo]
    confirmed: bool
    unknown_since: str | None


class LeaderObserver:
    """Tracks the current leader through a watch on the election prefix (every replica) and
    re-confirms it with a periodic linearizable read."""

    def __init__(self, config: ElectionConfig, client: EtcdClient) -> None:
        self.config = config
        self.client = client
        self.leader: LeaderInfo | None = None  # the last view, confirmed or not: see view()
        self.changes: list[LeaderInfo] = []  # recent leaders, newest last (bounded)
        self.candidates: list[LeaderInfo] = []  # every campaigning replica, leader first
        # The view is trusted for one lease TTL after etcd last answered for it.
        self.stale_after = float(config.lease_ttl)
        self.confirm_interval = config.lease_ttl / 4
        self._confirmed_at: float | None = None  # monotonic
        self._confirmed_wall = datetime.now(UTC)  # "unknown since" before any confirmation
        self._revision = 0  # store revision the current candidate set reflects
        self._candidates: dict[str, KeyValue] = {}
        self._change: asyncio.Future[None] | None = None  # done at the next leader change

    def view(self) -> LeaderView:
        """The leader if etcd confirmed the view within ``stale_after`` seconds, else an
        explicit "unknown since" — a replica cut off from etcd names no leader."""
        confirmed = (
            self._confirmed_at is not None
            and time.monotonic() - self._confirmed_at <= self.stale_after
        )
        if confirmed:
            return LeaderView(self.leader, list(self.candidates), True, None)
        return LeaderView(None, list(self.candidates), False, self._confirmed_wall.isoformat())

    def confirmed_leader(self) -> LeaderInfo | None:
        """The leader, only while the view is confirmed (None when none leads or unknown)."""
        return self.view().leader

    def leader_changed(self) -> asyncio.Future[None]:
        """A future that is done at the next change of ``leader`` (another leader, or none).

        Shared by every caller: wait on it with ``asyncio.wait`` (which never cancels it), and
        take a fresh one after each change. Taken before reading ``leader``, it cannot miss a
        change that happens in between: it is then already done. Waiting on it instead of
        re-reading ``leader`` every 100 ms saves a follower's loop ten wake-ups a second.
        Only changes of the raw ``leader`` are announced: a view ageing into "unknown" (see
        :meth:`view`) is not, so wait on this for who leads, never for ``confirmed_leader()``."""
        if self._change is None or self._change.done():
            self._change = asyncio.get_running_loop().create_future()
        return self._change

    async def run(self) -> None:
        """Follow the prefix and confirm the view until cancelled (owns both loops)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow(), name="leader-watch")
            group.create_task(self._confirm(), name="leader-confirm")

    async def _follow(self) -> None:
        """The watch: changes arrive at once; reconnects from a fresh read after errors."""
        prefix = self.config.prefix
        while True:
            try:
                kvs, revision = await self.client.get_prefix_sorted_by_create(
                    prefix, timeout=self.config.etcd_timeout
                )
                self._apply_read(kvs, revision)
                async for event in self.client.watch(
                    prefix, start_revision=revision + 1, prefix=True
                ):
                    if event.mod_revision <= self._revision:
                        continue  # a confirming read already reflects it
                    if event.type == "delete":
                        self._candidates.pop(event.key, None)
                    else:
                        self._candidates[event.key] = KeyValue(
                            key=event.key,
                            value=event.value,
                            create_revision=event.create_revision,
                            mod_revision=event.mod_revision,
                            lease=event.lease,
                        )
                    self._revision = event.mod_revision
                    self._update(self._candidates)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd unreachable: confirm() marks the view unknown
                log.debug("leader watch interrupted: %s", exc)
                await asyncio.sleep(0.2)

    async def _confirm(self) -> None:
        """Re-read the prefix every ``confirm_interval``: a success confirms the view (and
        repairs it if the watch went silent), a failure leaves it to age into "unknown"."""
        timeout = min(self.config.etcd_timeout, self.stale_after / 2)
        while True:
            started = time.monotonic()
            try:
                kvs, revision = await self.client.get_prefix_sorted_by_create(
                    self.config.prefix, timeout=timeout
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # unreachable or no quorum: the view ages
                if self._confirmed_at is not None and started - self._confirmed_at > (
                    self.stale_after
                ):
                    log.debug("leader view unconfirmed: %s", exc)
            else:
                if self._confirmed_at is None or started - self._confirmed_at > self.stale_after:
                    log.info("leader view confirmed by etcd again")
                self._apply_read(kvs, revision)
                # The read was sent at `started`: the view is as fresh as that, no fresher.
                self._confirmed_at = started
                self._confirmed_wall = datetime.now(UTC)
            await asyncio.sleep(max(0.0, started + self.confirm_interval - time.monotonic()))

    def _apply_read(self, kvs: list[KeyValue], revision: int) -> None:
        """Replace the candidate set with a read at ``revision`` unless a newer state (a watch
        event or a later read) is already applied."""
        if revision < self._revision:
            return
        self._revision = revision
        self._candidates = {kv.key: kv for kv in kvs}
        self._update(self._candidates)

    def _update(self, candidates: dict[str, KeyValue]) -> None:
        # Only keys with a lease are candidates (see Elector._wait_for_predecessors).
        ordered = sorted(
            (kv for kv in candidates.values() if kv.lease), key=lambda kv: kv.create_revision
        )
        self.candidates = [candidate_info(kv, since="") for kv in ordered]
        if not ordered:
            if self.leader is not None:
                log.info("observed: no leader")
                self.leader = None
                self._announce_change()
            return
        first = ordered[0]
        if self.leader is not None and self.leader.token == first.create_revision:
            return
        self.leader = candidate_info(first, since=datetime.now(UTC).isoformat())
        self.changes = [*self.changes[-49:], self.leader]
        log.info("observed new leader %s with token %s", self.leader.node_id, self.leader.token)
        self._announce_change()

    def _announce_change(self) -> None:
        # Wake every waiter of the shared future; the next leader_changed() makes a new one.
        change, self._change = self._change, None
        if change is not None and not change.done():
            change.set_result(None)


def candidate_info(kv: KeyValue, *, since: str) -> LeaderInfo:
    """A candidate key as LeaderInfo (the token is its create revision), whatever its value.

    The value is what a replica wrote (``{"node_id": …, "url": …}``), but anything with write
    access to the prefix can put anything there: a field that is not a string, or a value
    that is not a JSON object, reads as unknown ("?" and no URL) rather than stopping the
    observer — a value nested past the decoder's recursion limit used to raise out of both of
    its loops and leave the replica naming no leader until restarted.
    """
    value = _record(kv.value)
    node_id = value.get("node_id")
    url = value.get("url")
    return LeaderInfo(
        node_id=node_id if isinstance(node_id, str) else "?",
        url=url if isinstance(url, str) else "",
        token=kv.create_revision,
        since=since,
        key=kv.key,
    )


def _record(raw: bytes) -> dict[str, object]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}
