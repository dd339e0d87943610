"""The one module that talks to etcd: a small typed async API over aetcd (gRPC).

Everything else (the election in particular) uses :class:`EtcdClient`, so the client library
can be swapped here alone. Its contract:

* Every call is bounded by its timeout, so a caller always knows how long it may wait (the
  leader's keep-alive depends on it), and is a single attempt but for the one below (an
  expired auth token).
* Failures come out as :class:`app.errors.EtcdUnavailable` (unreachable, timed out, no raft
  leader, connection closed; :class:`EtcdAccessDenied` when etcd refuses this client's
  credentials or certificates, or the client refuses the server's) or
  :class:`LeaseNotFound` (the lease expired or was revoked); no aetcd or gRPC exception
  escapes. A write that failed with ``EtcdUnavailable`` may still
  have been applied: after a failed :meth:`EtcdClient.create_if_absent`, a key that exists
  with *your* lease is yours.
* Without TLS, several endpoints are one gRPC channel with a static address list (gRPC "pick
  first": it uses the first member that accepts connections and moves on when that connection
  breaks). With TLS (:class:`EtcdSecurity`) a channel goes to one member, dialled by the name
  it was configured with, so that each member's certificate is checked against its own name.
  After any call failed with ``EtcdUnavailable`` the channel is dropped (which also ends every
  open watch with ``EtcdUnavailable``) and the next call opens a fresh one starting at the
  next endpoint: a member that accepts connections but never answers (SIGSTOP, a partition)
  or has lost its raft leader is left behind, and a fresh channel has no reconnect back-off
  left over from a member that just came back.
* With a user name and password, every new channel authenticates first and sends the token
  with each request. etcd forgets a token that went unused for ``--auth-token-ttl`` (5 min by
  default; a restarted member may not know it either) and then refuses requests *before*
  running them. Such a refusal is the one case that is retried: once, on a fresh re-authenticated
  channel, within the same timeout. A refusal that persists is :class:`EtcdAccessDenied`.
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
import logging
import socket
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import aetcd
import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end
from aetcd.watcher import Watcher

from app.errors import ConfigurationError, EtcdUnavailable, LeadershipLost

__all__ = [
    "EtcdAccessDenied",
    "EtcdClient",
    "EtcdSecurity",
    "EtcdUnavailable",
    "KeyValue",
    "LeaseNotFound",
    "WatchCompacted",
    "WatchEvent",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

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


class EtcdAccessDenied(EtcdUnavailable):
    """etcd refused this client (wrong user name or password, a role without permission, a
    client certificate it does not trust), or this client refused etcd's certificate."""


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


