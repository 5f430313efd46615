"""`python -m bench`: run the scenarios against the targets, write JSON and docs/performance.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import report, scenarios
from bench.scenarios import Options, Stage
from bench.servers import ROOT, SERVER_CPU, TARGETS, Deployment, core_busy_seconds, machine

SCENARIOS = ["broadcast", "fanout", "handshakes", "layers", "idle", "persist", "scaling"]

QUICK = {
    "members": 10,
    "rates": [200, 500],
    "duration": 2.0,
    "fanout_members": 30,
    "fanout_messages": 3,
    "handshakes": 40,
    "hs_concurrency": 4,
    "idle": 40,
    "persist_rooms": 10,
    "persist_duration": 2.0,
    "profile_duration": 5.0,
    "layer_rounds": 1,
    "scaling_pairs": 1,
}


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"at least 1, not {number}")
    return number


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Options()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--scenario",
        default="all",
        help=f"comma-separated, from {','.join(SCENARIOS)}, or all (default)",
    )
    p.add_argument("--targets", default="chat,tutorial,websockets", help="comma-separated")
    p.add_argument("--quick", action="store_true", help="a short smoke run (small sizes)")
    p.add_argument("--members", type=int, help=f"broadcast room size ({defaults.members})")
    p.add_argument("--rates", help="broadcast sweep, deliveries/s, comma-separated")
    p.add_argument("--duration", type=float, help="seconds per broadcast rate")
    p.add_argument("--fanout-members", type=int, help=f"({defaults.fanout_members})")
    p.add_argument("--fanout-messages", type=int, help=f"({defaults.fanout_messages})")
    p.add_argument("--handshakes", type=int, help=f"handshakes measured ({defaults.handshakes})")
    p.add_argument("--hs-concurrency", type=int, help=f"({defaults.hs_concurrency})")
    p.add_argument(
        "--layer-rounds",
        type=_positive,
        help=f"rounds of the layers scenario ({defaults.layer_rounds})",
    )
    p.add_argument("--idle", type=int, help=f"idle connections ({defaults.idle})")
    p.add_argument("--idle-room-size", type=int, help=f"({defaults.idle_room_size})")
    p.add_argument("--persist-rooms", type=int, help=f"rooms of 2 ({defaults.persist_rooms})")
    p.add_argument("--persist-window", type=int, help="unacked messages per socket")
    p.add_argument("--persist-duration", type=float)
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the chat server during broadcast, handshakes and persist",
    )
    p.add_argument("--profile-rate", type=int, help="deliveries/s while profiling")
    p.add_argument("--profile-duration", type=float)
    p.add_argument("--database-url", help="instead of a temp SQLite file (e.g. postgres://...)")
    p.add_argument("--redis-url", help="Redis channel layer and shared state for the chat")
    p.add_argument("--server-procs", type=int, help="chat processes (needs --redis-url if > 1)")
    p.add_argument("--server-cpus", help="taskset list for the servers (default 0)")
    p.add_argument("--client-cpu", type=int, help="core of the load client (default 1)")
    p.add_argument(
        "--scaling-redis-url",
        help="the Redis the scaling scenario's chat processes share (needed to run it)",
    )
    p.add_argument(
        "--scaling-database-url",
        help="the database server they share, e.g. postgres://... (needed to run it)",
    )
    p.add_argument(
        "--scaling-cpus",
        help="the two cores of its chat processes (default: the first two not the client's; "
        f"on fewer than {report.SCALING_CORES} cores it runs only with this, as no verdict)",
    )
    p.add_argument(
        "--scaling-pairs",
        type=_positive,
        help=f"pairs of runs, one process and two ({defaults.scaling_pairs})",
    )
    p.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    docs = p.add_mutually_exclusive_group()
    docs.add_argument("--docs", dest="docs", action="store_true", default=None)
    docs.add_argument("--no-docs", dest="docs", action="store_false")
    p.add_argument("--report-only", metavar="JSON", help="rewrite the docs from a results file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (databases, logs)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each scenario, wait up to this long for other processes to leave the cores",
    )
    args = p.parse_args(argv)
    if args.scaling_cpus:
        try:
            scenarios.scaling_cores(os.cpu_count() or 1, -1, args.scaling_cpus)
        except ValueError as error:
            p.error(f"--scaling-cpus: {error}")
    if args.docs is None:
        args.docs = not args.quick
    return args


def options_from(args: argparse.Namespace) -> Options:
    opts = Options()
    if args.quick:
        for key, value in QUICK.items():
            setattr(opts, key, value)
    for key in vars(opts):
        value = getattr(args, key, None)
        if value is None:
            continue
        if key == "rates":
            value = [int(v) for v in _csv(value)]
        setattr(opts, key, value)
    return opts


def pin_client(core: int) -> bool:
    if (os.cpu_count() or 1) < 2:
        return False
    os.sched_setaffinity(0, {core})
    return True


async def wait_quiet(limit: float, threshold: float = 0.1) -> float:
    """Wait for the cores to go nearly idle (ours idle between scenarios); return the load seen."""
    deadline = time.monotonic() + limit
    while True:
        before = core_busy_seconds()
        await asyncio.sleep(1.0)
        after = core_busy_seconds()
        load = sum(after[c] - before[c] for c in after) / len(after)
        if load < threshold or time.monotonic() >= deadline:
            return load


async def run(args: argparse.Namespace, opts: Options, workdir: Path) -> dict:
    chosen = SCENARIOS if args.scenario == "all" else _csv(args.scenario)
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    targets = [TARGETS[name] for name in _csv(args.targets)]
    if opts.server_procs > 1 and not args.redis_url:
        raise SystemExit("--server-procs > 1 needs --redis-url (processes share state there)")
    deployment = Deployment(workdir, database_url=args.database_url, redis_url=args.redis_url)
    deployment.prepare()
    results: dict = {}

    async def quiet() -> None:
        if args.wait_quiet:
            others = await wait_quiet(args.wait_quiet)
            print(f"  (other processes: {others:.0%} of the cores)", flush=True)

    for scenario in chosen:
        print(f"== {scenario}", flush=True)
        if scenario in ("layers", "scaling"):
            # The chat alone, on servers of the scenario's own, not one per target.
            if "chat" not in (t.name for t in targets):
                print(f"  skipped: {scenario} measures the chat, and chat is not a target")
                continue
            await quiet()
            if scenario == "layers":
                found = await scenarios.layers(deployment, opts)
            else:
                found = await _scaling(args, opts, workdir)
            results[scenario] = {"chat": found}
            continue
        for target in targets:
            await quiet()
            with Stage(target, deployment, opts, scenario) as stage:
                results.setdefault(scenario, {})[target.name] = await getattr(scenarios, scenario)(
                    stage
                )
    profile = {}
    if args.profile:
        for scenario in [s for s in ("broadcast", "handshakes", "persist") if s in chosen]:
            print(f"== profile: py-spy on chat, {scenario}", flush=True)
            with Stage(TARGETS["chat"], deployment, opts, f"prof{scenario[:4]}") as stage:
                profile[scenario] = await getattr(scenarios, f"profile_{scenario}")(
                    stage, workdir / f"profile-{scenario}"
                )
    return {"results": results, "profile": profile}


async def _scaling(args: argparse.Namespace, opts: Options, workdir: Path) -> dict:
    """The scaling scenario on a deployment of its own (Redis and a database server that the
    processes share), or why it did not run."""
    nproc = os.cpu_count() or 1
    if nproc < report.SCALING_CORES and not args.scaling_cpus:
        skipped = (
            f"not run: {nproc} cores, and it needs {report.SCALING_CORES} (two chat "
            "processes, the load client, Redis and the database)"
        )
    elif not (args.scaling_redis_url and args.scaling_database_url):
        skipped = (
            "not run: the processes share Redis and a database server, given by "
            "--scaling-redis-url and --scaling-database-url"
        )
    else:
        skipped = ""
    if skipped:
        print(f"  {skipped}", flush=True)
        return {"skipped": skipped}
    cores, shared = scenarios.scaling_cores(nproc, opts.client_cpu, args.scaling_cpus)
    (workdir / "scaling").mkdir()
    deployment = Deployment(
        workdir / "scaling",
        database_url=args.scaling_database_url,
        redis_url=args.scaling_redis_url,
    )
    deployment.prepare()
    figures = await scenarios.scaling(deployment, opts, cores)
    figures["shared"] = shared
    print(f"  [scaling] two processes ÷ one: {figures['ratios']} {shared}", flush=True)
    return figures


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report_only:
        data = json.loads(Path(args.report_only).read_text())
        report.write_docs(data, ROOT / "docs")
        print(f"wrote {ROOT / 'docs' / 'performance.md'}")
        return
    opts = options_from(args)
    pinned = pin_client(opts.client_cpu)
    workdir = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    started = datetime.now(UTC)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        outcome = asyncio.run(run(args, opts, workdir))
    except BaseException:
        print(f"logs kept in {workdir}", file=sys.stderr)
        raise
    data = {
        "command": command.strip(),
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round((datetime.now(UTC) - started).total_seconds(), 1),
        "machine": machine(),
        "pinned": {
            "server_cpus": opts.server_cpus,
            "client_cpu": opts.client_cpu if pinned else None,
        },
        "options": vars(opts),
        "server_cpu": SERVER_CPU,
        "database": "external" if args.database_url else "sqlite (temp file)",
        "channel_layer": "redis" if args.redis_url else "in-memory",
        **outcome,
    }
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = results_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(data, indent=1))
    print(report.summary(data))
    print(f"results: {path}")
    if args.docs:
        report.write_docs(data, ROOT / "docs")
        print(f"docs: {ROOT / 'docs' / 'performance.md'}, {ROOT / 'docs' / 'performance.png'}")
    if args.keep:
        print(f"temp dir kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
