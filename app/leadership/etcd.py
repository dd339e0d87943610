"""The one module that talks to etcd: a small typed async API over aetcd (gRPC).

Everything else (the election in particular) uses :class:`EtcdClient`, so the client library
can be swapped here alone. Its contract:

* Every call is a single attempt bounded by its timeout; there are no hidden retries, so a
  caller always knows how long it may wait (the leader's keep-alive depends on it).
* Failures come out as :class:`app.errors.EtcdUnavailable` (unreachable, timed out, no raft
  leader, connection closed) or :class:`LeaseNotFound` (the lease expired or was revoked);
  no aetcd or gRPC exception escapes. A write that failed with ``EtcdUnavailable`` may still
  have been applied: after a failed :meth:`EtcdClient.create_if_absent`, a key that exists
  with *your* lease is yours.
* Several endpoints are one gRPC channel with a static address list (gRPC "pick first": it
  uses the first member that accepts connections and moves on when that connection breaks).
  After any call failed with ``EtcdUnavailable`` the channel is dropped (which also ends every
  open watch with ``EtcdUnavailable``) and the next call opens a fresh one whose list starts
  at the next endpoint: a member that accepts connections but never answers (SIGSTOP, a
  partition) or has lost its raft leader is left behind, and a fresh channel has no reconnect
  back-off left over from a member that just came back.
* Requests carry etcd's ``hasleader`` metadata: a member without a raft leader answers
  "no leader" at once instead of letting the call hang until its timeout, and cancels watch
  streams when it loses its leader, so a watcher on a cut-off member hears about it.

Do not fork this process after the first call (gRPC channels do not survive ``fork``); start
subprocesses with exec (``subprocess``, ``asyncio.create_subprocess_exec``), which is fine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

import aetcd
from aetcd.utils import prefix_range_end

from app.errors import ConfigurationError, EtcdUnavailable, LeadershipLost

__all__ = [
    "EtcdClient",
    "EtcdUnavailable",
    "KeyValue",
    "LeaseNotFound",
    "WatchCompacted",
    "WatchEvent",
]

T = TypeVar("T")

# etcd's "require leader" request metadata (clientv3.WithRequireLeader).
_REQUIRE_LEADER = (("hasleader", "true"),)

_CHANNEL_OPTIONS: dict[str, int] = {
    # A channel of our own never shares connections (or their reconnect back-off) with an
    # older channel to the same members, so "drop the channel" really means "start afresh".
    "grpc.use_local_subchannel_pool": 1,
    # Members restart within a second in tests and demos; gRPC's default back-off (1 s growing
    # to 120 s) would keep a healthy member unused for far longer than that.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    # HTTP/2 pings while a call (a watch) is open, to notice a member that stopped answering
    # without closing its connections. etcd rejects pings closer than 5 s
    # (--grpc-keepalive-min-time) with GOAWAY, hence 6 s.
    "grpc.keepalive_time_ms": 6000,
    "grpc.keepalive_timeout_ms": 2000,
    "grpc.http2.max_pings_without_data": 0,
}

# Seconds a watch's own clean-up may take (cancel request on a possibly dead stream).
_WATCH_CANCEL_TIMEOUT = 1.0
_CLOSE_TIMEOUT = 2.0


class LeaseNotFound(LeadershipLost):
    """The etcd lease is gone (expired, revoked or never granted): every key attached to it has
    been deleted, so leadership held through it is lost."""


class WatchCompacted(EtcdUnavailable):
    """etcd compacted the history the watch should start from; re-read the current state and
    watch from the revision of that read."""

    def __init__(self, message: str | None = None, *, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class KeyValue:
    """A key as stored in etcd. ``create_revision`` orders creations cluster-wide (the fencing
    token); ``lease`` is 0 for a key without a lease."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    """One change seen by a watch.

    For ``put``: the new value and the key's create/mod revision. For ``delete``:
    ``mod_revision`` is the revision of the deletion, ``value``, ``create_revision`` and
    ``lease`` are those of the deleted key (b"", 0 and 0 if etcd no longer had them)."""

    type: Literal["put", "delete"]
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


class _ClosedUnderCall(Exception):
    """gRPC cancelled a call because its channel was closed (not because our task was)."""


def _key_bytes(key: str) -> bytes:
    # surrogateescape both ways: any byte key read from etcd can be written back unchanged.
    return key.encode("utf-8", "surrogateescape")


def _key_str(key: bytes) -> str:
    return key.decode("utf-8", "surrogateescape")


def _to_kv(raw: Any) -> KeyValue:
    return KeyValue(
        key=_key_str(bytes(raw.key)),
        value=bytes(raw.value),
        create_revision=int(raw.create_revision),
        mod_revision=int(raw.mod_revision),
        lease=int(raw.lease),
    )


def _to_event(raw: Any) -> WatchEvent:
    kv = raw.kv
    if raw.kind == aetcd.EventKind.PUT:
        return WatchEvent(
            type="put",
            key=_key_str(bytes(kv.key)),
            value=bytes(kv.value),
            create_revision=int(kv.create_revision),
            mod_revision=int(kv.mod_revision),
            lease=int(kv.lease),
        )
    # aetcd wraps the protobuf prev_kv even when etcd sent none (an empty message), so
    # "no previous value" shows as create_revision 0, not as None.
    prev = raw.prev_kv
    return WatchEvent(
        type="delete",
        key=_key_str(bytes(kv.key)),
        value=bytes(prev.value) if prev is not None else b"",
        create_revision=int(prev.create_revision) if prev is not None else 0,
        mod_revision=int(kv.mod_revision),
        lease=int(prev.lease) if prev is not None else 0,
    )


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` (``http://`` allowed, IPv6 as ``[::1]:2379``) → (host, port)."""
    text = endpoint.strip()
    if text.startswith("https://"):
        raise ConfigurationError(f"etcd endpoint {endpoint!r}: TLS is not supported")
    text = text.removeprefix("http://").rstrip("/")
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigurationError(f"etcd endpoint {endpoint!r} is not host:port")
    return host, int(port_text)