@dataclass(frozen=True)
class EtcdSecurity:
    """How to reach a secured etcd: TLS and/or a user name and password.

    A ``ca_file`` turns TLS on: it holds the CA certificate(s) that signed the members'
    server certificates. ``cert_file`` and ``key_file`` (a client certificate for etcd's
    ``--client-cert-auth``) go together and need TLS. ``username`` and ``password`` go
    together. The files are read again for every new channel, so renewed certificates are
    picked up without a restart."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigurationError(
                "etcd client certificate and key go together: give both files or neither"
            )
        if self.cert_file is not None and self.ca_file is None:
            raise ConfigurationError(
                "an etcd client certificate needs TLS: give the CA file that signed etcd's "
                "server certificates too"
            )
        if (self.username is None) != (self.password is None):
            raise ConfigurationError("etcd user name and password go together: give both")

    @property
    def tls(self) -> bool:
        """True when channels are TLS (a CA file is given)."""
        return self.ca_file is not None

    @property
    def authenticates(self) -> bool:
        """True when channels authenticate with a user name and password."""
        return self.username is not None

    def load_credentials(self) -> grpc.ChannelCredentials | None:
        """gRPC TLS credentials from the files (blocking file reads: call off the event
        loop), or None without TLS. EtcdUnavailable naming the file if one cannot be read."""
        if self.ca_file is None:
            return None

        def read(path: Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError as error:
                raise EtcdUnavailable(
                    f"cannot read the etcd {what} {path}: {error.strerror or error}"
                ) from error

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file, "CA file"),
            private_key=read(self.key_file, "client key file"),
            certificate_chain=read(self.cert_file, "client certificate file"),
        )


class _WatchCancelled(Exception):
    """etcd cancelled a watch (``canceled`` with a reason, no compaction)."""


class _Watcher(Watcher):  # type: ignore[misc]  # aetcd ships no type information
    """aetcd's watcher, plus what it ignores: a watch that etcd cancels.

    etcd refuses a watch it may not serve (an expired auth token on the shared stream, a role
    without read permission) by answering ``created`` *and* ``canceled``. aetcd takes that as
    created, and the watch then waits forever for events that never come. Here the creation
    fails instead (and a watch cancelled later ends with an error)."""

    async def _handle_response(self, response: Any) -> None:
        if not response.canceled or response.compact_revision:
            # Compaction comes as canceled too; aetcd turns that into RevisionCompactedError.
            await super()._handle_response(response)
            return
        error = _WatchCancelled(response.cancel_reason or "etcd cancelled the watch")
        async with self._lock:
            if response.created and self._new_callback is not None:
                self._new_callback.error = error
                self._new_callback_ready.notify_all()
                return
            callback = self._callbacks.pop(response.watch_id, None)
        # None: the answer to our own cancel request (aetcd forgot the watch already).
        if callback is not None:
            await self._process_callback(callback, error)


class _Client(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type information
    """aetcd's client with the channel built here: ``aetcd.Client.connect()`` always opens an
    insecure channel, and replaces ``metadata`` with the auth token alone when it
    authenticates (dropping etcd's require-leader header).

    :meth:`connect` is called once by :class:`EtcdClient` before the client is used; aetcd
    calls it again before every request, which then returns at once."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None,
        username: str | None,
        password: str | None,
        metadata: tuple[tuple[str, str], ...],
        timeout: float,
        options: dict[str, int],
    ) -> None:
        super().__init__(timeout=timeout, options=options)
        self._target = target
        self._credentials = credentials
        # Not aetcd's _username/_password: its own connect() must never see them.
        self._user = username
        self._secret = password
        self._base_metadata = metadata

    async def connect(self) -> None:
        """Open the channel (TLS if configured), authenticate if configured, make the stubs."""
        if self._connected.is_set():
            return
        options = list(self._options.items())
        if self._credentials is None:
            self.channel = grpc.aio.insecure_channel(self._target, options=options)
        else:
            self.channel = grpc.aio.secure_channel(self._target, self._credentials, options)
        metadata = self._base_metadata
        if self._user is not None:
            token = await self._authenticate()
            if token:
                metadata = (*metadata, ("token", token))
        # aetcd sends ``metadata`` with every request and hands it to the watch stream here.
        self.metadata = metadata
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = _Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=metadata
        )
        self._connected.set()

    async def _authenticate(self) -> str:
        """A fresh auth token for the user; "" when etcd has authentication switched off."""
        self.auth_stub = rpc.AuthStub(self.channel)
        request = rpc.AuthenticateRequest(name=self._user, password=self._secret)
        try:
            reply = await self.auth_stub.Authenticate(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            if "authentication is not enabled" in (error.details() or ""):
                # Like etcd's Go client: go on without a token. This lets an operator set the
                # credentials first and switch etcd's auth on afterwards.
                log.warning(
                    "etcd user %r is configured but etcd has authentication switched off "
                    "(etcdctl auth enable); going on without a token",
                    self._user,
                )
                return ""
            raise
        return str(reply.token)


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


def parse_endpoint(endpoint: str) -> tuple[str | None, str, int]:
    """``host:port``, ``http://host:port`` or ``https://host:port`` (IPv6 as ``[::1]:2379``)
    → (scheme or None, host, port). ConfigurationError naming the endpoint otherwise."""
    text = endpoint.strip()
    scheme: str | None = None
    for candidate in ("http", "https"):
        if text.startswith(f"{candidate}://"):
            scheme, text = candidate, text.removeprefix(f"{candidate}://")
    text = text.rstrip("/")
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigurationError(
            f"etcd endpoint {endpoint!r} is not host:port (http:// or https:// allowed)"
        )
    return scheme, host, int(port_text)


def _dial_name(host: str, port: int) -> str:
    """``host:port`` as gRPC dials it (and checks the server's certificate against)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_lease_not_found(error: BaseException) -> bool:
    # etcd answers NOT_FOUND "etcdserver: requested lease not found"; aetcd has no class for
    # that status and raises a bare ClientError carrying the server's message.
    return "lease not found" in str(error)


# etcd's refusals of a request's auth token (rpctypes ErrInvalidAuthToken, ErrAuthOldRevision,
# ErrUserEmpty) and of a watch created on a stream whose token expired ("permission denied").
# All are decided before the request runs, so re-sending on a fresh token is safe.
_STALE_TOKEN_SIGNS = (
    "invalid auth token",
    "revision of auth store is old",
    "user name is empty",
    "permission denied",
)


def _is_token_refusal(error: BaseException) -> bool:
    text = str(error)
    return any(sign in text for sign in _STALE_TOKEN_SIGNS)


def _access_problem(error: BaseException, security: EtcdSecurity | None) -> str | None:
    """What an operator should fix when ``error`` is etcd refusing this client (or the
    client refusing etcd's certificate); None for any other failure."""
    text = str(error)
    if "authentication failed" in text:
        return (
            "etcd refused the user name or password "
            "(PAYDISPATCH_ETCD_USERNAME / PAYDISPATCH_ETCD_PASSWORD)"
        )
    if "permission denied" in text or "user name is empty" in text:
        if security is None or not security.authenticates:
            return (
                "etcd has authentication switched on: set PAYDISPATCH_ETCD_USERNAME and "
                "PAYDISPATCH_ETCD_PASSWORD"
            )
        return (
            f"etcd user {security.username!r} may not do this: its role needs readwrite on "
            "the /paydispatch/ prefix (etcdctl role grant-permission --prefix)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "etcd's server certificate is not signed by the CA in PAYDISPATCH_ETCD_CA_FILE"
    if "hostname verification" in text.lower():
        return (
            "etcd's server certificate does not name the endpoint it was reached at: list "
            "the members in PAYDISPATCH_ETCD_ENDPOINTS by a name (or IP) their certificates "
            "carry"
        )
    if "BAD_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text or "UNKNOWN_CA" in text:
        return (
            "etcd rejected this client's TLS certificate: set PAYDISPATCH_ETCD_CERT_FILE and "
            "PAYDISPATCH_ETCD_KEY_FILE to a certificate signed by a CA etcd trusts "
            "(its --trusted-ca-file)"
        )
    if "WRONG_VERSION_NUMBER" in text or ("handshake" in text.lower() and "TSI" in text):
        return (
            "TLS handshake with etcd failed: is it serving TLS on these endpoints "
            "(https:// client URLs)?"
        )
    return None


class EtcdClient:
    """Async etcd client for the election: leases, create-if-absent, guarded deletes, watches.

    ``endpoints`` are ``host:port`` strings (``http://``/``https://`` allowed); all are used
    for failover. ``timeout`` (seconds) bounds every call that is not given its own.
    ``security`` adds TLS and/or user/password authentication; ``https://`` endpoints need
    it with a CA file. Creating the client does no I/O; it connects on the first call, so it
    can be created while etcd is down."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float,
        security: EtcdSecurity | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            raise TypeError("endpoints must be a sequence of host:port strings, not one string")
        if not endpoints:
            raise ConfigurationError("at least one etcd endpoint is required")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        parsed = [parse_endpoint(e) for e in endpoints]
        tls = security is not None and security.tls
        for endpoint, (scheme, _, _) in zip(endpoints, parsed, strict=True):
            if scheme == "https" and not tls:
                raise ConfigurationError(
                    f"etcd endpoint {endpoint!r} is https:// but no CA file is configured "
                    "(PAYDISPATCH_ETCD_CA_FILE) to check etcd's certificate with"
                )
            if scheme == "http" and tls:
                raise ConfigurationError(
                    f"etcd endpoint {endpoint!r} is plain http:// while TLS is configured "
                    "(PAYDISPATCH_ETCD_CA_FILE): write it as https:// or host:port"
                )
        self._addresses = [(host, port) for _, host, port in parsed]
        self.endpoints: tuple[str, ...] = tuple(e.strip() for e in endpoints)
        self.timeout = timeout
        self.security = security
        self._client: Any = None
        # Where the next channel's address list starts; advanced each time a channel is dropped.
        self._offset = 0
        self._connect_lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        # Channels opened so far (each authenticates when a user is configured).
        self.connections = 0

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
        security = self.security
        extra = ""
        if security is not None and security.tls:
            extra += ", TLS"
        if security is not None and security.authenticates:
            extra += f", user {security.username}"
        return f"endpoints {','.join(self.endpoints)}{extra}"

    async def _target(self) -> str:
        """The gRPC target of the next channel, starting at the current offset.

        With TLS: that one member, by its configured name, so gRPC checks the member's
        certificate against it. Without: a static address list ``ipv4:A:1,B:2,C:3`` of every
        member. Names are resolved here, on every new channel, because a gRPC address list
        takes IP literals only."""
        if self.security is not None and self.security.tls:
            return _dial_name(*self._addresses[self._offset])
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
        return f"ipv{family}:{','.join(addresses)}"

    async def _current(self) -> Any:
        """The live aetcd client, created (and authenticated) on first use and after a
        failure dropped it."""
        if self._closed:
            raise EtcdUnavailable(f"etcd client is closed ({self._describe()})")
        if self._client is not None:
            return self._client
        async with self._connect_lock:
            if self._client is None:
                target = await self._target()
                security = self.security or EtcdSecurity()
                # Certificate files are read off the loop: no blocking call on it, ever.
                credentials = await asyncio.to_thread(security.load_credentials)
                client = _Client(
                    target,
                    credentials=credentials,
                    username=security.username,
                    password=security.password,
                    metadata=_REQUIRE_LEADER,
                    timeout=self.timeout,
                    options=_CHANNEL_OPTIONS,
                )
                self.connections += 1
                try:
                    # Authenticates when a user is configured, so a wrong password shows here.
                    await client.connect()
                except BaseException:
                    # This member failed us: the next channel starts at the next one.
                    self._offset = (self._offset + 1) % len(self._addresses)
                    self._close_in_background(client)
                    raise
                self._client = client
            return self._client

    def _drop(self, client: Any) -> None:
        """Forget ``client`` after a failure (if still current) and close it in the
        background; the next call opens a channel starting at the next endpoint."""
        if client is None or client is not self._client:
            return
        self._client = None
        self._offset = (self._offset + 1) % len(self._addresses)
        self._close_in_background(client)

    def _close_in_background(self, client: Any) -> None:
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
        elif isinstance(error, grpc.aio.AioRpcError):
            # Raised by our own connect() (aetcd wraps the others); its str() is a 4-line repr.
            detail = f"failed: {error.code().name}: {error.details()}"
        else:
            detail = f"failed: {type(error).__name__}: {error}"
        problem = _access_problem(error, self.security)
        if problem is not None:
            return EtcdAccessDenied(f"{problem}; etcd {what} {detail} ({self._describe()})")
        return EtcdUnavailable(f"etcd {what} {detail} ({self._describe()})")

    async def _call(self, what: str, timeout: float | None, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``op(aetcd_client)`` once within the timeout, translating every failure.

        The one retry: with a user configured, a request that etcd refused for its auth token
        (expired after ``--auth-token-ttl`` unused, or lost in a member restart) is sent once
        more on a fresh, re-authenticated channel, within the same budget. etcd decides that
        refusal before running the request, so nothing is done twice."""
        budget = self.timeout if timeout is None else timeout
        client: Any = None
        try:
            async with asyncio.timeout(budget):
                client = await self._current()
                try:
                    return await self._attempt(client, op)
                except Exception as error:
                    if not (
                        self.security is not None
                        and self.security.authenticates
                        and _is_token_refusal(error)
                    ):
                        raise
                    log.info("etcd %s: token refused (%s); re-authenticating", what, error)
                    self._drop(client)
                    client = await self._current()
                    return await self._attempt(client, op)
        except EtcdUnavailable:
            raise
        except TimeoutError as error:
            raise self._translate(f"{what} ({budget:.2f} s)", error, client) from error
        except Exception as error:  # aetcd.ClientError, grpc errors: nothing may leak
            if _is_lease_not_found(error):
                raise LeaseNotFound(f"etcd {what}: {error} ({self._describe()})") from error
            raise self._translate(what, error, client) from error

    @staticmethod
    async def _attempt(client: Any, op: Callable[[Any], Awaitable[T]]) -> T:
        try:
            return await op(client)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling() == 0:
                # grpc.aio raises CancelledError in the awaiting task when the channel is
                # closed under a running call; our task was not cancelled, so report it as
                # the connection failure it is.
                raise _ClosedUnderCall from None
            raise

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

    async def _create_watch(self, what: str, op: Callable[[Any], Awaitable[Any]]) -> Any:
        """``self._call(what, None, op)`` for a watch's creation, in a task of its own.

        aetcd waits for etcd's answer to a watch creation with ``asyncio.wait_for``, which on
        Python 3.11 swallows a cancellation that arrives while the answer is already in
        (CPython gh-86296): the watch is created anyway and the cancelled caller goes on to
        wait for events that may never come, so a resign waiting for it hangs. Here the
        caller waits with ``asyncio.wait``, which always raises its cancellation; a watch
        the abandoned creation makes all the same is cancelled in etcd in the background."""
        creating = asyncio.ensure_future(self._call(what, None, op))
        try:
            await asyncio.wait({creating})
        except BaseException:
            creating.cancel()
            creating.add_done_callback(self._cancel_abandoned_watch)
            raise
        return creating.result()

    def _cancel_abandoned_watch(self, creating: asyncio.Future[Any]) -> None:
        if creating.cancelled() or creating.exception() is not None:
            return  # (exception() also marks the failure as seen)
        handle = creating.result()

        async def cancel() -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_WATCH_CANCEL_TIMEOUT):
                    await handle.cancel()

        task = asyncio.get_running_loop().create_task(cancel())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

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

        handle = await self._create_watch(what, op)
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
