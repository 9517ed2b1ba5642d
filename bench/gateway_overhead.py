"""`python -m bench.gateway_overhead`: the gateway's HTTP overhead against a bare pass-through.

Starts the fake upstream, the pass-through and `python -m gateway` as pinned loopback subprocesses,
drives each with a closed-loop aiohttp load generator and reports req/s, p50 and p99 as ratios to
the pass-through. No model runs (the upstream answers in microseconds); streaming is not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.chaos import free_port
from bench.postgres import PostgresServer, postgres_bin
from bench.upstream import run_fast
from models.progress import Progress

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "gateway_overhead.json"
HOST = "127.0.0.1"
THRESHOLD = 0.5  # confidence exp(-0.05) ≈ 0.95 stays on the student; exp(-3.0) ≈ 0.05 escalates
GOALS = {"gateway-0%": 0.70, "gateway-20%": 0.50}  # min throughput as a fraction of the pass-through


class DefaultGoals(TypedDict):
    rps: float
    p99: float
    concurrency: tuple[int, ...]


# The default config (audits on, nothing escalated), at the concurrencies the goal names: req/s as
# a fraction of the pass-through's, and p99 at most this multiple of the pass-through's (issue 14).
GOALS_DEFAULT: DefaultGoals = {"rps": 0.85, "p99": 1.5, "concurrency": (16, 64)}
# Goals against another system of the same round: (that system, min fraction of its req/s).
GOALS_VS = {"gateway-20%-postgres": ("gateway-20%", 0.90)}
NOISY_PCT = 25.0  # a run during which other processes used more than this much of a core is flagged
PROMPTS = 100
JSON_HEADERS = {"content-type": "application/json"}

# Runs a module as __main__ after pinning the process (and so every thread it will start).
_LAUNCH = (
    "import os, runpy, sys; cpus = sys.argv.pop(1); "
    "cpus and os.sched_setaffinity(0, {int(c) for c in cpus.split(',')}); "
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
)

# Wide enough for the results table when output is piped to a file.
console = Console(width=None if sys.stdout.isatty() else 160)


# -- processes ---------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads included (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """Machine-wide busy CPU seconds, all cores (from /proc/stat; idle and iowait excluded)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSnapshot:
    busy_s: float
    per_pid: dict[int, float]

    @classmethod
    def take(cls, pids: Sequence[int]) -> CpuSnapshot:
        return cls(busy_seconds(), {pid: cpu_seconds(pid) for pid in pids})

    def since(self, earlier: CpuSnapshot) -> tuple[float, dict[int, float]]:
        """(busy seconds of processes other than ours, CPU seconds per watched pid)."""
        ours = {pid: self.per_pid[pid] - earlier.per_pid[pid] for pid in self.per_pid}
        return self.busy_s - earlier.busy_s - sum(ours.values()), ours


