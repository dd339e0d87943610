"""``paydispatch serve`` replicas as real child processes, for tests, the demo and load runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.stack import StackError
from app.stack.ports import free_port


def http_json(
    url: str, timeout: float = 1.0, *, method: str = "GET", api_key: str | None = None
) -> tuple[int, Any]:
    """``method`` ``url`` → (status, decoded JSON or None); (0, None) when nothing answers."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            return exc.code, json.loads(exc.read() or b"null")
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


@dataclass
class ReplicaProcess:
    """One ``paydispatch serve`` process with its own port and log file."""

    node_id: str
    env: dict[str, str]
    log_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of this replica's API."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str | None:
        """The first key this replica accepts (from its environment), for our own probes."""
        keys = self.env.get("PAYDISPATCH_ADMIN_API_KEYS") or self.env.get("PAYDISPATCH_API_KEYS")
        return keys.split(",")[0].strip() if keys else None

    @property
    def log_path(self) -> Path:
        """Where the replica's stdout and stderr go."""
        return self.log_dir / f"{self.node_id}.log"

    @property
    def pid(self) -> int | None:
        """PID while the process exists (also while paused)."""
        return self.process.pid if self.process and self.process.poll() is None else None

    def start(self) -> None:
        """Spawn the replica (exec, never fork, after gRPC channels exist)."""
        if self.pid is not None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **self.env,
            "PAYDISPATCH_NODE_ID": self.node_id,
            "PAYDISPATCH_HOST": "127.0.0.1",
            "PAYDISPATCH_PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll /readyz until 200, failing fast if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StackError(
                    f"replica {self.node_id} exited with "
                    f"{self.process.returncode}; log:\n{self.log_tail()}"
                )
            status, _ = http_json(f"{self.url}/readyz", timeout=0.5)
            if status == 200:
                return
            time.sleep(0.05)
        raise StackError(f"replica {self.node_id} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of this replica's log."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def node(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """GET /v1/node, or None when the replica does not answer."""
        status, body = http_json(f"{self.url}/v1/node", timeout=timeout, api_key=self.api_key)
        return body if status == 200 else None

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the replica process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process freezes, sockets stay open."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self.signal(signal.SIGCONT)

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait: a graceful stop (resigns leadership). Returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def restart(self) -> None:
        """Start again on the same port after a kill or stop."""
        self.terminate()
        self.start()
