"""haproxy in front of the replicas, when the ``haproxy`` binary is on PATH."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from app.ops.client import http_json
from app.stack import StackError
from app.stack.child import ChildProcess

# The availability settings, shared word for word with docker-compose.yml's haproxy.cfg
# (tests/integration/test_deploy_files.py holds them equal). Why each one:
# - retry-on: a request that met a refused or reset connection, an empty answer, no answer
#   within `timeout server`, or a 503 (a replica shutting down, or one without Postgres)
#   is sent again — to another replica (redispatch on every retry). Safe for POST because
#   every payment carries its Idempotency-Key: a replay of an insert that did land returns
#   the same payment. L7 retries need the whole request in haproxy's buffer first
#   (http-buffer-request; bodies are ≤ 16 KiB, within tune.bufsize).
# - balance leastconn: each request goes to the replica with the fewest requests under way.
#   A paused (SIGSTOPped) replica accepts connections and answers nothing, so its first
#   stuck request is enough to turn new ones away from it (round-robin sent it every third
#   request until the timeout below: ~130 requests waited 2 s at 200/s, now about one does).
#   Likewise a replica busy catching up (a new leader) or starting gets less.
# - timeout server 2s: ingest answers in milliseconds; this is how long a request waits on
#   a hung replica before going elsewhere. With leastconn only about one request per pause
#   waits it out (1 s measured no better here: the new leader's catch-up burst after the
#   pause, not this wait, sets the p99 of a pause window), and a healthy replica slowed by
#   a burst of CPU on a small box is not given up on too soon.
#   timeout connect 500ms: a refused connection fails at once anyway.
# - checks every 250 ms on /readyz, which fails from the first instant of a shutdown; a
#   connection error, a timeout or a 5xx on live traffic marks the server down at once
#   (observe layer7), two good checks bring it back. Otherwise two failed checks do, each
#   given 500 ms: a paused replica is out of rotation 1.1-1.35 s into its pause. With
#   three of 1 s each it never was (a pause ends after ~2 s), and when the new leader's
#   catch-up slowed the healthy replicas, leastconn sent the paused one its next requests:
#   in a soak, seven that waited for it to wake (200-260 ms, a 6.8x pause window). The
#   cost: a replica whose /readyz is slower than 500 ms twice in a row (a stall of ~1 s on
#   the whole box) is taken out until two checks pass, and while every checked replica
#   is out the backups below carry the traffic. Shorter than the replica's own readyz
#   timeout (1 s) on purpose: haproxy decides sooner than the replica would report.
# - every replica is listed twice: checked, and again as an unchecked backup. When checks
#   have (wrongly, or during a burst of faults) marked every replica down, haproxy would
#   answer 503 itself; the backups keep requests flowing to whatever still answers, and
#   the retries above skip the ones that do not.
DEFAULTS = """\
    timeout connect 500ms
    timeout server 2s
    timeout check 500ms
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout 503
    option http-buffer-request"""

BACKEND = (
    "    balance leastconn\n"
    "    option httpchk GET /readyz\n"
    "    http-check expect status 200\n"
    "    option allbackups\n"
    "    default-server inter 250ms fastinter 100ms downinter 250ms fall 2 rise 2"
    " observe layer7 error-limit 1 on-error mark-down"
)

CONFIG = """\
global
    maxconn 4096
    log stderr format raw local0 info

defaults
    mode http
    log global
    option httplog
    option dontlognull
    timeout client 30s
    timeout http-request 10s
    timeout queue 5s
{defaults}

frontend api
    bind {host}:{port}
    default_backend replicas

backend replicas
{backend}
{servers}
"""


def haproxy_binary() -> str | None:
    """Path of haproxy if installed."""
    return shutil.which("haproxy")


@dataclass
class HaproxyProcess(ChildProcess):
    """Least-outstanding-requests over the replicas, health-checked on /readyz."""

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
        backends = [
            (name, self.backend_hosts.get(name, "127.0.0.1"), port) for name, port in self.backends
        ]
        servers = "\n".join(
            [f"    server {name} {host}:{port} check" for name, host, port in backends]
            + [f"    server {name}-spare {host}:{port} backup" for name, host, port in backends]
        )
        self.config_path.write_text(
            CONFIG.format(
                host=self.host,
                port=self.port,
                servers=servers,
                defaults=DEFAULTS,
                backend=BACKEND,
            )
        )
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