def git_state() -> dict[str, Any]:
    """The commit measured and how many files differed from it (others may be editing the tree)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "dirty_files": len(git("status", "--short").splitlines()),
    }


def machine() -> dict[str, Any]:
    """What a result file says of the machine it was measured on."""
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    base: str  # URL without /v1
    log_path: Path
    launched: float = field(default_factory=time.perf_counter)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start(
    name: str, module: str, args: Sequence[str], *, cpus: set[int] | None, logs: Path, env: dict[str, str]
) -> Server:
    port = free_port()
    log_path = logs / f"{name}.log"
    cpu_arg = ",".join(str(c) for c in sorted(cpus)) if cpus else ""
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, cpu_arg, module, "--host", HOST, "--port", str(port), *args],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return Server(name, proc, f"http://{HOST}:{port}", log_path)


async def wait_ready(server: Server, path: str, timeout_s: float = 120.0) -> float:
    """Poll `path` until it answers 200; returns seconds since launch. Fails fast if the process died."""
    began = server.launched
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.perf_counter() - began < timeout_s:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited ({server.proc.returncode}):\n{server.tail()}")
            try:
                async with session.get(server.base + path) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - began
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{server.name} not ready after {timeout_s:.0f}s:\n{server.tail()}")


def start_profiler(pid: int, out: Path, duration_s: float) -> subprocess.Popen[bytes]:
    """py-spy on `pid` for the measured window, as collapsed stacks (one `frames count` a line).

    --nonblocking samples without pausing the target, so the numbers move less; --idle is off,
    so a stack is only counted where the thread was running. It runs on the load generator's core.
    """
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, math.ceil(duration_s))), "--rate", "250"]
    cmd += ["--nonblocking", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_postgres: list[PostgresServer] = []


def start_postgres() -> str | None:
    """A throwaway PostgreSQL server with a `bench` database, on this process's core (the load's:
    in a deployment the database runs elsewhere); its URL, or None (with a warning) if PostgreSQL
    is not installed."""
    bindir = postgres_bin()
    if bindir is None:
        console.print("[yellow]PostgreSQL is not installed (make postgres): gateway-20%-postgres is not run")
        return None
    server = PostgresServer(bindir)
    _postgres.append(server)
    server.sql("CREATE DATABASE bench")
    return server.url_for("bench")


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully (the store flushes)
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def stop_all(servers: Sequence[Server], postgres: PostgresServer | None = None) -> None:
    """Stop `servers`, the last started first, then remove the PostgreSQL server if one is given."""
    for server in reversed(servers):
        stop(server)
    if postgres is not None:
        postgres.remove()


# -- load generation ---------------------------------------------------------------------------
def request_body(order: int | str, hard: bool) -> bytes:
    suffix = f" {'HARD' if hard else 'simple'} question."
    return json.dumps(
        {
            "model": "tiered",
            "messages": [{"role": "user", "content": f"Order #{order}: can I change the delivery address?{suffix}"}],
            "max_tokens": 32,
            "temperature": 0,
        }
    ).encode()


EASY, HARD = ([request_body(10_000 + k, hard) for k in range(PROMPTS)] for hard in (False, True))
# Escalated requests never repeat: the teacher answer cache is on by default, and a repeated
# greedy prompt would be answered from it, so a repeating benchmark would measure cache hits,
# not escalations. Each HARD request takes the next order code (a teacher-cache miss), in
# letters: a 7-digit number would send every record through phone-number parsing (227 us in
# the redactor against 30 us for the 5-digit ones), which the benchmark is not about.
_HARD_HEAD, _HARD_TAIL = request_body("@", True).split(b"@")
_hard_orders = itertools.count(26**4)


def unique_hard_body() -> bytes:
    n, code = next(_hard_orders), b""
    while n:
        n, digit = divmod(n, 26)
        code = bytes((65 + digit,)) + code
    return b"".join((_HARD_HEAD, code, _HARD_TAIL))


@dataclass
class Load:
    """What one closed-loop cell's clients saw (`Load.fields` fills these from a `drive` tally)."""

    system: str
    round: int
    concurrency: int
    requests: int  # answered (any status) among requests started inside the measured window
    errors: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    escalated_fraction: float | None  # from x-tiergate-escalated; None when the system has no such header

    @staticmethod
    def fields(tally: _Tally, window: float) -> dict[str, Any]:
        """The figures of a tally measured over `window` seconds, by field name (and its error samples)."""
        lat = sorted(tally.latencies)
        n = len(lat)
        return {
            "requests": n + tally.errors,
            "errors": tally.errors,
            "duration_s": round(window, 3),
            "rps": n / window,
            "p50_ms": percentile(lat, 0.50) * 1e3,
            "p99_ms": percentile(lat, 0.99) * 1e3,
            "mean_ms": (sum(lat) / n * 1e3) if n else float("nan"),
            "escalated_fraction": (tally.escalated / tally.headed) if tally.headed else None,
            "error_samples": tally.error_samples,
        }


@dataclass
class Cell(Load):
    server_cpu_us_per_req: float | None  # CPU of the proxy under test per measured request
    upstream_cpu_us_per_req: float
    other_load_pct: float  # CPU used by processes not ours during the window, % of one core (noise)
    error_samples: list[str] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)  # filled against the pass-through
    rps_runs: list[float] = field(default_factory=list)  # every repeat's req/s; the cell is the median run
    # Every round's req/s ratio to its pass-through run, lowest first (the summary's spread).
    rps_ratio_runs: list[float] = field(default_factory=list)
    # The same against its GOALS_VS reference system, where it has one.
    ref_ratio_runs: list[float] = field(default_factory=list)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))]


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    escalated: int = 0
    headed: int = 0
    last_end: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(message)


