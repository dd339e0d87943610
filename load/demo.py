"""``paydispatch demo``: the local failover demo. Zero configuration: it starts the whole
stack on loopback, drives payments through the load balancer, kills the leader with each
fault kind, shows live progress, and ends with the exactly-once verdict, report.json and a
timeline chart. Exit status 0 only when the verdict is exactly-once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from app.stack.local import LocalStack
from load.chart import timeline_html
from load.scenario import Failover, Sample, ScenarioResult, run_scenario


class Progress:
    """One status line per sample, plus one line per failover as it is measured."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.reported: set[int] = set()
        self.tty = out.isatty()

    def __call__(self, sample: Sample, failovers: list[Failover]) -> None:
        """Render a sample (and any failover measured since the last one)."""
        for index, failover in enumerate(failovers):
            if index in self.reported:
                continue
            if failover.seconds is not None:
                self._line(
                    f"  ⚡ {failover.fault:<16} at {failover.at:5.1f}s → charging again "
                    f"under token {failover.new_token} after {failover.seconds:.2f}s"
                )
                self.reported.add(index)
        leader = f"{sample.leader} (token {sample.token})" if sample.leader else "— none —"
        status = (
            f"t={sample.t:5.1f}s  leader {leader:<26} accepted {sample.accepted:>6}  "
            f"charged {sample.charged:>6}  queue {sample.queue_depth:>5}"
        )
        if self.tty:
            self.out.write("\r" + status)
            self.out.flush()
        else:
            self._line(status)

    def _line(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        self.out.write(text + "\n")
        self.out.flush()


def render_verdict(result: ScenarioResult, out: TextIO) -> None:
    """The closing summary printed to the terminal."""
    report = result.report()
    ok = report["exactly_once"]
    out.write("\n" + ("✅ EXACTLY ONCE" if ok else "❌ NOT EXACTLY ONCE") + "\n")
    for key in (
        "accepted",
        "charged",
        "declined",
        "duplicates",
        "lost",
        "mismatched",
        "stuck",
        "stale_writes_rejected",
        "throughput_per_s",
    ):
        out.write(f"  {key:<22} {report[key]}\n")
    latency = report["ingest_latency_ms"]
    out.write(f"  {'ingest latency ms':<22} p50 {latency['p50']}  p99 {latency['p99']}\n")
    out.write(f"  {'client errors':<22} {report['client_errors']}\n")
    steady = report["ingest_p99_steady_ms"]
    for failover in report["failovers"]:
        seconds = "n/a" if failover["seconds"] is None else f"{failover['seconds']:.3f}s"
        out.write(
            f"  failover {failover['fault']:<13} {seconds:<8} ingest p99 "
            f"{failover['ingest_p99_ms']} ms in its {failover['window_s']}s window "
            f"(steady {steady} ms), client errors {failover['client_errors']}\n"
        )


def write_outputs(output: Path, result: ScenarioResult) -> None:
    """report.json and timeline.html in ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    report = result.report()
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    summary_keys = (
        "exactly_once",
        "accepted",
        "charged",
        "duplicates",
        "lost",
        "mismatched",
        "stuck",
        "stale_writes_rejected",
        "throughput_per_s",
        "client_errors",
        "ingest_p99_steady_ms",
    )
    (output / "timeline.html").write_text(
        timeline_html(
            "paydispatch failover demo",
            result.charged_per_second,
            result.samples,
            result.failovers,
            {key: report[key] for key in summary_keys},
            per_second=result.per_second(),
        )
    )


async def run_demo(
    *,
    duration: float,
    replicas: int,
    rate: float,
    faults: Sequence[str],
    output: Path,
    out: TextIO = sys.stdout,
) -> bool:
    """Run the demo; True when the verdict is exactly-once."""

    def say(text: str) -> None:
        out.write(f"· {text}\n")
        out.flush()

    say(f"starting the local stack: 3 etcd members, PostgreSQL, provider, {replicas} replicas")
    stack = LocalStack(
        replicas=replicas,
        say=say,
        provider_settings={"latency_ms_min": 2, "latency_ms_max": 20},
    )
    started = time.monotonic()
    await asyncio.to_thread(stack.start)
    try:
        say(
            f"stack up in {time.monotonic() - started:.1f}s; {rate:.0f} payments/s for "
            f"{duration:.0f}s, faults: {', '.join(faults) or 'none'}"
        )
        result = await run_scenario(
            stack.target(), rate=rate, duration=duration, faults=faults, on_sample=Progress(out)
        )
    finally:
        say("stopping the stack")
        await asyncio.to_thread(stack.stop)
    await asyncio.to_thread(write_outputs, output, result)
    render_verdict(result, out)
    out.write(f"\nreport: {output / 'report.json'}\nchart:  {output / 'timeline.html'}\n")
    return result.verdict.ok
