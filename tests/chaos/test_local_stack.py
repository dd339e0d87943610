"""The local stack supervisor, the demo and every load scenario, run for real in short form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from app.stack.local import LocalStack
from load.scenarios import SCENARIOS

pytestmark = pytest.mark.chaos


def test_the_stack_comes_up_whole_and_leaves_no_process_behind() -> None:
    # Its own temp dir under /tmp (not tmp_path: see tests.conftest.postgres_dir).
    stack = LocalStack(replicas=3)
    stack.start()
    try:
        pids = stack.running_pids()
        # 3 etcd members, postgres, provider, 3 replicas, and haproxy when installed.
        assert len(pids) == 8 + (1 if stack.haproxy else 0)
        assert all(psutil.pid_exists(pid) for pid in pids)
        leader = stack.wait_leader()
        observed = stack.observed_leader()
        assert observed is not None
        assert observed["node_id"] == leader.node_id
        postgres_children = [p.pid for p in psutil.Process(stack.postgres.pid).children()]
    finally:
        stack.stop()
    gone = [
        pid
        for pid in pids + postgres_children
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert gone == [], f"left running: {gone}"


def test_a_short_demo_run_ends_exactly_once_with_report_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "demo",
            "--duration",
            "12",
            "--rate",
            "150",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "EXACTLY ONCE" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["exactly_once"] is True
    assert [f["fault"] for f in report["failovers"]] == ["kill", "stop", "term"]
    assert all(f["seconds"] is not None for f in report["failovers"]), report["failovers"]
    for key in ("duplicates", "lost", "mismatched", "stuck"):
        assert report[key] == 0
    chart = (out / "timeline.html").read_text()
    assert "<svg" in chart
    assert "kill" in chart
    assert "http://" not in chart.replace('xmlns="http://www.w3.org/2000/svg"', "")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_scenario_holds_exactly_once_in_short_form(scenario: str, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "load",
            scenario,
            "--rate",
            "120",
            "--duration",
            "6",
            "--kills",
            "1",
            "--report",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["scenario"] == scenario
    for key in ("duplicates", "lost", "mismatched", "stuck"):
        assert report[key] == 0, report
    # At least the planned 720: load goes on until the last fault has been measured.
    assert report["accepted"] == report["acknowledged"] >= 720
    assert report["charged"] + report["declined"] == report["accepted"]
    for key in ("throughput_per_s", "ingest_latency_ms", "failovers", "stale_writes_rejected"):
        assert key in report
    assert len(report["failovers"]) == len(SCENARIOS[scenario].plan(1))