async def drive(
    url: str,
    *,
    concurrency: int,
    hard_every: int,
    warmup_s: float,
    duration_s: float,
    watch: Sequence[int],
    on_tick: Callable[[float, int], None],
    on_window: Callable[[], None] = lambda: None,
) -> tuple[_Tally, float, float, dict[int, float]]:
    """Closed loop: `concurrency` workers each send the next request as soon as one returns.

    Requests started during warm-up are discarded; the window closes at warm-up + duration and
    throughput is measured requests over the time from the window's start to the last answer.
    Every `hard_every`-th request (global order) carries "HARD", so the upstream makes it unsure.
    Returns the tally, the window in seconds, foreign busy CPU seconds and CPU seconds per
    watched pid over the window.
    """
    tally = _Tally()
    counter = itertools.count()
    began = time.perf_counter()
    measure_from, stop_at = began + warmup_s, began + warmup_s + duration_s
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    cpu_start: list[CpuSnapshot] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while (t0 := time.perf_counter()) < stop_at:
            i = next(counter)
            hard = hard_every > 0 and i % hard_every == hard_every - 1
            body = unique_hard_body() if hard else EASY[i % PROMPTS]
            try:
                async with session.post(url, data=body, headers=JSON_HEADERS) as resp:
                    data = await resp.read()
                    status, escalated = resp.status, resp.headers.get("x-tiergate-escalated")
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, escalated, data = 0, None, repr(exc).encode()
            t1 = time.perf_counter()
            if t0 < measure_from:
                continue
            if status != 200 or not data.startswith(b"{"):
                tally.error(f"{status}: {data[:200].decode(errors='replace')}")
                continue
            tally.latencies.append(t1 - t0)
            tally.last_end = max(tally.last_end, t1)
            if escalated is not None:
                tally.headed += 1
                tally.escalated += escalated == "true"

    async def ticker() -> None:
        while True:
            now = time.perf_counter()
            if not cpu_start and now >= measure_from:
                cpu_start.append(CpuSnapshot.take(watch))
                on_window()
            on_tick(now - began, len(tally.latencies))
            await asyncio.sleep(0.2 if cpu_start else min(0.2, max(0.0, measure_from - now)))

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        tick = asyncio.create_task(ticker())
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        tick.cancel()
    window = max(tally.last_end - measure_from, 1e-9)
    foreign, ours = CpuSnapshot.take(watch).since(cpu_start[0]) if cpu_start else (0.0, dict.fromkeys(watch, 0.0))
    return tally, window, foreign, ours


@dataclass(frozen=True)
class System:
    name: str
    url: str
    hard_every: int
    pid: int | None  # the process whose CPU time is charged to this system (None: the upstream itself)


@contextlib.contextmanager
def shown(progress: Progress, label: str, warmup_s: float, duration_s: float) -> Iterator[Callable[[float, int], None]]:
    """A progress bar for one cell, removed once the cell is done; yields `drive`'s `on_tick`."""
    total = warmup_s + duration_s
    task = progress.add_task(f"  {label}", total=total)

    def on_tick(elapsed: float, n: int) -> None:
        phase = "warm-up" if elapsed < warmup_s else f"{n:,} req"
        progress.update(task, completed=min(elapsed, total), description=f"  {label}: {phase}")

    try:
        yield on_tick
    finally:
        progress.remove_task(task)


