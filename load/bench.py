"""Benchmarks, side by side and repeated: ``python -m load.bench {steady,side-by-side}``.

``steady``: the local stack (3 replicas behind haproxy, 3 etcd members) at a steady --rate
for --duration, repeated --reps times. Per run: seconds in which nothing was charged while
the queue was not empty, queue depth p99 (sampled every 0.5 s), ingest p50/p99, peak RSS of
each replica, throughput, and the exactly-once verdict; then the medians.

``side-by-side``: runs the shared side-by-side scripts (``bench/run.sh`` of the team's
shared folder: the leader's drain against pgqueuer's worker on the same provider, and a
follower's ingest against a bare aiohttp + asyncpg handler) with --reps repetitions, in one
run so that machine noise hits both sides alike; it prints their JSON lines.

Benchmarks, not tests: nothing here asserts a target; the README records the medians.
On a shared 2-core VM, compare ratios measured in one run, never absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from app.stack.local import LocalStack
from load.scenario import run_scenario

ROOT = Path(__file__).resolve().parents[1]


def _rss_peak_mb(pid: int | None) -> int | None:
    """Peak resident set (VmHWM) of ``pid`` in MiB, None when it cannot be read."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return None


async def steady_once(rate: float, duration: float) -> dict[str, Any]:
    """One steady run on a fresh local stack; the numbers the issue's targets name."""
    stack = LocalStack(replicas=3, say=lambda _: None)
    await asyncio.to_thread(stack.start)
    try:
        await asyncio.to_thread(stack.wait_leader)
        result = await run_scenario(stack.target(), rate=rate, duration=duration)
        rss = {node.node_id: _rss_peak_mb(node.pid) for node in stack.nodes}
    finally:
        await asyncio.to_thread(stack.stop)
    report = result.report()
    charged = dict(result.charged_per_second)
    # A second with no charge counts only while the queue held work (per the samples).
    busy = {int(s.t) for s in result.samples if s.queue_depth > 0 and s.t <= duration}
    first = min(charged) if charged else 0
    idle_seconds = [
        s for s in range(first, first + int(duration)) if charged.get(s, 0) == 0 and s in busy
    ]
    depths = sorted(s.queue_depth for s in result.samples if s.t <= duration) or [0]
    return {
        "exactly_once": report["exactly_once"],
        "accepted": report["accepted"],
        "zero_charge_seconds_with_work": len(idle_seconds),
        "queue_depth_p99": depths[int(0.99 * (len(depths) - 1))],
        "queue_depth_max": depths[-1],
        "ingest_p50_ms": report["ingest_latency_ms"]["p50"],
        "ingest_p99_ms": report["ingest_latency_ms"]["p99"],
        "throughput_per_s": report["throughput_per_s"],
        "replica_rss_peak_mb": max((v for v in rss.values() if v is not None), default=None),
        "charged_per_second": [charged.get(s, 0) for s in range(first, first + int(duration))],
    }


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def steady(args: argparse.Namespace) -> int:
    """``steady``: --reps runs, each printed, then the medians and one verdict."""
    runs = []
    for rep in range(args.reps):
        run = asyncio.run(steady_once(args.rate, args.duration))
        runs.append(run)
        print(json.dumps({"rep": rep + 1, **run}), flush=True)
    keys = (
        "zero_charge_seconds_with_work",
        "queue_depth_p99",
        "ingest_p50_ms",
        "ingest_p99_ms",
        "throughput_per_s",
        "replica_rss_peak_mb",
    )
    summary = {
        "bench": "steady",
        "rate": args.rate,
        "duration": args.duration,
        "reps": args.reps,
        "median": {key: _median(runs, key) for key in keys},
        "exactly_once": all(run["exactly_once"] for run in runs),
    }
    print(json.dumps(summary))
    return 0 if summary["exactly_once"] else 1


def side_by_side(args: argparse.Namespace) -> int:
    """``side-by-side``: the shared scripts, against this checkout and its venv."""
    script = Path(args.bench_dir) / "run.sh"
    if not script.exists():
        print(f"no {script}: pass --bench-dir (the shared bench folder)", file=sys.stderr)
        return 2
    env = {**os.environ, "PROJECT_VENV": os.environ.get("PROJECT_VENV", sys.prefix)}
    command = [str(script), str(ROOT), "--reps", str(args.reps), "--n", str(args.payments)]
    return subprocess.run(command, env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one benchmark."""
    parser = argparse.ArgumentParser(
        prog="python -m load.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench", required=True)
    one = sub.add_parser("steady", help="3 replicas behind haproxy at a steady rate")
    one.add_argument("--rate", type=float, default=300.0)
    one.add_argument("--duration", type=float, default=30.0)
    one.add_argument("--reps", type=int, default=3)
    two = sub.add_parser("side-by-side", help="drain vs pgqueuer, ingest vs a bare handler")
    two.add_argument(
        "--bench-dir",
        default=os.environ.get("PAYDISPATCH_BENCH_DIR", str(ROOT.parent / "shared" / "bench")),
    )
    two.add_argument("--reps", type=int, default=3)
    two.add_argument("--payments", type=int, default=20000)
    args = parser.parse_args(argv)
    return steady(args) if args.bench == "steady" else side_by_side(args)


if __name__ == "__main__":
    sys.exit(main())
