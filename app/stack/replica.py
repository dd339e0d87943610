"""``paydispatch serve`` replicas as real child processes, for tests, the demo and load runs."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.ops.client import http_json
from app.stack.child import ChildProcess


@dataclass
class ReplicaProcess(ChildProcess):
    """One ``paydispatch serve`` process with its own port and log file."""

    node_id: str
    env: dict[str, str]
    log_dir: Path

    @property
    def name(self) -> str:
        """The replica's node id, for messages."""
        return f"replica {self.node_id}"

    @property
    def api_key(self) -> str | None:
        """The first key this replica accepts (from its environment), for our own probes."""
        keys = self.env.get("PAYDISPATCH_ADMIN_API_KEYS") or self.env.get("PAYDISPATCH_API_KEYS")
        return keys.split(",")[0].strip() if keys else None

    @property
    def log_path(self) -> Path:
        """Where the replica's stdout and stderr go."""
        return self.log_dir / f"{self.node_id}.log"

    def start(self) -> None:
        """Spawn the replica (exec, never fork, after gRPC channels exist)."""
        if self.pid is not None:
            return
        env = {
            **os.environ,
            **self.env,
            "PAYDISPATCH_NODE_ID": self.node_id,
            "PAYDISPATCH_HOST": self.host,
            "PAYDISPATCH_PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
        }
        self._spawn([sys.executable, "-m", "app.cli", "serve"], env)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll /readyz until 200, failing fast if the process dies."""
        self._wait_until(
            lambda: http_json(f"{self.url}/readyz", timeout=0.5)[0] == 200, timeout, "ready"
        )

    def node(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """GET /v1/node, or None when the replica does not answer."""
        status, body = http_json(f"{self.url}/v1/node", timeout=timeout, api_key=self.api_key)
        return body if status == 200 else None

    def pause(self) -> None:
        """SIGSTOP: the process freezes, sockets stay open."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self.signal(signal.SIGCONT)

    def restart(self) -> None:
        """Start again on the same port after a kill or stop."""
        self.terminate()
        self.start()
