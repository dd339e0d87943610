"""The stand-in provider as a supervised child process (sync twin of app.stack.sandbox_process)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.ops.client import http_json
from app.stack.child import ChildProcess
from app.stack.sandbox_process import sandbox_env


@dataclass
class ProviderProcess(ChildProcess):
    """``python -m app.sandbox`` on a fixed port and ledger, so restarts keep both."""

    base_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """For messages."""
        return "provider"

    @property
    def log_path(self) -> Path:
        """The provider's log."""
        return self.base_dir / "provider.log"

    @property
    def ledger_path(self) -> Path:
        """The SQLite ledger (survives restarts)."""
        return self.base_dir / "provider-ledger.sqlite3"

    def start(self, timeout: float = 15.0) -> None:
        """Start and wait for /healthz."""
        if self.pid is not None:
            return
        settings = {
            **self.settings,
            "ledger_path": self.ledger_path,
            "host": self.host,
            "port": self.port,
        }
        self._spawn([sys.executable, "-m", "app.sandbox"], sandbox_env(settings))
        self._wait_until(
            lambda: http_json(f"{self.url}/healthz", timeout=0.5)[0] == 200, timeout, "healthy"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        self.terminate(timeout)

    def restart(self) -> None:
        """Crash (the ledger is crash-safe) and start again on the same port and ledger."""
        self.kill()
        self.start()
