"""Run the stand-in provider as a real child process (tests, demo, load scenarios).

A separate process, not a task in the caller's loop, so tests can SIGKILL it mid-flight and
restart it on the same ledger, and so it competes for the CPU like a real remote service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import aiohttp

from app.sandbox.settings import ENV_PREFIX
from app.stack.ports import free_port

_REPO_ROOT = Path(__file__).resolve().parents[2]
_ADDRESS_IN_USE = "address already in use"


class SandboxProcess(NamedTuple):
    """A started provider: unpacks as ``(process, base_url)``."""

    process: asyncio.subprocess.Process
    base_url: str


def sandbox_env(settings: Mapping[str, object]) -> dict[str, str]:
    """The child's environment: ours without any PAYDISPATCH_PROVIDER_* (a developer's
    shell must not change a test), plus ``settings`` by field name (``error_rate=1``) or by
    full variable name. Tuples and lists become comma-separated, None is left out."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    for name, value in settings.items():
        if value is None:
            continue
        var = name.upper() if name.upper().startswith(ENV_PREFIX) else ENV_PREFIX + name.upper()
        if isinstance(value, bool):
            env[var] = "true" if value else "false"
        elif isinstance(value, tuple | list):
            env[var] = ",".join(str(item) for item in value)
        else:
            env[var] = str(value)
    # The child imports this very package even from a checkout that is not installed.
    env["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if part
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _log_tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


async def _wait_ready(process: asyncio.subprocess.Process, base_url: str, deadline: float) -> bool:
    """True once /healthz answers 200, False if the process exited first."""
    timeout = aiohttp.ClientTimeout(total=0.5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                return False
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{base_url}/healthz") as response:
                    if response.status == 200:
                        return True
            # Poll interval; the wait is bounded by the deadline above.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 0.05)
    raise TimeoutError(f"provider at {base_url} not ready in time")


async def start_sandbox_process(
    tmp_path: Path,
    *,
    port: int | None = None,
    ready_timeout: float = 15.0,
    **settings: object,
) -> SandboxProcess:
    """Start ``python -m app.sandbox`` on 127.0.0.1 and wait (at most ``ready_timeout``
    seconds) until /healthz answers. The ledger defaults to ``tmp_path /
    provider-ledger.sqlite3`` and the log goes to ``tmp_path / provider-<port>.log``.
    ``settings`` are SandboxSettings fields (``error_rate=1.0``, ``decline_amounts=(13,)``).
    Pass the same ``port`` and ledger to restart a provider where it was.

    The caller owns the process: stop it with :func:`stop_sandbox_process`.
    """
    settings = {"ledger_path": tmp_path / "provider-ledger.sqlite3", **settings}
    host = "127.0.0.1"
    attempts = 1 if port is not None else 3
    for attempt in range(1, attempts + 1):
        chosen = port if port is not None else free_port(host)
        env = sandbox_env({**settings, "host": host, "port": chosen})
        log_path = tmp_path / f"provider-{chosen}.log"
        with log_path.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "app.sandbox",
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
        base_url = f"http://{host}:{chosen}"
        try:
            ready = await _wait_ready(process, base_url, time.monotonic() + ready_timeout)
        except TimeoutError:
            await stop_sandbox_process(process)
            raise TimeoutError(
                f"provider at {base_url} not ready within {ready_timeout}s:\n{_log_tail(log_path)}"
            ) from None
        except BaseException:
            await stop_sandbox_process(process)
            raise
        if ready:
            return SandboxProcess(process, base_url)
        tail = _log_tail(log_path)
        if attempt < attempts and _ADDRESS_IN_USE in tail.lower():
            continue  # another process took the free port between our probe and the bind
        raise RuntimeError(
            f"provider exited with status {process.returncode} before it was ready:\n{tail}"
        )
    raise AssertionError("unreachable")  # pragma: no cover


async def stop_sandbox_process(
    process: asyncio.subprocess.Process, *, timeout: float = 10.0
) -> int:
    """SIGTERM, wait up to ``timeout`` seconds for a clean exit, else SIGKILL. Returns the
    exit status (negative: killed by that signal). Safe to call on an exited process."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    return await process.wait()