async def measure(
    system: System, concurrency: int, round_no: int, args: argparse.Namespace, pids: dict[str, int], progress: Progress
) -> Cell:
    """One cell. `pids` maps every process of ours (load generator included) by role."""
    profiler: list[subprocess.Popen[bytes]] = []

    def on_window() -> None:
        if args.profile is not None and system.pid is not None:
            profiler.append(
                start_profiler(system.pid, args.profile / f"{system.name}-c{concurrency}.txt", args.duration)
            )

    with shown(progress, f"{system.name} c={concurrency}", args.warmup, args.duration) as on_tick:
        tally, window, foreign, ours = await drive(
            system.url,
            concurrency=concurrency,
            hard_every=system.hard_every,
            warmup_s=args.warmup,
            duration_s=args.duration,
            watch=sorted(set(pids.values())),
            on_tick=on_tick,
            on_window=on_window,
        )
    for proc in profiler:
        await asyncio.to_thread(proc.wait)
    n = len(tally.latencies)
    server_cpu = ours[system.pid] if system.pid is not None else None
    return Cell(
        system=system.name,
        round=round_no,
        concurrency=concurrency,
        **Load.fields(tally, window),
        server_cpu_us_per_req=(server_cpu / n * 1e6) if server_cpu is not None and n else None,
        upstream_cpu_us_per_req=(ours[pids["upstream"]] / n * 1e6) if n else float("nan"),
        other_load_pct=foreign / window * 100,
    )


# -- sanity checks, reporting ------------------------------------------------------------------
async def check_routing(gateway: str) -> None:
    """One easy and one HARD request: fail early unless they route as the benchmark assumes."""
    async with aiohttp.ClientSession() as session:
        for body, want in ((EASY[0], "false"), (HARD[0], "true")):
            async with session.post(gateway + "/v1/chat/completions", data=body, headers=JSON_HEADERS) as resp:
                text = await resp.text()
                got = resp.headers.get("x-tiergate-escalated")
                if resp.status != 200 or got != want:
                    raise RuntimeError(f"gateway routing check failed: {resp.status} escalated={got}: {text[:300]}")


def add_ratios(cells: list[Cell]) -> None:
    """Each run against the pass-through run of the same round and concurrency (measured just before),
    and its req/s also against the GC-tuned pass-through's (`rps_gc`)."""
    base = {(c.round, c.concurrency): c for c in cells if c.system == "passthrough"}
    tuned = {(c.round, c.concurrency): c for c in cells if c.system == "passthrough-gc"}
    by_system = {(c.system, c.round, c.concurrency): c for c in cells}
    for cell in cells:
        pt = base.get((cell.round, cell.concurrency))
        if pt is None or pt.rps == 0:
            continue
        cell.ratios = {
            "rps": cell.rps / pt.rps,
            "p50": cell.p50_ms / pt.p50_ms,
            "p99": cell.p99_ms / pt.p99_ms,
        }
        if cell.server_cpu_us_per_req and pt.server_cpu_us_per_req:
            # The req/s ratio both would reach if each had the core to itself (CPU-bound).
            cell.ratios["cpu"] = pt.server_cpu_us_per_req / cell.server_cpu_us_per_req
        pt_gc = tuned.get((cell.round, cell.concurrency))
        if pt_gc is not None and pt_gc.rps > 0:
            cell.ratios["rps_gc"] = cell.rps / pt_gc.rps
        if cell.system in GOALS_VS:
            ref = by_system.get((GOALS_VS[cell.system][0], cell.round, cell.concurrency))
            if ref is not None and ref.rps > 0:
                cell.ratios["rps_vs_ref"] = cell.rps / ref.rps