def _is_lease_not_found(error: BaseException) -> bool:
    # etcd answers NOT_FOUND "etcdserver: requested lease not found"; aetcd has no class for
    # that status and raises a bare ClientError carrying the server's message.
    return "lease not found" in str(error)


class EtcdClient:
    """Async etcd client for the election: leases, create-if-absent, guarded deletes, watches.

    ``endpoints`` are ``host:port`` strings; all are used for failover. ``timeout`` (seconds)
    bounds every call that is not given its own. Creating the client does no I/O; it connects
    on the first call, so it can be created while etcd is down."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float) -> None:
        if isinstance(endpoints, str):
            raise TypeError("endpoints must be a sequence of host:port strings, not one string")
        if not endpoints:
            raise ConfigurationError("at least one etcd endpoint is required")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self._addresses = [_parse_endpoint(e) for e in endpoints]
        self.endpoints: tuple[str, ...] = tuple(e.strip() for e in endpoints)
        self.timeout = timeout
        self._client: Any = None
        # Where the next channel's address list starts; advanced each time a channel is dropped.
        self._offset = 0
        self._connect_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; open watches end with EtcdUnavailable, later calls fail."""
        self._closed = True
        self._drop(self._client)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=_CLOSE_TIMEOUT)

    def _describe(self) -> str:
        return f"endpoints {','.join(self.endpoints)}"

    async def _target(self) -> tuple[str, int]:
        """(host, port) for aetcd, which dials ``f"{host}:{port}"``: a gRPC static address list
        ``ipv4:A:1,B:2,C`` + ``3``, starting at the current offset. Names are resolved here,
        on every new channel, because a gRPC address list takes IP literals only."""
        loop = asyncio.get_running_loop()
        ordered = self._addresses[self._offset :] + self._addresses[: self._offset]
        by_family: dict[int, list[str]] = {4: [], 6: []}
        for host, port in ordered:
            try:
                ips = [ipaddress.ip_address(host)]
            except ValueError:
                try:
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                except OSError:
                    continue  # this name does not resolve now; the others may
                ips = [ipaddress.ip_address(info[4][0]) for info in infos]
            for ip in dict.fromkeys(ips):
                address = f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"
                if address not in by_family[ip.version]:
                    by_family[ip.version].append(address)
        # One gRPC target takes one address family; IPv4 wins when both are present.
        family = 4 if by_family[4] else 6
        addresses = by_family[family]
        if not addresses:
            raise EtcdUnavailable(f"no etcd endpoint resolves ({self._describe()})")
        target = f"ipv{family}:{','.join(addresses)}"
        host_part, _, port_part = target.rpartition(":")
        return host_part, int(port_part)

    async def _current(self) -> Any:
        """The live aetcd client, created on first use and after a failure dropped it."""
        if self._closed:
            raise EtcdUnavailable(f"etcd client is closed ({self._describe()})")
        if self._client is not None:
            return self._client
        async with self._connect_lock:
            if self._client is None:
                host, port = await self._target()
                client = aetcd.Client(
                    host=host, port=port, timeout=self.timeout, options=_CHANNEL_OPTIONS
                )
                # aetcd sends ``client.metadata`` with every request and hands it to its watch
                # stream when it connects, so setting it before the first call covers both.
                client.metadata = _REQUIRE_LEADER
                self._client = client
            return self._client

    def _drop(self, client: Any) -> None:
        """Forget ``client`` after a failure (if still current) and close it in the
        background; the next call opens a channel starting at the next endpoint."""
        if client is None or client is not self._client:
            return
        self._client = None
        self._offset = (self._offset + 1) % len(self._addresses)
        task = asyncio.get_running_loop().create_task(self._close_quietly(client))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_quietly(client: Any) -> None:
        # Closing ends the shared watch stream (watches then raise EtcdUnavailable) and
        # cancels calls still running on the old channel; nothing here is worth reporting.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await client.close()

    def _translate(self, what: str, error: BaseException, client: Any) -> EtcdUnavailable:
        """Map an aetcd/gRPC failure to our errors; drop the channel when the member may be at
        fault. Returns the error to raise (LeaseNotFound is raised by the caller's check)."""
        if isinstance(error, aetcd.RevisionCompactedError):
            return WatchCompacted(
                f"etcd {what}: revision compacted below {error.compacted_revision} "
                f"({self._describe()})",
                compact_revision=int(error.compacted_revision),
            )
        self._drop(client)
        if isinstance(error, TimeoutError):
            detail = "timed out"
        elif isinstance(error, _ClosedUnderCall):
            detail = "connection closed during the call"
        else:
            detail = f"failed: {type(error).__name__}: {error}"
        return EtcdUnavailable(f"etcd {what} {detail} ({self._describe()})")

    async def _call(self, what: str, timeout: float | None, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``op(aetcd_client)`` once within the timeout, translating every failure."""
        budget = self.timeout if timeout is None else timeout
        client: Any = None
        try:
            async with asyncio.timeout(budget):
                client = await self._current()
                try:
                    return await op(client)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling() == 0:
                        # grpc.aio raises CancelledError in the awaiting task when the channel
                        # is closed under a running call; our task was not cancelled, so
                        # report it as the connection failure it is.
                        raise _ClosedUnderCall from None
                    raise
        except EtcdUnavailable:
            raise
        except TimeoutError as error:
            raise self._translate(f"{what} ({budget:.2f} s)", error, client) from error
        except Exception as error:  # aetcd.ClientError, grpc errors: nothing may leak
            if _is_lease_not_found(error):
                raise LeaseNotFound(f"etcd {what}: {error} ({self._describe()})") from error
            raise self._translate(what, error, client) from error

    # --- leases ----------------------------------------------------------------------------

    async def grant_lease(self, ttl: int, *, timeout: float | None = None) -> int:
        """Grant a lease of ``ttl`` seconds (etcd may raise it to its minimum); returns its ID."""

        async def op(client: Any) -> int:
            lease = await client.lease(ttl)
            return int(lease.id)

        return await self._call(f"grant lease ttl={ttl}", timeout, op)

    async def refresh_lease(self, lease_id: int, *, timeout: float | None = None) -> int:
        """One keep-alive: returns the lease's TTL after renewal (seconds); LeaseNotFound if it
        expired or was revoked."""

        async def op(client: Any) -> int:
            reply = await client.refresh_lease(lease_id)
            if reply is None:
                raise EtcdUnavailable("keep-alive stream closed without an answer")
            return int(reply.TTL)

        ttl = await self._call(f"refresh lease {lease_id:x}", timeout, op)
        if ttl <= 0:
            # etcd answers an unknown lease's keep-alive with TTL 0, not with an error.
            raise LeaseNotFound(f"etcd lease {lease_id:x} expired or was revoked")
        return ttl

    async def revoke_lease(self, lease_id: int, *, timeout: float | None = None) -> None:
        """Revoke a lease, deleting its keys at once. An unknown lease is not an error."""
        with contextlib.suppress(LeaseNotFound):
            await self._call(
                f"revoke lease {lease_id:x}", timeout, lambda c: c.revoke_lease(lease_id)
            )

    # --- keys ------------------------------------------------------------------------------

    async def create_if_absent(
        self, key: str, value: bytes, lease_id: int, *, timeout: float | None = None
    ) -> tuple[bool, KeyValue | None, int]:
        """Atomically create ``key`` with ``lease_id`` unless it exists.

        Returns ``(created, kv, revision)``: ``kv`` is the key as created, or the existing key
        when ``created`` is False; ``revision`` is the store revision of the transaction (when
        created, it equals ``kv.create_revision``). LeaseNotFound if the lease is gone."""
        raw_key = _key_bytes(key)

        async def op(client: Any) -> tuple[bool, Any]:
            tx = client.transactions
            # Reading the key in both branches returns the created or the existing key with
            # the transaction's header, all in one atomic round trip.
            succeeded, responses = await client.transaction(
                compare=[tx.create(raw_key) == 0],
                success=[tx.put(raw_key, value, lease_id), tx.get(raw_key)],
                failure=[tx.get(raw_key)],
            )
            return bool(succeeded), responses

        created, responses = await self._call(f"create {key!r}", timeout, op)
        ranges = [r for r in responses if isinstance(r, list)]
        if not ranges or not ranges[-1]:
            raise EtcdUnavailable(f"etcd create {key!r}: unexpected transaction response")
        _value, got = ranges[-1][0]
        return created, _to_kv(got), int(got.header.revision)

    async def get(self, key: str, *, timeout: float | None = None) -> tuple[KeyValue | None, int]:
        """Linearizable read of one key: ``(kv or None, store revision of the read)``."""
        raw_key = _key_bytes(key)
        # A range [key, key+"\0") is exactly this key; unlike aetcd's get() it keeps the
        # response header (the read revision) when the key does not exist.
        result = await self._call(
            f"get {key!r}", timeout, lambda c: c.get_range(raw_key, raw_key + b"\0")
        )
        kvs = [_to_kv(kv) for kv in result.kvs]
        return (kvs[0] if kvs else None), int(result.header.revision)

    async def get_prefix_sorted_by_create(
        self, prefix: str, *, timeout: float | None = None
    ) -> tuple[list[KeyValue], int]:
        """All keys under ``prefix``, oldest creation first, and the store revision of the read."""
        raw = _key_bytes(prefix)
        result = await self._call(
            f"get prefix {prefix!r}",
            timeout,
            lambda c: c.get_prefix(raw, sort_order="ascend", sort_target="create"),
        )
        return [_to_kv(kv) for kv in result.kvs], int(result.header.revision)

    async def key_exists_with_create_revision(
        self, key: str, create_revision: int, *, timeout: float | None = None
    ) -> bool:
        """True if ``key`` exists and is the very incarnation created at ``create_revision``."""
        if create_revision <= 0:
            raise ValueError(f"create_revision must be > 0, got {create_revision}")
        raw_key = _key_bytes(key)

        async def op(client: Any) -> bool:
            tx = client.transactions
            succeeded, _ = await client.transaction(
                compare=[tx.create(raw_key) == create_revision], success=[], failure=[]
            )
            return bool(succeeded)

        return await self._call(f"check {key!r}@{create_revision}", timeout, op)

    # --- watch -----------------------------------------------------------------------------

    async def watch(
        self, key_or_prefix: str, *, start_revision: int, prefix: bool = False
    ) -> AsyncGenerator[WatchEvent, None]:
        """Events on a key (or every key under a prefix) from ``start_revision`` on, inclusive.

        Runs until the consumer stops; raises EtcdUnavailable when the stream breaks (then
        watch again from the last seen ``mod_revision + 1``) and WatchCompacted when
        ``start_revision`` is no longer in etcd's history. Cancelling the consuming task, or
        closing the iterator (``contextlib.aclosing``), cancels the watch in etcd."""
        raw = _key_bytes(key_or_prefix)
        range_end = prefix_range_end(raw) if prefix else None
        what = f"watch {key_or_prefix!r}{' prefix' if prefix else ''} from {start_revision}"
        state: dict[str, Any] = {}

        async def op(client: Any) -> Any:
            state["client"] = client
            return await client.watch(
                raw, range_end=range_end, start_revision=start_revision, prev_kv=True
            )

        handle = await self._call(what, None, op)
        try:
            try:
                async for raw_event in handle:
                    yield _to_event(raw_event)
            except Exception as error:
                raise self._translate(what, error, state.get("client")) from error
            # aetcd ends the iteration quietly when its client was closed (by close() or after
            # another call's failure dropped the channel): to the caller the stream broke.
            raise EtcdUnavailable(f"etcd {what}: stream closed ({self._describe()})")
        finally:
            # Cancelling the consumer does not reach aetcd's watch: tell etcd ourselves, bounded
            # because the stream may be dead.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_WATCH_CANCEL_TIMEOUT):
                    await handle.cancel()
