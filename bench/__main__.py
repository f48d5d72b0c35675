"""`python -m bench`: the service's benchmark, in one run on a fresh database (see docs/BENCHMARK.md).

Starts the service (`python -m app serve`) and the bare baseline app as real processes, and two fleets of the
shipped host agents inside this process, one over plain HTTP and one over mutual TLS, then prints the fan-out
ratio and the physical-limit ratio over each, the SQL cost per job, the memory growth over many removals, and what
job retention costs and keeps, and what a
dead host costs the others.
"""

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from app.service.commands import tune_garbage_collector
from app.service.db.engine import asyncpg_dsn
from bench import loop
from bench.cost import STEPS, measure_job_costs
from bench.database import fresh_database, postgres_server
from bench.dead_host import SETTINGS as DEAD_HOST_SETTINGS
from bench.dead_host import DeadHostFigures, HungAgent, dead_host_run
from bench.fleet import agent_fleet
from bench.load import LoadResult, client_session
from bench.retention import RETAINED_TABLES, long_run_table_sizes, prune_backlog_run
from bench.scenarios import FanOutRun, baseline_run, fan_out_run, removal_run, two_host_layouts
from bench.seed import FileSpec, Seeder
from bench.tls import make_pki
from devtools.local_stack import LocalProcess, free_port, service_process

# Hosts of the throughput scenario; each VM has files on two of them.
THROUGHPUT_HOSTS = 10
# The large VM of the cost figure: this many files, spread over the throughput hosts.
COST_LARGE_FILES = 1000
# What the issue asks of each figure.
GOAL_FAN_OUT_RATIO = 1.3
GOAL_LIMIT_RATIO = 0.25
GOAL_RSS_GROWTH_MB = 30.0
GOAL_PRUNE_P99_RATIO = 1.5
# The service's default JOB_RETENTION_SECONDS (7 days): the backlog is seeded twice as old.
DEFAULT_RETENTION_SECONDS = 604800.0
GOAL_DEAD_HOST_SLOWDOWN = 3.0
GOAL_DEAD_HOST_CALLS_PER_MINUTE = 20.0
GOAL_DEAD_HOST_REMOVALS_SECONDS = 10.0
GOAL_DEAD_HOST_RECOVERY_SECONDS = 6.0
# Lets the service's last allocations and freed connections settle before memory is read.
_SETTLE_SECONDS = 2.0
# The two ways the service calls agents; every fan-out and removal figure is measured over both.
PLAIN, TLS = "plain HTTP", "mutual TLS"


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--removals", type=int, default=2000, help="VMs removed in the throughput run (default 2000)")
    parser.add_argument("--warmup", type=int, default=300, help="requests sent before each measured run")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="baseline runs and removal runs, each of --removals; the ratio is of their medians (default 3)",
    )
    parser.add_argument("--fanout-hosts", type=int, default=200, help="hosts of the fan-out VM (default 200)")
    parser.add_argument("--fanout-delay", type=float, default=0.1, help="answer delay of those agents, seconds")
    parser.add_argument("--fanout-runs", type=int, default=7, help="fan-out removals, one after another (default 7)")
    parser.add_argument(
        "--memory-removals",
        type=int,
        default=5000,
        help="removals between the two memory readings (default 5000; the documented figure uses 50000)",
    )
    parser.add_argument("--prune-jobs", type=int, default=100_000, help="finished jobs past retention to prune")
    parser.add_argument(
        "--prune-rounds",
        type=int,
        default=3,
        help="backlogs of --prune-jobs pruned one after another; the p99 ratio is the median of theirs (default 3)",
    )
    parser.add_argument(
        "--prune-rate", type=float, default=100, help="DELETEs per second while measuring their latency (default 100)"
    )
    parser.add_argument(
        "--prune-quiet-seconds",
        type=float,
        default=60,
        help="seconds of DELETEs with nothing to prune (default 60: a 20 s phase met one of the machine's stalls in "
        "some rounds and not in others)",
    )
    parser.add_argument(
        "--retention-rounds", type=int, default=25, help="rounds of removals of the long run (default 25)"
    )
    parser.add_argument(
        "--retention-removals", type=int, default=2000, help="removals per round of the long run (default 2000)"
    )
    parser.add_argument(
        "--short-retention",
        type=float,
        default=5,
        help="JOB_RETENTION_SECONDS of the service of the long run (default 5)",
    )
    parser.add_argument(
        "--dead-host-removals",
        type=int,
        default=600,
        help="removals that each touch the dead host, which leave as many orphans on it (default 600)",
    )
    parser.add_argument(
        "--dead-host-window",
        type=float,
        default=30.0,
        help="seconds the dead host's backlog is retried while its calls are counted (default 30)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="record the service with py-spy during the throughput run into this file "
        "(.svg flame graph, .json speedscope, anything else collapsed stacks)",
    )
    return parser.parse_args()