def summarize(runs: list[Cell]) -> Cell:
    """The run with the median req/s (the lower of two); ratios are medians and errors sums over rounds."""
    chosen = replace(sorted(runs, key=lambda c: c.rps)[(len(runs) - 1) // 2])
    chosen.rps_runs = [round(c.rps, 1) for c in runs]
    chosen.rps_ratio_runs = sorted(round(c.ratios["rps"], 3) for c in runs if "rps" in c.ratios)
    chosen.ref_ratio_runs = sorted(round(c.ratios["rps_vs_ref"], 3) for c in runs if "rps_vs_ref" in c.ratios)
    chosen.errors = sum(c.errors for c in runs)
    if all(c.ratios for c in runs):
        chosen.ratios = {k: statistics.median(c.ratios[k] for c in runs if k in c.ratios) for k in chosen.ratios}
    return chosen


def goal_rows(cells: list[Cell]) -> list[dict[str, Any]]:
    rows = []
    for cell in cells:
        if cell.system == "gateway-default" and "rps" in cell.ratios:
            if cell.concurrency not in GOALS_DEFAULT["concurrency"]:
                continue
            against, goal, key, runs = "passthrough", GOALS_DEFAULT["rps"], "rps", cell.rps_ratio_runs
        elif cell.system in GOALS and "rps" in cell.ratios:
            against, goal, key, runs = "passthrough", GOALS[cell.system], "rps", cell.rps_ratio_runs
        elif cell.system in GOALS_VS and "rps_vs_ref" in cell.ratios:
            (against, goal), key, runs = GOALS_VS[cell.system], "rps_vs_ref", cell.ref_ratio_runs
        else:
            continue
        rows.append(
            {
                "system": cell.system,
                "concurrency": cell.concurrency,
                "against": against,
                "goal_rps_ratio": goal,
                "rps_ratio": round(cell.ratios[key], 3),
                "rps_ratio_quartiles": quartiles(runs),
                "cpu_ratio": round(cell.ratios.get("cpu", float("nan")), 3) if key == "rps" else float("nan"),
                "rps_ratio_vs_gc_tuned_passthrough": round(cell.ratios.get("rps_gc", float("nan")), 3),
                "passed": cell.ratios[key] >= goal and cell.errors == 0,
            }
        )
        if cell.system == "gateway-default" and cell.concurrency == max(GOALS_DEFAULT["concurrency"]):
            p99 = cell.ratios.get("p99", float("nan"))
            rows.append(
                {
                    "system": cell.system,
                    "concurrency": cell.concurrency,
                    "against": "passthrough",
                    "goal_p99_ratio": GOALS_DEFAULT["p99"],
                    "p99_ratio": round(p99, 3),
                    "passed": p99 <= GOALS_DEFAULT["p99"] and cell.errors == 0,
                }
            )
    return rows


def quartiles(values: list[float]) -> list[float]:
    """First and third quartile (the middle half of the rounds lies between); [] under 4 rounds."""
    if len(values) < 4:
        return []
    q = statistics.quantiles(values, n=4)
    return [round(q[0], 3), round(q[2], 3)]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(cells: list[Cell], goals: list[dict[str, Any]]) -> None:
    table = Table(title="Gateway overhead (closed loop, loopback, fake upstream)")
    columns = ("system", "conc", "req/s", "× pt", "p50 ms", "× pt", "p99 ms", "× pt", "errors", "esc %")
    for col in (*columns, "CPU µs/req", "pt CPU ÷ CPU", "other load %"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for c in sorted(cells, key=lambda c: (c.concurrency, list(SYSTEM_ORDER).index(c.system))):
        r = c.ratios
        table.add_row(
            c.system,
            str(c.concurrency),
            _fmt(c.rps, 0),
            _fmt(r.get("rps")),
            _fmt(c.p50_ms),
            _fmt(r.get("p50")),
            _fmt(c.p99_ms),
            _fmt(r.get("p99")),
            f"[red]{c.errors}[/red]" if c.errors else "0",
            "-" if c.escalated_fraction is None else f"{c.escalated_fraction * 100:.1f}",
            _fmt(c.server_cpu_us_per_req, 0),
            _fmt(r.get("cpu")),
            _fmt(max(0.0, c.other_load_pct), 0),
        )
    console.print(table)
    console.print(
        "× pt: ratio to the pass-through run just before, same concurrency (median over rounds). "
        "CPU µs/req: the proxy process's CPU per answered request; pt CPU ÷ CPU: the req/s ratio if both were "
        "CPU-bound on a core of their own (steadier on a shared machine). "
        "other load %: CPU used by processes not ours during the cell (noise), % of one core."
    )
    goals_table = Table(title="Goals: gateway req/s as a fraction of the pass-through's (or of the system named)")
    for col in ("system", "conc", "goal", "req/s ratio", "middle half", "result", "CPU-based ratio", "vs GC-tuned pt"):
        goals_table.add_column(col)
    for g in goals:
        if "goal_p99_ratio" in g:
            goals_table.add_row(
                g["system"], str(g["concurrency"]), f"p99 ≤ {g['goal_p99_ratio']:.1f}× pt",
                f"p99 {g['p99_ratio']:.2f}×", "-",
                "[green]pass[/green]" if g["passed"] else "[red]FAIL[/red]", "-", "-",
            )  # fmt: skip
            continue
        goals_table.add_row(
            g["system"],
            str(g["concurrency"]),
            f"≥ {g['goal_rps_ratio']:.2f}" + ("" if g["against"] == "passthrough" else f" × {g['against']}"),
            f"{g['rps_ratio']:.3f}",
            "–".join(f"{q:.2f}" for q in g["rps_ratio_quartiles"]) or "-",
            "[green]pass[/green]" if g["passed"] else "[red]FAIL[/red]",
            "-"
            if math.isnan(g["cpu_ratio"])
            else f"{g['cpu_ratio']:.3f}" + ("" if g["cpu_ratio"] >= g["goal_rps_ratio"] else " (below goal)"),
            f"{g['rps_ratio_vs_gc_tuned_passthrough']:.3f}",
        )
    console.print(goals_table)


# gateway-20%-buffered: the same escalations, on a second gateway with signal.durability
# buffered, so what acknowledged durability (the default) costs is read off one run.
# gateway-20%-postgres: the same escalations, on a third gateway whose signal store is a local
# PostgreSQL server (`signal.url`), run when PostgreSQL is installed (`make postgres`).
# gateway-default: a fourth gateway on the default config but for its upstreams (audits on at
# signal.audit_fraction, active labels, the default threshold), sent the easy prompts only.
SYSTEM_ORDER = (
    "direct",
    "passthrough",
    "passthrough-gc",
    "gateway-default",
    "gateway-0%",
    "gateway-20%",
    "gateway-20%-buffered",
    "gateway-20%-postgres",
)
GC_GEN0_THRESHOLD = 20_000  # the gateway's default (runtime.gc_gen0_threshold), given to passthrough-gc


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gateway_overhead", description=__doc__)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--systems", nargs="+", choices=SYSTEM_ORDER, default=list(SYSTEM_ORDER))
    # Many short rounds, not a few long ones: this machine's speed swings by 2x within tens of
    # seconds, so a ratio needs its two runs close together and enough rounds for a median.
    p.add_argument("--warmup", type=float, default=0.5, help="seconds discarded at the start of each cell")
    p.add_argument("--duration", type=float, default=2.0, help="measured seconds per cell")
    p.add_argument("--repeats", type=int, default=8, help="rounds over all cells; each cell reports its median run")
    p.add_argument(
        "--client",
        choices=["aiohttp", "httpx-aiohttp", "httpx"],
        default="aiohttp",
        help="pass-through's upstream client",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TIERGATE_X__Y=VALUE",
        help="a setting for every gateway, for A/B runs (recorded in the results: not the default config)",
    )
    p.add_argument(
        "--gateway-module", default="gateway", help="module run as the gateway (A/B a patched copy; same flags)"
    )
    p.add_argument("--profile", type=Path, help="run py-spy on the proxy during each cell; stacks go to this folder")
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def pinning(no_pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(servers under test, upstream + load generator): the first two usable cores, else none."""
    cores = sorted(os.sched_getaffinity(0))
    if no_pin or len(cores) < 2:
        return None, None
    return {cores[0]}, {cores[1]}


def environments(logs: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(every process's environment, a gateway's): this one's without TIERGATE_* variables, and
    for a gateway only its signal database in `logs`, no audits and warnings-only logs on top."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    return base_env, base_env | {
        "TIERGATE_SIGNAL__PATH": str(logs / "signal.db"),
        "TIERGATE_SIGNAL__AUDIT_FRACTION": "0",
        "TIERGATE_RUNTIME__LOG_LEVEL": "WARNING",
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server_cpus, load_cpus = pinning(args.no_pin)
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)  # this process is the load generator
    logs = Path(tempfile.mkdtemp(prefix="tiergate-bench-"))
    base_env, gateway_env = environments(logs)
    gateway_env |= dict(kv.split("=", 1) for kv in args.set)
    servers: list[Server] = []
    try:
        with console.status("starting upstream, pass-through and gateway…"):
            upstream = start("upstream", "bench.upstream", [], cpus=load_cpus, logs=logs, env=base_env)
            servers.append(upstream)
            await wait_ready(upstream, "/health")
            v1 = upstream.base + "/v1"
            passthrough = start(
                "passthrough",
                "bench.passthrough",
                ["--upstream", v1, "--client", args.client],
                cpus=server_cpus,
                logs=logs,
                env=base_env,
            )
            passthrough_gc = start(
                "passthrough-gc",
                "bench.passthrough",
                ["--upstream", v1, "--client", args.client, "--gc-gen0-threshold", str(GC_GEN0_THRESHOLD)],
                cpus=server_cpus,
                logs=logs,
                env=base_env,
            )
            gateway_args = ["--student-url", v1, "--teacher-url", v1, "--threshold", str(THRESHOLD)]
            gateway = start("gateway", args.gateway_module, gateway_args, cpus=server_cpus, logs=logs, env=gateway_env)
            buffered_env = gateway_env | {
                "TIERGATE_SIGNAL__PATH": str(logs / "signal-buffered.db"),
                "TIERGATE_SIGNAL__DURABILITY": "buffered",
            }
            buffered = start(
                "gateway-buffered", args.gateway_module, gateway_args, cpus=server_cpus, logs=logs, env=buffered_env
            )
            servers += [passthrough, passthrough_gc, gateway, buffered]
            default = None
            if "gateway-default" in args.systems:
                default_env = base_env | {"TIERGATE_SIGNAL__PATH": str(logs / "signal-default.db")}
                default_env |= dict(kv.split("=", 1) for kv in args.set)
                default = start(
                    "gateway-default", args.gateway_module, ["--student-url", v1, "--teacher-url", v1],
                    cpus=server_cpus, logs=logs, env=default_env,
                )  # fmt: skip
                servers.append(default)
            on_postgres = None
            if "gateway-20%-postgres" in args.systems:
                postgres = start_postgres()
                if postgres is not None:
                    postgres_env = gateway_env | {"TIERGATE_SIGNAL__URL": postgres}
                    on_postgres = start(
                        "gateway-postgres", args.gateway_module, gateway_args, cpus=server_cpus, logs=logs,
                        env=postgres_env,
                    )  # fmt: skip
                    servers.append(on_postgres)
            ready_s = {
                "passthrough": await wait_ready(passthrough, "/health"),
                "passthrough-gc": await wait_ready(passthrough_gc, "/health"),
                "gateway": await wait_ready(gateway, "/health/ready"),
                "gateway-buffered": await wait_ready(buffered, "/health/ready"),
            }
            await check_routing(gateway.base)
            await check_routing(buffered.base)
            if default is not None:
                ready_s["gateway-default"] = await wait_ready(default, "/health/ready")
            if on_postgres is not None:
                ready_s["gateway-postgres"] = await wait_ready(on_postgres, "/health/ready")
                await check_routing(on_postgres.base)
        console.log(
            f"ready: pass-through {ready_s['passthrough']:.1f}s, gateway {ready_s['gateway']:.1f}s; "
            f"pinning servers→{sorted(server_cpus or [])} upstream+load→{sorted(load_cpus or [])}"
        )
        all_systems = {
            "direct": System("direct", v1 + "/chat/completions", 0, None),
            "passthrough": System("passthrough", passthrough.base + "/v1/chat/completions", 0, passthrough.proc.pid),
            "passthrough-gc": System(
                "passthrough-gc", passthrough_gc.base + "/v1/chat/completions", 0, passthrough_gc.proc.pid
            ),
            "gateway-0%": System("gateway-0%", gateway.base + "/v1/chat/completions", 0, gateway.proc.pid),
            "gateway-20%": System("gateway-20%", gateway.base + "/v1/chat/completions", 5, gateway.proc.pid),
            "gateway-20%-buffered": System(
                "gateway-20%-buffered", buffered.base + "/v1/chat/completions", 5, buffered.proc.pid
            ),
        }
        if default is not None:
            all_systems["gateway-default"] = System(
                "gateway-default", default.base + "/v1/chat/completions", 0, default.proc.pid
            )
        if on_postgres is not None:
            all_systems["gateway-20%-postgres"] = System(
                "gateway-20%-postgres", on_postgres.base + "/v1/chat/completions", 5, on_postgres.proc.pid
            )
        systems = [all_systems[name] for name in SYSTEM_ORDER if name in args.systems and name in all_systems]
        pids = {"load": os.getpid(), **{s.name: s.proc.pid for s in servers}}
        runs: dict[tuple[str, int], list[Cell]] = {}
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            overall = progress.add_task("cells", total=len(systems) * len(args.concurrency) * args.repeats)
            # Concurrency inside the round: the systems compared in one ratio run back to back.
            for round_no in range(1, args.repeats + 1):
                for concurrency in args.concurrency:
                    for system in systems:
                        cell = await measure(system, concurrency, round_no, args, pids, progress)
                        runs.setdefault((system.name, concurrency), []).append(cell)
                        progress.advance(overall)
                        progress.console.log(
                            f"[{round_no}/{args.repeats}] {system.name:<12} c={concurrency:<3} {cell.rps:8,.0f} req/s"
                            f"  p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:6.2f} ms  errors {cell.errors}"
                            f"  other load {cell.other_load_pct:3.0f}%"
                        )
                        for sample in cell.error_samples[:2]:
                            progress.console.log(f"[red]  error: {sample}")
        all_runs = [c for rs in runs.values() for c in rs]
        add_ratios(all_runs)
        cells = [summarize(r) for r in runs.values()]
        memory = {s.name: round(rss_mib(s.proc.pid), 1) for s in servers if s.proc.poll() is None}
    except BaseException:
        console.print(f"[red]failed; server logs kept in {logs}")
        raise
    finally:
        stop_all(servers, _postgres.pop() if _postgres else None)
    shutil.rmtree(logs, ignore_errors=True)  # logs and the signal database are only kept on failure
    goals = goal_rows(cells)
    render(cells, goals)
    noisy = [c for c in all_runs if c.other_load_pct > NOISY_PCT]
    if noisy:
        console.print(
            f"[yellow]warning: {len(noisy)} of {len(all_runs)} runs shared the machine with other processes "
            f"using > {NOISY_PCT:.0f}% of a core (max {max(c.other_load_pct for c in noisy):.0f}%); "
            "their req/s and latencies are not trustworthy. CPU µs/req moves least; rerun when the machine is idle."
        )
    return {
        "benchmark": "gateway_overhead",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "git": git_state(),
        "method": {
            "load": "closed loop, aiohttp, one session per cell, keep-alive",
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "repeats": args.repeats,
            "request": "non-streaming chat completion, max_tokens 32, temperature 0, 100 distinct easy prompts",
            "escalation": "gateway-20%: every 5th request's user message contains HARD (upstream logprob -3.0),"
            " each HARD prompt new (a teacher-cache miss)",
            "gateway_settings_not_default": args.set,
            "threshold": THRESHOLD,
            "audit_fraction": 0,
            "gateway_default": "gateway-default runs the default config but for its upstream URLs (audits at"
            " signal.audit_fraction, active labels, router.threshold), sent the easy prompts only",
            "passthrough_client": args.client,
            "passthrough_gc_gen0_threshold": GC_GEN0_THRESHOLD,
            "pinning": {"servers": sorted(server_cpus or []), "upstream_and_load": sorted(load_cpus or [])},
        },
        "ready_s": {k: round(v, 2) for k, v in ready_s.items()},
        "rss_mib": memory,
        "cells": [asdict(c) for c in cells],
        "all_runs": [asdict(c) for c in all_runs],
        "goals": goals,
        "all_goals_met": bool(goals) and all(g["passed"] for g in goals),
        "noisy_runs": len(noisy),
    }


def write_report(report: dict[str, Any], output: Path) -> None:
    """Write the report as JSON, then exit 1 if any of its runs (`all_runs`) had errors."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    console.log(f"wrote {output}")
    if any(c["errors"] for c in report["all_runs"]):
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_report(run_fast(run(args)), args.output)


if __name__ == "__main__":
    main()
