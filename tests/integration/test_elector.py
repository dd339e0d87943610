"""The elector on its own, against a real etcd and no Postgres: it publishes terms whose token
is the candidate key's create revision, one leader at a time, and ends a term on resign,
handover, lease loss, or when its subscriber fails or stalls."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from app.dispatch.leader import run_watched
from app.errors import EtcdUnavailable, LeadershipLost
from app.leadership.elector import ElectionConfig, Elector
from app.leadership.etcd import EtcdClient
from app.leadership.keepalive import LoopWatchdog
from app.leadership.observer import LeaderObserver
from app.leadership.term import Term
from app.stack.etcd import EtcdCluster, find_etcdctl_binary

WAIT = 20.0  # seconds any expected event may take on a loaded 2-core machine


@dataclass
class Subscriber:
    """Records every term it is given and takes it up; what it does then is up to the test."""

    behaviour: Callable[[Term], Awaitable[None]] | None = None
    terms: list[Term] = field(default_factory=list)
    started: list[float] = field(default_factory=list)

    async def __call__(self, term: Term) -> None:
        self.terms.append(term)
        self.started.append(time.monotonic())
        term.begin_acting()
        if self.behaviour is not None:
            await self.behaviour(term)
        else:
            await term.stopping.wait()  # lead until the term ends gracefully


def config(etcd: EtcdCluster, prefix: str, node_id: str) -> ElectionConfig:
    return ElectionConfig(
        node_id=node_id,
        url=f"http://{node_id}.invalid",
        prefix=prefix,
        endpoints=tuple(etcd.endpoints),
        lease_ttl=2,
        margin=0.5,
        etcd_timeout=1.0,
        shutdown_grace=2.0,
    )


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Wait for ``condition`` (polling a real system), failing with ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(
    etcd: EtcdCluster, prefix: str, node_id: str, subscriber: Subscriber
) -> AsyncIterator[Elector]:
    """An elector campaigning until the block ends (then resigned and awaited)."""
    watchdog = LoopWatchdog()
    async with EtcdClient(etcd.endpoints, timeout=1.0) as client:
        elector = Elector(config(etcd, prefix, node_id), client, subscriber, watchdog)
        beat = asyncio.create_task(watchdog.run())
        task = asyncio.create_task(elector.run())
        try:
            yield elector
        finally:
            await elector.resign()
            await asyncio.wait_for(task, WAIT)
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)


@pytest.fixture
def prefix() -> str:
    return f"/paydispatch/test-{uuid.uuid4().hex[:8]}/election/"


async def test_a_lone_candidate_leads_with_its_keys_create_revision_as_token(
    etcd: EtcdCluster, prefix: str
) -> None:
    subscriber = Subscriber()
    async with running(etcd, prefix, "solo", subscriber) as elector:
        await until(lambda: elector.is_leader, "the lone candidate leads")
        term = subscriber.terms[0]
        async with EtcdClient(etcd.endpoints, timeout=1.0) as client:
            kv, _ = await client.get(term.key)
        assert kv is not None
        assert term.token == kv.create_revision
        assert term.key.startswith(prefix)
        assert 0 < term.remaining() <= 2.0 - 0.5
    assert elector.stats.transitions == {"elected": 1, "resigned": 1}
    assert subscriber.terms[0].stopping.is_set(), "a resign ends the term gracefully"


async def test_one_leader_among_three_and_each_handover_raises_the_token(
    etcd: EtcdCluster, prefix: str
) -> None:
    subscribers = [Subscriber() for _ in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        electors = [
            await stack.enter_async_context(running(etcd, prefix, f"n{i}", sub))
            for i, sub in enumerate(subscribers)
        ]
        tokens: list[int] = []
        for _ in range(3):
            await until(lambda: sum(e.is_leader for e in electors) == 1, "exactly one leader")
            await asyncio.sleep(0.3)  # a second leader would show up by now
            leaders = [e for e in electors if e.is_leader]
            assert len(leaders) == 1
            assert leaders[0].term is not None
            tokens.append(leaders[0].term.token)
            assert leaders[0].handover() == tokens[-1]
            await until(
                lambda: any(e.term is not None and e.term.token > tokens[-1] for e in electors),
                "a follower leads after the handover",
            )
        assert tokens == sorted(set(tokens)), "tokens strictly increase from term to term"
    published = sorted(t.token for s in subscribers for t in s.terms)
    assert len(published) == len(set(published)), "no token is published twice"


@pytest.mark.parametrize(
    ("command", "reason"),
    [(["del"], "was deleted"), (["put", "--", "x"], "overwritten without this term's lease")],
    ids=["deleted", "overwritten-without-lease"],
)
async def test_an_operator_taking_the_leader_key_ends_that_term_and_the_next_candidate_leads(
    etcd: EtcdCluster, prefix: str, command: list[str], reason: str
) -> None:
    # The lease lives on, so only a watch on its own key tells the leader: before, it went on
    # acting (and said it led) beside the next candidate until the fence refused its writes.
    # A key overwritten without the lease is no candidate any more: revoking the lease would
    # no longer delete it, so the follower waiting on it must see the put as well.
    subscribers = [Subscriber(), Subscriber()]
    async with contextlib.AsyncExitStack() as stack:
        electors = [
            await stack.enter_async_context(running(etcd, prefix, f"n{i}", sub))
            for i, sub in enumerate(subscribers)
        ]
        await until(lambda: sum(e.is_leader for e in electors) == 1, "one leader")
        (old,) = [e for e in electors if e.is_leader]
        assert old.term is not None
        taken = old.term
        verb, *rest = command
        args = [verb, *rest[:1], taken.key, *rest[1:]]  # etcdctl put -- KEY VALUE
        etcdctl = await asyncio.create_subprocess_exec(
            str(find_etcdctl_binary()),
            f"--endpoints={','.join(etcd.endpoints)}",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await etcdctl.communicate()
        assert etcdctl.returncode == 0, err
        await until(
            lambda: old.term is None or old.term.token != taken.token,
            "the term whose key was taken ends",
        )
        with pytest.raises(LeadershipLost, match=reason):
            taken.ensure_valid()  # whatever still holds the term may no longer act
        await until(
            lambda: any(e.term is not None and e.term.token > taken.token for e in electors),
            "a candidate leads with a newer token",
        )
        await asyncio.sleep(0.3)  # a second leader would show up by now
        assert sum(e.is_leader for e in electors) == 1
        assert old.stats.transitions.get("lost", 0) >= 1, old.stats.transitions


async def test_a_candidate_whose_key_is_deleted_while_it_waits_never_leads_with_it(
    etcd: EtcdCluster, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The read that finds no older candidate must also find ours, as created: a token whose
    # key is gone would fence Postgres for a leader etcd no longer names.
    subscribers = [Subscriber(), Subscriber()]
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(running(etcd, prefix, "first", subscribers[0]))
        await until(lambda: first.is_leader, "the first candidate leads")
        second = await stack.enter_async_context(running(etcd, prefix, "second", subscribers[1]))
        assert first.term is not None
        leader_key = first.term.key
        async with EtcdClient(etcd.endpoints, timeout=1.0) as client:

            async def waiting_keys() -> list[str]:
                kvs, _ = await client.get_prefix_sorted_by_create(prefix)
                return [kv.key for kv in kvs if kv.key != leader_key]

            deadline = time.monotonic() + WAIT
            while not (waiting := await waiting_keys()):
                assert time.monotonic() < deadline, "the second candidate never campaigned"
                await asyncio.sleep(0.02)
            (doomed,) = waiting
            doomed_kv, _ = await client.get(doomed)
            assert doomed_kv is not None
            doomed_token = doomed_kv.create_revision
        etcdctl = await asyncio.create_subprocess_exec(
            str(find_etcdctl_binary()),
            f"--endpoints={','.join(etcd.endpoints)}",
            "del",
            doomed,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await etcdctl.communicate()
        assert etcdctl.returncode == 0, err
        assert out.strip() == b"1", out

        caplog.set_level(logging.WARNING, logger="app.leadership.elector")
        # Out of the running (a handover would campaign again, and might lead again first):
        # the second candidate reads the prefix, finds its key gone, and campaigns anew.
        await first.resign()
        await until(
            lambda: second.term is not None and second.term.token > doomed_token,
            "the second candidate leads, on a key it created again",
        )
        assert doomed_token not in [t.token for t in subscribers[1].terms]
        assert f"candidate key {doomed} vanished before the term began" in caplog.text


async def test_a_failing_subscriber_ends_the_term_and_the_next_term_has_a_higher_token(
    etcd: EtcdCluster, prefix: str
) -> None:
    async def fail_first(term: Term) -> None:
        if len(subscriber.terms) == 1:
            raise RuntimeError("the work broke")
        await term.stopping.wait()

    subscriber = Subscriber(fail_first)
    async with running(etcd, prefix, "flaky", subscriber) as elector:
        await until(lambda: len(subscriber.terms) == 2, "a second term after the failure")
        assert subscriber.terms[1].token > subscriber.terms[0].token
        assert elector.stats.transitions.get("unexpected_error") == 1


async def test_a_revoked_lease_ends_the_term_and_cancels_the_work(
    etcd: EtcdCluster, prefix: str
) -> None:
    cancelled = asyncio.Event()

    async def hold(term: Term) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    subscriber = Subscriber(hold)
    async with running(etcd, prefix, "revoked", subscriber) as elector:
        await until(lambda: elector.is_leader, "leads")
        first = subscriber.terms[0]
        async with EtcdClient(etcd.endpoints, timeout=1.0) as client:
            await client.revoke_lease(first.lease_id)  # an operator, or etcd, drops the lease
        await asyncio.wait_for(cancelled.wait(), WAIT)
        with pytest.raises(LeadershipLost):
            first.ensure_valid()
        await until(lambda: len(subscriber.terms) == 2, "campaigns again and leads")
        assert subscriber.terms[1].token > first.token
        assert elector.stats.transitions.get("lost", 0) >= 1


async def test_a_stalled_subscriber_is_stepped_down_after_the_stall_limit(
    etcd: EtcdCluster, prefix: str
) -> None:
    limit = 1.5

    async def wedged(term: Term) -> None:
        progress = time.monotonic()
        # Never reports progress again, like a driver call wedged in its clean-up.
        await run_watched(asyncio.Event().wait(), lambda: progress, limit)

    subscriber = Subscriber(wedged)
    async with running(etcd, prefix, "wedged", subscriber) as elector:
        await until(lambda: len(subscriber.started) >= 2, "a new term after the stall")
        gap = subscriber.started[1] - subscriber.started[0]
        assert limit <= gap < limit + 5
        assert elector.stats.transitions.get("lost", 0) >= 1


async def test_a_key_without_a_lease_under_the_prefix_neither_blocks_nor_leads(
    etcd: EtcdCluster, prefix: str
) -> None:
    # Anyone who can write to etcd can plant a key with no lease, older than every candidate.
    planted = f"{prefix}0000000000000000"
    async with EtcdClient(etcd.endpoints, timeout=1.0) as client:
        created, kv, _ = await client.create_if_absent(planted, b'{"node_id": "intruder"}', 0)
        assert created
        assert kv is not None
        assert kv.lease == 0
    subscriber = Subscriber()
    async with running(etcd, prefix, "honest", subscriber) as elector:
        await until(lambda: elector.is_leader, "the only real candidate leads")
        observer = LeaderObserver(config(etcd, prefix, "watcher"), elector.client)
        watching = asyncio.create_task(observer.run())
        try:
            await until(lambda: observer.leader is not None, "the observer names a leader")
            assert observer.leader is not None
            assert observer.leader.node_id == "honest"
            assert [c.node_id for c in observer.candidates] == ["honest"]
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
    async with EtcdClient(etcd.endpoints, timeout=1.0) as client:
        kv, _ = await client.get(planted)
        assert kv is not None, "the elector never deletes what it does not own"


async def announced(change: asyncio.Future[None]) -> None:
    """Wait for a leader_changed() future as its callers must: without cancelling it."""
    await asyncio.wait({change}, timeout=WAIT)
    assert change.done(), "timed out waiting for the observer to announce a change"


async def test_the_observer_announces_each_leader_change_and_nothing_else(
    etcd: EtcdCluster, prefix: str
) -> None:
    # The crash detector waits on leader_changed() instead of polling the observer: a change
    # it missed would leave it waiting on a former leader's lock.
    async with EtcdClient(etcd.endpoints, timeout=1.0) as client:
        observer = LeaderObserver(config(etcd, prefix, "watcher"), client)
        watching = asyncio.create_task(observer.run())
        leases: list[int] = []

        async def campaign(name: str) -> int:
            lease = await client.grant_lease(30)
            leases.append(lease)
            value = json.dumps({"node_id": name, "url": f"http://{name}.invalid"}).encode()
            created, kv, _ = await client.create_if_absent(f"{prefix}{lease:016x}", value, lease)
            assert created
            assert kv is not None
            return kv.create_revision

        try:
            await until(lambda: observer.view().confirmed, "a first confirming read")
            first = observer.leader_changed()
            assert observer.leader_changed() is first, "one future until the change"
            assert not first.done()
            token_a = await campaign("a")
            await announced(first)
            assert observer.leader is not None
            assert observer.leader.token == token_a

            second = observer.leader_changed()
            assert second is not first
            await campaign("b")  # a second candidate: the leader stays "a"
            # Once the observer has applied "b", its announcement would have been made.
            await until(lambda: len(observer.candidates) == 2, "the observer sees both")
            # And two confirming reads later, still none.
            await asyncio.sleep(2 * observer.confirm_interval + 0.2)
            assert not second.done()

            await client.revoke_lease(leases[0])  # "a" goes: "b" leads
            await announced(second)
            assert observer.leader is not None
            assert observer.leader.node_id == "b"

            third = observer.leader_changed()
            await client.revoke_lease(leases[1])  # nobody leads
            await announced(third)
            assert observer.leader is None
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            for lease in leases:
                await client.revoke_lease(lease)


async def test_a_candidate_value_no_decoder_takes_neither_stops_the_observer_nor_names_anyone(
    etcd: EtcdCluster, prefix: str
) -> None:
    # Found by a generated test: a value nested past the JSON decoder's recursion limit raised
    # out of both of the observer's loops, and the replica named no leader until restarted.
    subscriber = Subscriber()
    async with running(etcd, prefix, "honest", subscriber) as elector:
        await until(lambda: elector.is_leader, "the only real candidate leads")
        lease = await elector.client.grant_lease(30)
        deep = b"[" * 100_000 + b"]" * 100_000
        created, _, _ = await elector.client.create_if_absent(f"{prefix}zz-planted", deep, lease)
        assert created
        observer = LeaderObserver(config(etcd, prefix, "watcher"), elector.client)
        watching = asyncio.create_task(observer.run())
        try:
            await until(lambda: len(observer.candidates) == 2, "the observer sees both keys")
            # Two confirming reads later, the observer still runs and still names the leader.
            await asyncio.sleep(2 * observer.confirm_interval + 0.2)
            assert not watching.done(), watching.exception()
            view = observer.view()
            assert view.confirmed
            assert view.leader is not None
            assert view.leader.node_id == "honest"
            assert [(c.node_id, c.url) for c in view.candidates] == [
                ("honest", "http://honest.invalid"),
                ("?", ""),
            ]
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            await elector.client.revoke_lease(lease)


async def test_an_observer_cut_off_from_etcd_names_no_leader_until_etcd_confirms_again(
    etcd3: EtcdCluster,
) -> None:
    # A hung cluster (every member SIGSTOPped) looks to the observer like a partition: the
    # watch goes silent and reads time out. The view it served must turn into "unknown since"
    # within a lease TTL plus one confirmation round, and come back once etcd answers.
    prefix = f"/paydispatch-test/{uuid.uuid4().hex}/"
    async with EtcdClient(etcd3.endpoints, timeout=1.0) as client:
        lease = await client.grant_lease(60)
        created, _, _ = await client.create_if_absent(
            f"{prefix}{lease:016x}", b'{"node_id": "far-away", "url": "http://x.invalid"}', lease
        )
        assert created
        observer = LeaderObserver(config(etcd3, prefix, "watcher"), client)
        watching = asyncio.create_task(observer.run())
        try:
            await until(lambda: observer.confirmed_leader() is not None, "a confirmed leader")
            for member in etcd3.members:
                member.pause()
            cut = time.monotonic()
            try:
                await until(lambda: not observer.view().confirmed, "the view turns unknown")
                went_unknown = time.monotonic() - cut
                view = observer.view()
                assert view.leader is None
                assert observer.confirmed_leader() is None
                assert view.unknown_since is not None
                # stale_after (TTL 2 s) + one confirmation interval + slack for this machine.
                assert went_unknown < observer.stale_after + observer.confirm_interval + 1.5
            finally:
                for member in etcd3.members:
                    member.resume()
            await until(lambda: observer.view().confirmed, "etcd confirms the view again")
            leader = observer.confirmed_leader()
            assert leader is not None
            assert leader.node_id == "far-away"
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)


async def test_a_lease_whose_revoke_failed_is_revoked_once_etcd_answers_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A candidate cut off from etcd leaves the running; its revoke fails, so its key stays
    in the election. Left to expire, it would outlive the outage by the lease's TTL (etcd
    re-arms leases when it comes back): it is revoked again as soon as etcd answers."""
    prefix = f"/paydispatch/test-{uuid.uuid4().hex[:8]}/election/"
    with EtcdCluster(size=1, name="orphans") as cluster:
        member = cluster.members[0]
        long_lease = dataclasses.replace(config(cluster, prefix, "x"), lease_ttl=30)
        async with EtcdClient(cluster.endpoints, timeout=1.0) as client:

            async def candidates() -> list[tuple[str, int]]:
                kvs, _ = await client.get_prefix_sorted_by_create(prefix, timeout=1.0)
                return [(kv.key, kv.create_revision) for kv in kvs]

            watchdog = LoopWatchdog()
            beat = asyncio.create_task(watchdog.run())
            leader = Elector(
                dataclasses.replace(long_lease, node_id="a"), client, Subscriber(), watchdog
            )
            follower = Elector(
                dataclasses.replace(long_lease, node_id="b"), client, Subscriber(), watchdog
            )
            tasks = [asyncio.create_task(leader.run())]
            try:
                await until(lambda: leader.is_leader, "a leads")
                tasks.append(asyncio.create_task(follower.run()))
                keys: list[tuple[str, int]] = []
                for _ in range(250):  # bounded: until b's candidate key is there
                    keys = await candidates()
                    if len(keys) == 2:
                        break
                    await asyncio.sleep(0.02)
                assert len(keys) == 2, keys
                follower_key = keys[1]

                caplog.set_level(logging.WARNING, logger="app.leadership.elector")
                await asyncio.to_thread(member.kill)
                # b's watch on a's key fails at once (the socket closes): b leaves the
                # running and cannot revoke its lease (a, with 30 s of validity, leads on).
                await until(
                    lambda: any("could not revoke lease" in r.getMessage() for r in caplog.records),
                    "b leaves the running without revoking its lease",
                )
                await asyncio.to_thread(member.start)
                await asyncio.to_thread(cluster.wait_healthy)
                back = time.monotonic()

                async def gone() -> bool:
                    try:
                        return follower_key not in await candidates()
                    except EtcdUnavailable:  # a loaded box: etcd just back, slow to answer
                        return False

                while not await gone():
                    # Without the retry the key would stay for the re-armed lease: 30 s+.
                    assert time.monotonic() - back < 10, "b's old candidate key is still there"
                    await asyncio.sleep(0.1)
                assert leader.is_leader, "a's term survived the outage (its lease is long)"
            finally:
                await leader.resign()
                await follower.resign()
                await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)
