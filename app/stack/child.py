"""What every supervised child of the local stack shares: a loopback port, its own session
(so a Ctrl-C in the terminal reaches us, not it), a log file, readiness polling that fails
fast when the child dies, and the signals the fault scenarios send."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.stack import StackError
from app.stack.ports import free_port


@dataclass(kw_only=True)
class ChildProcess:
    """Base of ReplicaProcess, ProviderProcess and HaproxyProcess."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    # The address it serves on, and what runs it inside its network namespace (the
    # partitioned stack: app.stack.netns); loopback and nothing by default.
    host: str = "127.0.0.1"
    exec_prefix: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """How messages call this child."""
        return type(self).__name__

    @property
    def url(self) -> str:
        """Base URL of the child's HTTP endpoint."""
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """Where the child's stdout and stderr go."""
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """PID while the process exists (also while paused)."""
        return self.process.pid if self.process and self.process.poll() is None else None

    def _spawn(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.exec_prefix, *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` until true; StackError (with the log's tail) after ``timeout`` or
        as soon as the child exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StackError(
                    f"{self.name} exited with {self.process.returncode} before "
                    f"{what}; log:\n{self.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.05)
        raise StackError(
            f"{self.name}: {what} not reached after {timeout}s; log:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the child's log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the child if it runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``). Returns the exit code, None if it
        had to be killed."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
