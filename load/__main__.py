"""``python -m load SCENARIO``: load and fault scenarios with an exactly-once verdict.

Against the local stack (default: started here, on loopback, torn down after) or against a
running deployment (``--target``; faults then need ``--fault-command``). Every run is bounded
by --rate x --duration payments and a deadline; the JSON report goes to --report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from app.stack.local import LocalStack
from app.stack.netns import netns_unavailable
from app.stack.target import Target
from load.demo import Progress, render_verdict
from load.partitions import PARTITION_SCENARIOS, run_partition_cli
from load.scenario import ALL_FAULTS, ScenarioResult, observed_leader, run_scenario
from load.scenarios import SCENARIOS


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m load", description=__doc__)
    parser.add_argument("scenario", choices=sorted(SCENARIOS | PARTITION_SCENARIOS))
    parser.add_argument("--rate", type=float, default=300.0, help="payments per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--kills", type=int, default=3, help="faults for repeating scenarios")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1, help="seed of the chaos mix")
    parser.add_argument("--report", type=Path, help="write the JSON report here")
    parser.add_argument("--settle-timeout", type=float, default=60.0)
    parser.add_argument(
        "--keep-dir", type=Path, help="keep the local stack's logs and data here (to read after)"
    )
    partitions = parser.add_argument_group("partition scenarios (root: network namespaces)")
    partitions.add_argument("--hold", type=float, default=8.0, help="seconds a cut holds")
    partitions.add_argument("--flap-for", type=float, default=15.0, help="seconds of flapping")
    partitions.add_argument("--steps", type=int, default=4, help="partitions of partition-chaos")
    remote = parser.add_argument_group("a running deployment instead of the local stack")
    remote.add_argument(
        "--target",
        action="append",
        default=[],
        help="ingress URL (load balancer or replica); repeatable",
    )
    remote.add_argument(
        "--node-url",
        action="append",
        default=[],
        help="a replica's own URL for /v1/leader; repeatable",
    )
    remote.add_argument("--database-url", default=os.environ.get("PAYDISPATCH_DATABASE_URL"))
    remote.add_argument("--provider-url", default=os.environ.get("PAYDISPATCH_PROVIDER_URL"))
    remote.add_argument(
        "--allow-remote-target",
        action="store_true",
        help="let --target name a host outside 127.0.0.0/8: only for your own deployment on "
        "its own network (the compose `load` service); never used by tests or CI",
    )
    remote.add_argument(
        "--api-key",
        default=os.environ.get("PAYDISPATCH_API_KEY"),
        help="bearer token for /v1/* (env PAYDISPATCH_API_KEY)",
    )
    remote.add_argument(
        "--fault-command",
        help="shell command that injects a fault; gets FAULT and "
        "LEADER_NODE_ID in its environment (e.g. a script that runs docker compose kill)",
    )
    return parser.parse_args(argv)


def print_report(result: ScenarioResult, args: argparse.Namespace) -> None:
    report = {"scenario": args.scenario, "status": "done", **result.report()}
    render_verdict(result, sys.stdout)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.report}")
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "scenario",
                    "exactly_once",
                    "accepted",
                    "charged",
                    "duplicates",
                    "lost",
                    "mismatched",
                    "stuck",
                    "throughput_per_s",
                )
            }
        )
    )


async def _run(target: Target, args: argparse.Namespace, faults: list[str]) -> ScenarioResult:
    return await run_scenario(
        target,
        rate=args.rate,
        duration=args.duration,
        faults=faults,
        settle_timeout=args.settle_timeout,
        on_sample=Progress(sys.stdout),
        # The report file fills in as the run goes: a killed run still leaves its figures.
        progress_path=args.report,
    )


async def run_remote(args: argparse.Namespace, faults: list[str]) -> ScenarioResult:
    if not (args.database_url and args.provider_url):
        raise SystemExit("--target needs --database-url and --provider-url for the checker")
    node_urls = args.node_url or args.target

    def inject(fault: str) -> None:
        leader = observed_leader(node_urls, args.api_key)
        env = {**os.environ, "FAULT": fault, "LEADER_NODE_ID": leader["node_id"] if leader else ""}
        subprocess.run(args.fault_command, shell=True, check=True, env=env)

    if faults and not args.fault_command:
        print(
            f"· {args.scenario}: this runner cannot reach the deployment's processes; inject "
            "the faults from outside (e.g. `make kill-leader` on the docker host) and read the "
            "failover gaps under token_changes in the report"
        )
        faults = []
    target = Target(
        ingress=args.target,
        database_url=args.database_url,
        provider_url=args.provider_url,
        node_urls=node_urls,
        inject=inject if args.fault_command else None,
        api_key=args.api_key,
        allow_remote=args.allow_remote_target,
    )
    return await _run(target, args, faults)


async def run_local(args: argparse.Namespace, faults: list[str]) -> ScenarioResult:
    scenario = SCENARIOS[args.scenario]
    stack = LocalStack(
        replicas=args.replicas,
        provider_settings=dict(scenario.provider),
        replica_env=dict(scenario.replica_env),
        say=lambda s: print(f"· {s}"),
        base_dir=_kept(args.keep_dir),
    )
    await asyncio.to_thread(stack.start)
    try:
        return await _run(stack.target(), args, faults)
    finally:
        await asyncio.to_thread(stack.stop)


def _kept(keep_dir: Path | None) -> Path | None:
    if keep_dir is not None:
        keep_dir.mkdir(parents=True, exist_ok=True)
    return keep_dir


def run_partitions(args: argparse.Namespace) -> int:
    """A partition scenario (load/partitions.py): its own stack, report and exit code."""
    reason = netns_unavailable()
    if reason is not None:
        raise SystemExit(
            f"{args.scenario} needs Linux network namespaces, which cannot be made here: "
            f"{reason}. Run it as root on Linux with iproute2 installed."
        )
    result, report = asyncio.run(
        run_partition_cli(
            args.scenario,
            rate=args.rate,
            replicas=args.replicas,
            hold=args.hold,
            flap_for=args.flap_for,
            chaos_steps=args.steps,
            seed=args.seed,
            settle_timeout=args.settle_timeout,
            say=lambda s: print(f"· {s}", flush=True),
            keep_dir=args.keep_dir,
        )
    )
    render_verdict(result, sys.stdout)
    text = json.dumps(report, indent=2)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")
        print(f"report: {args.report}")
    print(text)
    return 0 if result.verdict.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.scenario in PARTITION_SCENARIOS:
        if args.target:
            raise SystemExit("partition scenarios run on their own partitioned local stack")
        return run_partitions(args)
    faults = SCENARIOS[args.scenario].plan(args.kills, args.seed)
    assert all(f in ALL_FAULTS for f in faults)
    runner = run_remote if args.target else run_local
    result = asyncio.run(runner(args, faults))
    print_report(result, args)
    return 0 if result.verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
