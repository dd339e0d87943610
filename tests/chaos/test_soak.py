"""The soak's short form, as CI runs it: 10,000 payments under the seeded chaos mix (leader
kill, pause and SIGTERM, an etcd member lost, Postgres and the provider restarted) through
the real local stack, ending with a complete report and an exactly-once verdict. `make soak`
runs the 100,000-payment version."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.chaos


def test_ten_thousand_payments_under_the_chaos_mix_end_exactly_once(tmp_path: Path) -> None:
    report_path = tmp_path / "soak.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "load",
            "chaos",
            "--rate",
            "250",
            "--duration",
            "40",
            "--kills",
            "4",
            "--seed",
            "7",
            "--report",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert report_path.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["status"] == "done", report
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert report["exactly_once"] is True
    assert report["accepted"] >= 10_000
    for key in ("duplicates", "lost", "mismatched", "stuck"):
        assert report[key] == 0, report
    assert report["backlog_drained"] is True
    assert len(report["failovers"]) == 4
    for failover in report["failovers"]:
        assert failover["error"] is None, failover
        assert {"token_changes", "charging_gap_s", "drain_s", "backlog_peak"} <= set(failover)
    assert report["queue_depth"]["max"] >= report["queue_depth"]["p99"] >= 0
    assert report["longest_charging_gap_s"] >= 0
