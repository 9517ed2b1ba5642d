"""`python -m bench.replicas`: one gateway replica behind HAProxy against two, on one PostgreSQL.

Starts the fake upstream, a throwaway PostgreSQL, two `python -m gateway` replicas on it (20 %
escalation, as gateway_overhead's `gateway-20%-postgres`) and two HAProxy processes running
deploy/haproxy.cfg (one over gateway-1 alone, one over both); drives each balancer in alternating
rounds with gateway_overhead's closed-loop load, and reports req/s, p50, p99, the ratio of two
replicas to one and every process's CPU, to say what limited it. Nothing is pinned: the
processes share the machine's cores, as they would on one host. No model runs, nothing streams.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.chaos import free_port
from bench.gateway_overhead import (
    HOST,
    NOISY_PCT,
    THRESHOLD,
    Load,
    Server,
    check_routing,
    console,
    cpu_seconds,
    drive,
    environments,
    git_state,
    machine,
    quartiles,
    shown,
    start,
    stop_all,
    wait_ready,
    write_report,
)
from bench.haproxy import CONFIG, INSTALL_HINT, for_loopback, haproxy_bin
from bench.postgres import PostgresServer, postgres_bin
from bench.upstream import run_fast
from models.progress import Progress

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "replicas.json"
GOAL = 1.7  # issue 13: two replicas' req/s over one's, where the load generator is not the limit
SYSTEMS = ("1-replica", "2-replicas")
HARD_EVERY = 5  # every 5th request escalates: 20 %
SATURATED_PCT = 90.0  # a single-threaded process above this share of a core is the limit
# Roles whose CPU is reported; `other` is everything on the machine that is not ours.
ROLES = ("gateway-1", "gateway-2", "haproxy", "upstream", "load generator", "postgres", "other")
# Roles that are one process with one event loop, so at most one core each.
SINGLE_CORE = ("gateway-1", "gateway-2", "upstream", "load generator")


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process and all its descendants alive now (PostgreSQL: the postmaster,
    its backends and helpers). A child that exited since the last call takes its seconds with it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited while listed
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue
        todo += children.get(pid, [])
    return total


def postmaster_pid(server: PostgresServer) -> int:
    return int((server.data / "postmaster.pid").read_text().split()[0])


@dataclass
class Run(Load):
    cpu_pct: dict[str, float]  # role -> CPU over the window, % of one core
    cpu_us_per_req: dict[str, float]  # role -> CPU per answered request, µs
    machine_busy_pct: float  # every core's busy time, % of all the machine's cores
    error_samples: list[str] = field(default_factory=list)


async def measure(
    system: str,
    url: str,
    concurrency: int,
    round_no: int,
    args: argparse.Namespace,
    pids: dict[str, list[int]],
    postmaster: int,
    progress: Progress,
) -> Run:
    """One cell. `pids`: role -> the processes charged to it (haproxy: both balancers; the idle
    one only health-checks)."""
    pg_start: list[float] = []
    with shown(progress, f"{system} c={concurrency}", args.warmup, args.duration) as on_tick:
        tally, window, foreign, ours = await drive(
            url,
            concurrency=concurrency,
            hard_every=HARD_EVERY,
            warmup_s=args.warmup,
            duration_s=args.duration,
            watch=sorted({p for ps in pids.values() for p in ps}),
            on_tick=on_tick,
            on_window=lambda: pg_start.append(tree_cpu_seconds(postmaster)),
        )
    postgres_s = tree_cpu_seconds(postmaster) - pg_start[0] if pg_start else 0.0
    seconds = {role: sum(ours[p] for p in ps) for role, ps in pids.items()}
    seconds |= {"postgres": postgres_s, "other": max(0.0, foreign - postgres_s)}
    n = len(tally.latencies)
    cores = os.cpu_count() or 1
    return Run(
        system=system,
        round=round_no,
        concurrency=concurrency,
        **Load.fields(tally, window),
        cpu_pct={role: round(s / window * 100, 1) for role, s in seconds.items()},
        cpu_us_per_req={role: round(s / n * 1e6, 1) for role, s in seconds.items()} if n else {},
        machine_busy_pct=round((sum(ours.values()) + foreign) / window / cores * 100, 1),
    )


# -- analysis ----------------------------------------------------------------------------------
def limit(cpu_pct: dict[str, float], busy_pct: float) -> str:
    """What held throughput back: a single-loop process at a full core, else the machine's cores
    if all were busy, else nothing saturated (the load's concurrency, or waiting)."""
    saturated = [f"{r} ({cpu_pct[r]:.0f} % of a core)" for r in SINGLE_CORE if cpu_pct.get(r, 0) >= SATURATED_PCT]
    if saturated:
        return "one process's core: " + ", ".join(saturated)
    if busy_pct >= SATURATED_PCT:
        top = sorted((r for r in ROLES if cpu_pct.get(r, 0) >= 1), key=lambda r: -cpu_pct[r])
        shares = ", ".join(f"{r} {cpu_pct[r]:.0f} %" for r in top)
        return f"all {os.cpu_count()} cores ({busy_pct:.0f} % busy): {shares} of a core"
    return f"no process and not the machine ({busy_pct:.0f} % busy): the load's concurrency"


def ceiling(us_per_req: dict[str, float], replicas: Sequence[str]) -> tuple[float, str]:
    """(req/s, role) where throughput would stop if every single-loop process had a core of its
    own: the replicas as one pool of len(replicas) cores (the balancer evens them out), the
    upstream and the load generator one core each. HAProxy runs a thread a core and PostgreSQL a
    process a connection, so neither is a term."""
    terms = {
        "gateways": sum(us_per_req.get(r, 0.0) for r in replicas) / len(replicas),
        "upstream": us_per_req.get("upstream", 0.0),
        "load generator": us_per_req.get("load generator", 0.0),
    }
    role = max(terms, key=lambda r: terms[r])
    return (1e6 / terms[role] if terms[role] else math.inf), role


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Per system: the median run's figures, medians of each role's CPU; the ratio of the rounds'
    ratios (each round's two runs back to back); and what limited each."""
    by_system = {s: [r for r in runs if r.system == s] for s in SYSTEMS}
    systems: dict[str, Any] = {}
    for name, rs in by_system.items():
        if not rs:
            continue
        mid = sorted(rs, key=lambda r: r.rps)[(len(rs) - 1) // 2]
        cpu = {role: statistics.median(r.cpu_pct.get(role, 0.0) for r in rs) for role in ROLES}
        us = {role: statistics.median(r.cpu_us_per_req.get(role, 0.0) for r in rs) for role in ROLES}
        busy = statistics.median(r.machine_busy_pct for r in rs)
        replicas = ("gateway-1",) if name == "1-replica" else ("gateway-1", "gateway-2")
        projected, bound = ceiling(us, replicas)
        systems[name] = {
            "rps": round(mid.rps, 1),
            "p50_ms": round(mid.p50_ms, 2),
            "p99_ms": round(mid.p99_ms, 2),
            "errors": sum(r.errors for r in rs),
            "escalated_fraction": mid.escalated_fraction,
            "rps_runs": [round(r.rps, 1) for r in rs],
            "cpu_pct": {k: round(v, 1) for k, v in cpu.items()},
            "cpu_us_per_req": {k: round(v, 1) for k, v in us.items()},
            "machine_busy_pct": round(busy, 1),
            "limit": limit(cpu, busy),
            "ceiling_with_a_core_each": {"rps": round(projected, 1), "bound_by": bound},
        }
    one = {(r.round, r.concurrency): r for r in by_system["1-replica"]}
    ratios = sorted(
        r.rps / one[(r.round, r.concurrency)].rps
        for r in by_system["2-replicas"]
        if (r.round, r.concurrency) in one and one[(r.round, r.concurrency)].rps > 0
    )
    ratio = statistics.median(ratios) if ratios else float("nan")
    projected = float("nan")
    if len(systems) == 2:
        projected = systems["2-replicas"]["ceiling_with_a_core_each"]["rps"] / max(
            systems["1-replica"]["ceiling_with_a_core_each"]["rps"], 1e-9
        )
    return {
        "systems": systems,
        "rps_ratio": round(ratio, 3),
        "rps_ratio_runs": [round(x, 3) for x in ratios],
        "rps_ratio_quartiles": quartiles(ratios),
        "goal": {"rps_ratio": GOAL, "passed": ratio >= GOAL},
        "projected_ratio_with_a_core_each": round(projected, 3),
    }


def render(summary: dict[str, Any], concurrency: int) -> None:
    table = Table(title=f"Replicas behind HAProxy (closed loop, c={concurrency}, 20 % escalation, PostgreSQL)")
    for col in ("system", "req/s", "p50 ms", "p99 ms", "errors", "esc %", "machine busy %", *ROLES):
        table.add_column(col, justify="left" if col == "system" else "right")
    for name, s in summary["systems"].items():
        table.add_row(
            name,
            f"{s['rps']:,.0f}",
            f"{s['p50_ms']:.2f}",
            f"{s['p99_ms']:.2f}",
            f"[red]{s['errors']}[/red]" if s["errors"] else "0",
            "-" if s["escalated_fraction"] is None else f"{s['escalated_fraction'] * 100:.1f}",
            f"{s['machine_busy_pct']:.0f}",
            *(f"{s['cpu_pct'][r]:.0f}" for r in ROLES),
        )
    console.print(table)
    console.print(
        "Per role: CPU over the measured window, % of one core (median over rounds); haproxy is both "
        "balancers (the idle one only health-checks); other: processes not ours (noise)."
    )
    quart = "–".join(f"{q:.2f}" for q in summary["rps_ratio_quartiles"]) or "-"
    verdict = "[green]met[/green]" if summary["goal"]["passed"] else "[red]not met[/red]"
    console.print(
        f"2 replicas ÷ 1: [bold]{summary['rps_ratio']:.2f}×[/bold] req/s (median of per-round ratios; "
        f"middle half {quart}); goal ≥ {GOAL}× {verdict}"
    )
    for name, s in summary["systems"].items():
        c = s["ceiling_with_a_core_each"]
        console.print(f"  {name} limited by {s['limit']}; with a core each: {c['rps']:,.0f} req/s ({c['bound_by']})")
    console.print(
        f"  projected 2 ÷ 1 with a core for every process: {summary['projected_ratio_with_a_core_each']:.2f}× "
        "(from CPU per request; a projection, not a measurement)"
    )


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__)
    p.add_argument("--concurrency", type=int, nargs="+", default=[64])
    p.add_argument("--warmup", type=float, default=1.0, help="seconds discarded at the start of each cell")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per cell")
    p.add_argument("--repeats", type=int, default=10, help="rounds; each runs both systems, in turn first")
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def start_haproxy(name: str, addresses: Sequence[str], *, binary: str, logs: Path, env: dict[str, str]) -> Server:
    """deploy/haproxy.cfg on loopback, balancing over `addresses`, in the foreground (-db)."""
    port = free_port()
    cfg = logs / f"{name}.cfg"
    cfg.write_text(for_loopback(CONFIG.read_text(), port, addresses))
    log_path = logs / f"{name}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], env=env, stdout=log_file, stderr=subprocess.STDOUT)
    return Server(name, proc, f"http://{HOST}:{port}", log_path)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    haproxy, pg_bin = haproxy_bin(), postgres_bin()
    if haproxy is None or pg_bin is None:
        missing = [f"HAProxy ({INSTALL_HINT}, or make haproxy)"] * (haproxy is None)
        missing += ["PostgreSQL (make postgres)"] * (pg_bin is None)
        raise SystemExit("bench.replicas needs " + " and ".join(missing))
    logs = Path(tempfile.mkdtemp(prefix="tiergate-replicas-"))
    base_env, gateway_env = environments(logs)
    servers: list[Server] = []
    postgres: PostgresServer | None = None
    try:
        with console.status("starting upstream, PostgreSQL, two gateways and two balancers…"):
            upstream = start("upstream", "bench.upstream", [], cpus=None, logs=logs, env=base_env)
            servers.append(upstream)
            postgres = PostgresServer(pg_bin)
            postgres.sql("CREATE DATABASE bench")
            await wait_ready(upstream, "/health")
            v1 = upstream.base + "/v1"
            gateway_args = ["--student-url", v1, "--teacher-url", v1, "--threshold", str(THRESHOLD)]
            gateways = []
            for i in (1, 2):  # as in the compose file: one database, a spill file each
                env = gateway_env | {
                    "TIERGATE_SIGNAL__URL": postgres.url_for("bench"),
                    "TIERGATE_SIGNAL__SPILL_PATH": str(logs / f"spill-gateway-{i}.jsonl"),
                }
                gateways.append(start(f"gateway-{i}", "gateway", gateway_args, cpus=None, logs=logs, env=env))
            servers += gateways
            ready_s = {g.name: round(await wait_ready(g, "/health/ready"), 2) for g in gateways}
            for g in gateways:
                await check_routing(g.base)
            addresses = [g.base.removeprefix("http://") for g in gateways]
            balancers = {
                "1-replica": start_haproxy("haproxy-1", addresses[:1], binary=haproxy, logs=logs, env=base_env),
                "2-replicas": start_haproxy("haproxy-2", addresses, binary=haproxy, logs=logs, env=base_env),
            }
            servers += balancers.values()
            for lb in balancers.values():
                await wait_ready(lb, "/health/ready")
                await check_routing(lb.base)
        console.log(f"ready: gateways {ready_s}; PostgreSQL on :{postgres.port}; nothing pinned")
        pids = {
            "gateway-1": [gateways[0].proc.pid],
            "gateway-2": [gateways[1].proc.pid],
            "haproxy": [lb.proc.pid for lb in balancers.values()],
            "upstream": [upstream.proc.pid],
            "load generator": [os.getpid()],
        }
        runs: list[Run] = []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            overall = progress.add_task("cells", total=len(SYSTEMS) * len(args.concurrency) * args.repeats)
            for round_no in range(1, args.repeats + 1):
                for concurrency in args.concurrency:
                    # Alternate which goes first, so a drift in the machine's speed favours neither.
                    for system in SYSTEMS if round_no % 2 else SYSTEMS[::-1]:
                        url = balancers[system].base + "/v1/chat/completions"
                        cell = await measure(
                            system, url, concurrency, round_no, args, pids, postmaster_pid(postgres), progress
                        )
                        runs.append(cell)
                        progress.advance(overall)
                        busiest = sorted(cell.cpu_pct.items(), key=lambda kv: -kv[1])[:4]
                        progress.console.log(
                            f"[{round_no}/{args.repeats}] {system:<10} c={concurrency:<3} {cell.rps:7,.0f} req/s"
                            f"  p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:6.2f} ms  errors {cell.errors}"
                            f"  busy {cell.machine_busy_pct:3.0f}%  "
                            + "  ".join(f"{role} {pct:.0f}%" for role, pct in busiest)
                        )
                        for sample in cell.error_samples[:2]:
                            progress.console.log(f"[red]  error: {sample}")
    except BaseException:
        console.print(f"[red]failed; logs kept in {logs}")
        raise
    finally:
        stop_all(servers, postgres)
    shutil.rmtree(logs, ignore_errors=True)  # logs and spill files are only kept on failure
    summaries = {c: summarize([r for r in runs if r.concurrency == c]) for c in args.concurrency}
    for c, summary in summaries.items():
        render(summary, c)
    noisy = [r for r in runs if r.cpu_pct["other"] > NOISY_PCT]
    if noisy:
        console.print(
            f"[yellow]warning: {len(noisy)} of {len(runs)} runs shared the machine with other processes using "
            f"> {NOISY_PCT:.0f}% of a core (max {max(r.cpu_pct['other'] for r in noisy):.0f}%)"
        )
    wall_s = time.perf_counter() - began
    console.log(f"took {wall_s:.0f} s")
    return {
        "benchmark": "replicas",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(wall_s, 1),
        "machine": machine(),
        "git": git_state(),
        "method": {
            "load": "closed loop, aiohttp, one session per cell, keep-alive, through HAProxy",
            "balancer": f"haproxy {haproxy_version(haproxy)}, deploy/haproxy.cfg with loopback bind and servers",
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "repeats": args.repeats,
            "request": "non-streaming chat completion, max_tokens 32, temperature 0, 100 distinct prompts",
            "escalation": f"every {HARD_EVERY}th request's user message contains HARD (upstream logprob -3.0)",
            "threshold": THRESHOLD,
            "signal_store": "PostgreSQL 15 on loopback (bench/postgres.py), shared by both replicas",
            "pinning": "none",
        },
        "ready_s": ready_s,
        "by_concurrency": {str(c): s for c, s in summaries.items()},
        "all_runs": [asdict(r) for r in runs],
        "noisy_runs": len(noisy),
    }


def haproxy_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout.split()
    return out[2] if len(out) > 2 else "?"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_report(run_fast(run(args)), args.output)


if __name__ == "__main__":
    main()
