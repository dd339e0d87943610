"""The stand-in provider's CPU per charge, A/B: providers started by different commands
(this checkout's, another checkout's venv) take turns under the same load in one run.

    python -m load.bench_provider [--charges 20000] [--concurrency 64] [--reps 3]
        [--provider NAME=COMMAND ...]

Without --provider it measures this checkout's provider alone (``python -m app.sandbox``).
Each turn starts a fresh provider (empty ledger, no faults), warms it up, then posts
--charges new charges with the body and headers the dispatcher sends, --concurrency at a
time over keep-alive connections, and reads the provider's CPU (user + system, all its
threads) from /proc before and after. Runs A B A B ... so machine noise hits both alike;
prints one JSON line per turn and the medians last. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from app.domain.payment import ChargeRequest

TCK = os.sysconf("SC_CLK_TCK")
WARMUP = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK


async def _charge(http: aiohttp.ClientSession, url: str, i: int, tag: str) -> None:
    request = ChargeRequest(f"bench-{tag}-{i}", 100 + i % 900, "EUR", None, i)
    async with http.post(
        url,
        data=request.body(),
        headers={"Idempotency-Key": request.provider_key, "Content-Type": "application/json"},
    ) as resp:
        await resp.read()
        if resp.status not in (201, 402):
            raise RuntimeError(f"provider answered {resp.status}")


async def _load(url: str, first: int, count: int, concurrency: int, tag: str) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        numbers = iter(range(first, first + count))

        async def worker() -> None:
            for i in numbers:
                await _charge(http, url, i, tag)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.monotonic() - started


def one_turn(name: str, command: list[str], charges: int, concurrency: int) -> dict[str, object]:
    """Start a provider with ``command``, load it, stop it: its CPU per charge."""
    with tempfile.TemporaryDirectory(prefix="bench-provider-") as tmp:
        port = _free_port()
        env = dict(
            os.environ,
            PAYDISPATCH_PROVIDER_HOST="127.0.0.1",
            PAYDISPATCH_PROVIDER_PORT=str(port),
            PAYDISPATCH_PROVIDER_LEDGER_PATH=str(Path(tmp) / "ledger.sqlite3"),
        )
        # Run in the temporary folder: with ``-m`` the current folder comes first on
        # sys.path, and a command from another venv must import that venv's app.
        process = subprocess.Popen(
            command, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            url = f"http://127.0.0.1:{port}/v1/charges"
            asyncio.run(_wait_ready(f"http://127.0.0.1:{port}/healthz"))
            asyncio.run(_load(url, 0, WARMUP, concurrency, name))
            before = _cpu_seconds(process.pid)
            seconds = asyncio.run(_load(url, WARMUP, charges, concurrency, name))
            cpu = _cpu_seconds(process.pid) - before
        finally:
            process.terminate()
            process.wait(10)
    return {
        "provider": name,
        "cpu_ms_per_charge": round(1000 * cpu / charges, 4),
        "charges_per_s": round(charges / seconds, 1),
    }


async def _wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the provider did not start ({url})")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the turns, print the medians."""
    parser = argparse.ArgumentParser(
        prog="python -m load.bench_provider",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--charges", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--provider",
        action="append",
        metavar="NAME=COMMAND",
        help="a provider to measure (repeat for an A/B); default: this checkout's",
    )
    args = parser.parse_args(argv)
    providers = [p.split("=", 1) for p in args.provider or []] or [
        ["this", f"{sys.executable} -m app.sandbox"]
    ]
    turns: dict[str, list[dict[str, object]]] = {name: [] for name, _ in providers}
    for _ in range(args.reps):
        for name, command in providers:
            turn = one_turn(name, shlex.split(command), args.charges, args.concurrency)
            turns[name].append(turn)
            print(json.dumps(turn), flush=True)
    medians = {
        name: statistics.median(float(str(t["cpu_ms_per_charge"])) for t in rows)
        for name, rows in turns.items()
    }
    print(json.dumps({"bench": "provider", "median_cpu_ms_per_charge": medians}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
