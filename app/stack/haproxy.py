"""haproxy in front of the replicas, when the ``haproxy`` binary is on PATH."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from app.ops.client import http_json
from app.stack import StackError
from app.stack.child import ChildProcess

CONFIG = """\
global
    maxconn 4096

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 2
    option redispatch

frontend api
    bind {host}:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /readyz
    default-server inter 500ms fall 2 rise 1
{servers}
"""


def haproxy_binary() -> str | None:
    """Path of haproxy if installed."""
    return shutil.which("haproxy")


@dataclass
class HaproxyProcess(ChildProcess):
    """Round-robin over the replicas, health-checked on /readyz."""

    base_dir: Path
    backends: list[tuple[str, int]]  # (name, port)
    # name → address of a backend that does not serve on 127.0.0.1 (the partitioned stack)
    backend_hosts: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """For messages."""
        return "haproxy"

    @property
    def log_path(self) -> Path:
        """haproxy's own output (-db keeps it in the foreground)."""
        return self.base_dir / "haproxy.log"

    @property
    def config_path(self) -> Path:
        """Where the generated config lives."""
        return self.base_dir / "haproxy.cfg"

    def start(self, timeout: float = 10.0) -> None:
        """Write the config, check it, start in the foreground mode (-db), wait for a backend."""
        binary = haproxy_binary()
        if binary is None:
            raise StackError("haproxy is not on PATH")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        servers = "\n".join(
            f"    server {name} {self.backend_hosts.get(name, '127.0.0.1')}:{port} check"
            for name, port in self.backends
        )
        self.config_path.write_text(CONFIG.format(host=self.host, port=self.port, servers=servers))
        check = subprocess.run(
            [binary, "-c", "-q", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            raise StackError(f"haproxy rejected its config: {check.stderr.strip()}")
        self._spawn([binary, "-db", "-f", str(self.config_path)])
        self._wait_until(
            lambda: http_json(f"{self.url}/readyz", timeout=0.5)[0] == 200,
            timeout,
            "a healthy backend",
        )

    def stop(self) -> None:
        """Stop (SIGTERM: immediate; connections are client-retried)."""
        self.terminate(5)
