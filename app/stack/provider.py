"""The stand-in provider as a supervised child process (sync twin of app.sandbox.process)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.sandbox.process import sandbox_env
from app.stack import StackError
from app.stack.ports import free_port
from app.stack.replica import http_json


@dataclass
class ProviderProcess:
    """``python -m app.sandbox`` on a fixed port and ledger, so restarts keep both."""

    base_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the provider API."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ledger_path(self) -> Path:
        """The SQLite ledger (survives restarts)."""
        return self.base_dir / "provider-ledger.sqlite3"

    @property
    def pid(self) -> int | None:
        """PID while running."""
        return self.process.pid if self.process and self.process.poll() is None else None

    def start(self, timeout: float = 15.0) -> None:
        """Start and wait for /healthz."""
        if self.pid is not None:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        env = sandbox_env(
            {
                **self.settings,
                "ledger_path": self.ledger_path,
                "host": "127.0.0.1",
                "port": self.port,
            }
        )
        with (self.base_dir / "provider.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.sandbox"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StackError(
                    f"provider exited with {self.process.returncode}; see "
                    f"{self.base_dir / 'provider.log'}"
                )
            if http_json(f"{self.url}/healthz", timeout=0.5)[0] == 200:
                return
            time.sleep(0.05)
        raise StackError(f"provider not ready after {timeout}s")

    def kill(self) -> None:
        """SIGKILL (the ledger is crash-safe)."""
        if self.pid is not None and self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.pid is None or self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> None:
        """Crash and start again on the same port and ledger."""
        self.kill()
        self.start()