def report(line: str = "") -> None:
    """Print one line of the report at once."""
    print(line, flush=True)


def machine() -> list[str]:
    """The lines that say what the figures were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), platform.processor())
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"machine: {os.cpu_count()} CPUs ({model}), {mem_kb / 1024 / 1024:.1f} GiB RAM, load average {load}",
        f"python: {platform.python_version()}",
    ]


@asynccontextmanager
async def profiling(pid: int, output: Path | None) -> AsyncIterator[None]:
    """Record the process tree of `pid` with py-spy for the duration of the block, when `output` is given."""
    if output is None:
        yield
        return
    formats = {".svg": "flamegraph", ".json": "speedscope"}
    spy = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "py-spy"),
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        "--nonblocking",
        "--rate",
        "200",
        "--format",
        formats.get(output.suffix, "raw"),
        "--output",
        str(output),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
        await spy.wait()


def describe_load(name: str, result: LoadResult) -> str:
    """One line about a batch of requests."""
    retried = f", {result.retried} answers 503 sent again" if result.retried else ""
    return (
        f"{name}: {result.count} in {result.ended - result.started:.2f} s = {result.per_second:.0f}/s "
        f"(latency p50 {result.latency_ms(0.5):.1f} ms, p99 {result.latency_ms(0.99):.1f} ms{retried})"
    )


def describe_cpu(name: str, cpu_seconds: float, count: int, seconds: float, unit: str) -> str:
    """One line about the CPU a server used for a batch: per item, and as cores busy on average."""
    return (
        f"{name} CPU: {cpu_seconds * 1000 / count:.2f} ms per {unit} "
        f"({cpu_seconds / seconds:.2f} cores busy on average)"
    )


async def run(args: argparse.Namespace) -> None:
    """Set everything up, measure each figure, print the report."""
    # Stopped from outside (a CI timeout, kill), it cleans up as after Ctrl-C: no PostgreSQL, service or agent left.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    for line in machine():
        report(line)
    report(f"command: {' '.join(['python -m bench', *sys.argv[1:]])}")
    # What the service's code logs inside this process (the cost step's plain-HTTP agent warnings, say) goes to a
    # file, not between the figures.
    in_process_log = Path(tempfile.gettempdir()) / f"vtpm-bench-in-process-{os.getpid()}.log"
    logging.basicConfig(filename=in_process_log, level=logging.WARNING)
    report(f"logs of the code run in this process: {in_process_log}")
    async with AsyncExitStack() as stack:
        server_url, where = await stack.enter_async_context(postgres_server())
        database_url = await stack.enter_async_context(fresh_database(server_url))
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vtpm-bench-agents-")))
        pki = make_pki(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vtpm-bench-pki-"))))
        fleets: dict[str, tuple[list[str], list[str]]] = {}
        for transport, ssl_context in ((PLAIN, None), (TLS, pki.agent_context())):
            fleet_fast = await stack.enter_async_context(
                agent_fleet(root, hosts=THROUGHPUT_HOSTS, delay_seconds=0, ssl_context=ssl_context)
            )
            fleet_slow = await stack.enter_async_context(
                agent_fleet(root, hosts=args.fanout_hosts, delay_seconds=args.fanout_delay, ssl_context=ssl_context)
            )
            fleets[transport] = fleet_fast, fleet_slow
        fast_urls, slow_urls = fleets[PLAIN]
        database = await asyncpg.connect(asyncpg_dsn(database_url))
        stack.push_async_callback(database.close)
        seeder = await Seeder.connect(database_url, root)
        stack.push_async_callback(seeder.close)
        report(f"database: a fresh database on {where} ({await database.fetchval('SHOW server_version')})")
        report(
            "inventory: written with bulk SQL straight into the database; only the DELETEs go through HTTP. "
            "The agents find the files already gone (they answer `missing`), after the same path checks."
        )
        fast_hosts = await seeder.hosts(fast_urls)
        tls_fast_hosts = await seeder.hosts(fleets[TLS][0])
        slow_hosts = {PLAIN: await seeder.hosts(slow_urls), TLS: await seeder.hosts(fleets[TLS][1])}
        throughput_hosts = {PLAIN: fast_hosts, TLS: tls_fast_hosts}

        report()
        report(
            "== 3. cost per job (Removal run in-process, statements counted by app.service.db.engine.recorded_statements)"  # noqa: E501
        )
        layouts = [
            [FileSpec(fast_hosts[0], "TpmState")],
            [FileSpec(fast_hosts[i % len(fast_hosts)], "TpmState") for i in range(COST_LARGE_FILES)],
            *two_host_layouts(fast_hosts, 1),
        ]
        costs = await measure_job_costs(database_url, seeder, layouts)
        for cost in costs:
            steps = ", ".join(
                f"{step} {cost.statements[step]}/{cost.transactions[step]}" for step in STEPS if step != "cleanup"
            )
            report(
                f"VM with {cost.files} file(s) on {cost.hosts} host(s): cleanup transaction "
                f"{cost.statements['cleanup']} statements; other steps (statements/transactions): {steps}; "
                f"{cost.round_trips} round trips in all, BEGIN and COMMIT included"
            )
        equal = costs[0].statements["cleanup"] == costs[1].statements["cleanup"]
        report(f"cleanup statements equal for 1 and {COST_LARGE_FILES} files: {'yes' if equal else 'NO'}")

        fan_out_vms, warmup_vms, removal_rounds = {}, {}, {}
        for transport in (PLAIN, TLS):
            fan_out_vms[transport] = await seeder.vms(
                [[FileSpec(host, "TpmState") for host in slow_hosts[transport]]] * args.fanout_runs
            )
            warmup_vms[transport] = await seeder.vms(two_host_layouts(throughput_hosts[transport], args.warmup))
            removal_rounds[transport] = [
                await seeder.vms(two_host_layouts(throughput_hosts[transport], args.removals))
                for _ in range(args.rounds)
            ]
        http = await stack.enter_async_context(client_session(args.concurrency))
        # The simulated hosts and the client live in this process: a collector pause over the seeded inventory
        # would hold every agent's answer at once, which no fleet of real hosts does.
        tune_garbage_collector()

        report()
        report("== 2a. baseline: bare FastAPI + SQLAlchemy/asyncpg endpoint, one INSERT and commit per request")
        port = free_port()
        async with LocalProcess(
            ["-m", "uvicorn", "bench.baseline:app", "--port", str(port), "--no-access-log", "--log-level", "warning"],
            port=port,
            ready_path="/openapi.json",
            env={"DATABASE_URL": database_url},
            log_path=Path(tempfile.gettempdir()) / f"vtpm-bench-baseline-{os.getpid()}.log",
            name="baseline",
        ) as baseline:
            await baseline_run(http, baseline.url, args.warmup, concurrency=args.concurrency)
            limits = []
            for _ in range(args.rounds):
                cpu = baseline.cpu_seconds()
                limit = await baseline_run(http, baseline.url, args.removals, concurrency=args.concurrency)
                cpu = baseline.cpu_seconds() - cpu
                report(describe_load(f"baseline INSERTs, {args.concurrency} in flight", limit))
                report(describe_cpu("baseline", cpu, limit.count, limit.ended - limit.started, "request"))
                limits.append(limit.per_second)
        limit_per_second = statistics.median(limits)
        report(f"baseline INSERTs per second, median of {args.rounds}: {limit_per_second:.0f}/s")

        report()
        report(
            f"== 7. dead host: an agent that accepts connections and never answers; {args.dead_host_removals} VMs "
            "with a file on it and one on a healthy host; a service of its own with "
            + " ".join(f"{k}={v}" for k, v in DEAD_HOST_SETTINGS.items())
            + " (AGENT_CONCURRENCY and AGENT_HOST_CONCURRENCY default)"
        )
        # Before any mass delete: the autovacuum that sections 6 and 5 set off would slow its healthy-only removals
        # (their median went from 9.0 to 16.4 ms when it ran last), which is no cost of the dead host; after the
        # baseline, which its writes and their autovacuum would slow (792-1,029 INSERTs/s when it ran first, against
        # 1,159-1,251). A database of its own: another service would take these jobs and probes too.
        dead_host_database_url = await stack.enter_async_context(fresh_database(server_url))
        dead_host_database = await asyncpg.connect(asyncpg_dsn(dead_host_database_url))
        stack.push_async_callback(dead_host_database.close)
        dead_host_seeder = await Seeder.connect(dead_host_database_url, root)
        stack.push_async_callback(dead_host_seeder.close)
        dead = HungAgent(root)
        dead_url = await stack.enter_async_context(dead.serving())
        dead_host, healthy_host = await dead_host_seeder.hosts([dead_url, fast_urls[0]])
        async with serving(dead_host_database_url, "dead-host", **DEAD_HOST_SETTINGS) as dead_host_service:
            figures = await dead_host_run(
                http,
                dead_host_database,
                dead_host_seeder,
                dead_host_service.url,
                dead=dead,
                dead_host=dead_host,
                healthy_host=healthy_host,
                removals=args.dead_host_removals,
                window_seconds=args.dead_host_window,
                concurrency=args.concurrency,
            )
        report_dead_host(figures)

        report()
        report(
            f"== 6. table sizes over a long run: {args.retention_rounds} rounds of {args.retention_removals} removals "
            f"back to back, {args.concurrency} in flight, a service of its own with "
            f"JOB_RETENTION_SECONDS={args.short_retention:g}"
        )
        async with serving(database_url, "short-retention", JOB_RETENTION_SECONDS=f"{args.short_retention:g}") as short:
            sizes = await long_run_table_sizes(
                http,
                database,
                seeder,
                short.url,
                hosts=fast_hosts,
                retention_seconds=args.short_retention,
                rounds=args.retention_rounds,
                removals=args.retention_removals,
                concurrency=args.concurrency,
            )
        report("removals so far: " + ", ".join(f"{table} rows" for table in RETAINED_TABLES) + ", MB on disk")
        for size in sizes:
            report(
                f"{size.removals:>7}: "
                + ", ".join(str(size.rows[table]) for table in RETAINED_TABLES)
                + f", {size.total_bytes / 1024 / 1024:.1f} MB"
            )

        # The default AGENT_CONCURRENCY (64) would send a 200-host fan-out in waves of 64.
        settings = {"AGENT_CONCURRENCY": str(max(256, args.fanout_hosts)), **pki.service_settings()}
        service = await stack.enter_async_context(serving(database_url, "service", **settings))

        fan_out_ratios = {}
        for transport in (PLAIN, TLS):
            report()
            report(
                f"== 1. fan-out over {transport}: one VM, one file on each of {args.fanout_hosts} hosts answering "
                f"after {args.fanout_delay * 1000:.0f} ms"
            )
            runs: list[FanOutRun] = [
                await fan_out_run(http, database, service.url, vm) for vm in fan_out_vms[transport]
            ]
            for number, fan_out in enumerate(runs, 1):
                # The first run of each opens a connection to every host; over TLS each one's handshake is in it.
                fresh = " (new connections)" if number == 1 else ""
                report(
                    f"run {number}{fresh}: job ran {fan_out.run_seconds * 1000:.0f} ms (finished_at - started_at) "
                    f"on {fan_out.hosts} hosts; {fan_out.caller_seconds * 1000:.0f} ms from DELETE sent to job seen "
                    "ended"
                )
            fan_out_ratios[transport] = statistics.median(r.run_seconds for r in runs) / args.fanout_delay
            report(
                f"fan-out ratio over {transport} (median run / one host's delay): {fan_out_ratios[transport]:.2f} "
                f"(goal <= {GOAL_FAN_OUT_RATIO})"
            )
        ratio = fan_out_ratios[PLAIN]
        report(f"a serial per-host loop would take at least {args.fanout_hosts * args.fanout_delay:.1f} s")
        calls_alone = await agent_calls_alone(slow_urls, root, args.fanout_runs)
        alone = statistics.median(calls_alone["seconds"])
        report(
            f"over {PLAIN}, the same {args.fanout_hosts} calls alone (python -m bench.agent_calls: AgentClient in a "
            f"process of its own, no service, no database), median of {args.fanout_runs}: {alone * 1000:.0f} ms = "
            f"ratio {alone / args.fanout_delay:.2f}; the service adds {ratio - alone / args.fanout_delay:.2f}; "
            f"the caller's CPU per call {calls_alone['cpu_ms_per_call'] * 1000:.0f} µs"
        )
        bare = await agent_calls_alone(slow_urls, root, args.fanout_runs, "--bare")
        bare_alone = statistics.median(bare["seconds"])
        report(
            f"the same requests through aiohttp alone (--bare: no AgentClient), median of {args.fanout_runs}: "
            f"{bare_alone * 1000:.0f} ms = ratio {bare_alone / args.fanout_delay:.2f}; the caller's CPU per call "
            f"{bare['cpu_ms_per_call'] * 1000:.0f} µs"
        )

        limit_ratios = {}
        for transport in (PLAIN, TLS):
            report()
            report(
                f"== 2b. removals end to end over {transport}: {args.removals} VMs, 3 files on 2 of "
                f"{THROUGHPUT_HOSTS} hosts, agents answering at once, {args.concurrency} DELETEs in flight, "
                f"{args.rounds} rounds (after {args.warmup} warm-up removals)"
            )
            await removal_run(http, database, service.url, warmup_vms[transport], concurrency=args.concurrency)
            rates = []
            # The profile, when asked for, is of the plain-HTTP rounds, as before TLS.
            async with profiling(service.pid, args.profile if transport == PLAIN else None):
                for vm_uuids in removal_rounds[transport]:
                    cpu = service.cpu_seconds()
                    removals = await removal_run(http, database, service.url, vm_uuids, concurrency=args.concurrency)
                    cpu = service.cpu_seconds() - cpu
                    report(describe_load("accepted DELETEs (202) alone", removals.accepted))
                    report(
                        f"removals end to end: {removals.succeeded} jobs succeeded {removals.end_to_end_seconds:.2f} "
                        f"s after the first DELETE = {removals.removals_per_second:.0f}/s"
                    )
                    report(describe_cpu("service", cpu, removals.succeeded, removals.end_to_end_seconds, "removal"))
                    rates.append(removals.removals_per_second)
            removals_per_second = statistics.median(rates)
            limit_ratios[transport] = removals_per_second / limit_per_second
            report(
                f"physical-limit ratio over {transport} (median removals/s {removals_per_second:.0f} / median "
                f"baseline INSERTs/s {limit_per_second:.0f}): {limit_ratios[transport]:.2f} (goal >= "
                f"{GOAL_LIMIT_RATIO}); by round: "
                + ", ".join(f"{rate / limit:.2f}" for rate, limit in zip(rates, limits, strict=True))
            )
        if args.profile:
            report(f"profile of the service during this run: {args.profile}")

        report()
        report(
            "== summary: "
            + "; ".join(
                f"over {transport}: fan-out ratio {fan_out_ratios[transport]:.2f}, physical-limit ratio "
                f"{limit_ratios[transport]:.2f}"
                for transport in (PLAIN, TLS)
            )
        )

        report()
        report(f"== 4. memory: service RSS before and after {args.memory_removals} more removals")
        memory_vms = await seeder.vms(two_host_layouts(fast_hosts, args.memory_removals))
        await measure_memory(http, database, service, memory_vms, args.concurrency)

        report()
        report(
            f"== 5. retention, {args.prune_rounds} rounds: {args.prune_jobs} finished jobs (seeded, then the tables "
            f"vacuumed and checkpointed) pass JOB_RETENTION_SECONDS (default, 7 days) at once, while DELETEs go on at "
            f"{args.prune_rate:g}/s (open loop; the {args.prune_quiet_seconds:g} s of them before, with nothing to "
            "prune, for comparison)"
        )
        p99_ratios = []
        for number in range(1, args.prune_rounds + 1):
            prune = await prune_backlog_run(
                http,
                database,
                seeder,
                service.url,
                hosts=fast_hosts,
                jobs=args.prune_jobs,
                retention_seconds=DEFAULT_RETENTION_SECONDS,
                per_second=args.prune_rate,
                quiet_seconds=args.prune_quiet_seconds,
                longest_prune_seconds=max(120.0, args.prune_jobs / 250),
            )
            report(
                f"round {number}: seeded {prune.jobs} jobs (2 host outcomes, 3 planned files, 3 confirmations, 3 "
                f"ledger rows each) in one INSERT ... SELECT generate_series: {prune.seed_seconds:.1f} s; pruned them "
                f"all {prune.prune_seconds:.1f} s after they were due = {prune.jobs / prune.prune_seconds:.0f} jobs/s "
                "(the first batch waits for the worker's next idle check, up to WORKER_POLL_SECONDS)"
            )
            report(describe_load("  DELETEs with nothing to prune", prune.quiet))
            report(describe_load("  DELETEs while pruning", prune.pruning))
            if prune.ran_out:
                report(f"  (the DELETEs ran out of VMs after {prune.pruning.ended - prune.pruning.started:.0f} s)")
            p99_ratios.append(prune.pruning.latency_ms(0.99) / prune.quiet.latency_ms(0.99))
            report(f"  DELETE p99 while pruning / without: {p99_ratios[-1]:.2f}")
        report(
            f"DELETE p99 while pruning / without, median of {args.prune_rounds} rounds: "
            f"{statistics.median(p99_ratios):.2f} (goal <= {GOAL_PRUNE_P99_RATIO}); by round: "
            + ", ".join(f"{ratio:.2f}" for ratio in p99_ratios)
        )


@asynccontextmanager
async def serving(database_url: str, name: str, **settings: str) -> AsyncIterator[LocalProcess]:
    """`python -m app serve` on a free port against the benchmark database, with these settings, for the block."""
    async with service_process(
        database_url, Path(tempfile.gettempdir()), name=f"vtpm-bench-{name}-{os.getpid()}", **settings
    ) as server:
        report(
            f"{name}: python {' '.join(server.args)} with "
            + " ".join(f"{k}={v}" for k, v in settings.items())
            + f" (log: {server.log_path})"
        )
        yield server


def report_dead_host(figures: DeadHostFigures) -> None:
    """The four figures of the dead-host scenario, each against its goal."""
    report(
        f"{figures.removals} removals that each touch the dead host: {figures.removals_seconds:.1f} s from the first "
        f"DELETE to the last job finished (goal <= {GOAL_DEAD_HOST_REMOVALS_SECONDS:g} s); "
        f"{figures.backlog_orphans} orphans left on it"
    )
    report(
        "slowest of 15 healthy-only removals while that backlog is retried "
        f"{figures.backlog_slowest_seconds * 1000:.0f} ms / median without a backlog "
        f"{figures.quiet_median_seconds * 1000:.1f} ms = {figures.slowdown:.2f}x "
        f"(goal <= {GOAL_DEAD_HOST_SLOWDOWN:g}); their median {figures.backlog_median_seconds * 1000:.1f} ms"
    )
    report(
        f"delete calls to the dead host while it is dead: {figures.window_calls} in {figures.window_seconds:.0f} s = "
        f"{figures.calls_per_minute:.1f} per minute (goal <= {GOAL_DEAD_HOST_CALLS_PER_MINUTE:g})"
    )
    report(
        f"host answers again: its last of {figures.backlog_orphans} orphans confirmed after "
        f"{figures.recovery_seconds:.2f} s (goal <= {GOAL_DEAD_HOST_RECOVERY_SECONDS:g} s)"
    )


async def agent_calls_alone(urls: list[str], root: Path, runs: int, *options: str) -> dict[str, Any]:
    """Run `python -m bench.agent_calls` against these agents (served by this process); each run's seconds and
    its CPU time per call (see bench/agent_calls.py)."""
    calls = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.agent_calls",
        "--root",
        str(root),
        "--runs",
        str(runs),
        *options,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await calls.communicate("\n".join(urls).encode())
    if calls.returncode != 0:
        raise RuntimeError(f"python -m bench.agent_calls exited {calls.returncode}")
    timings: dict[str, Any] = json.loads(out)
    return timings


async def measure_memory(
    http: aiohttp.ClientSession,
    database: asyncpg.Connection,
    service: LocalProcess,
    vm_uuids: list[uuid.UUID],
    concurrency: int,
) -> None:
    """Read the service's RSS, remove every VM, read it again; report the growth."""
    await asyncio.sleep(_SETTLE_SECONDS)
    before = service.rss_bytes()
    started = time.monotonic()
    removals = await removal_run(http, database, service.url, vm_uuids, concurrency=concurrency)
    took = time.monotonic() - started
    await asyncio.sleep(_SETTLE_SECONDS)
    after = service.rss_bytes()
    growth_mb = (after - before) / 1024 / 1024
    report(
        f"{removals.succeeded} removals took {took:.0f} s ({removals.removals_per_second:.0f}/s end to end, "
        f"{removals.accepted.per_second:.0f} DELETEs/s accepted)"
    )
    report(
        f"RSS {before / 1024 / 1024:.1f} MB -> {after / 1024 / 1024:.1f} MB: growth {growth_mb:+.1f} MB "
        f"(goal < {GOAL_RSS_GROWTH_MB:g} MB)"
    )


def main() -> None:
    """Run the benchmark, on uvloop when it is installed (as the service is)."""
    args = parse_args()
    try:
        loop.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        report("interrupted; everything the benchmark started is stopped")
        sys.exit(130)


if __name__ == "__main__":
    main()
