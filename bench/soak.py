"""`python -m bench.soak --minutes N`: issue 12's guarantees, together, against one gateway on loopback.

Two fake upstreams (`bench.upstream`, the student with a fixed latency) behind `bench.chaos`
proxies, and `python -m gateway` on the product defaults plus only what the scenario needs
(`SOAK_SETTINGS`). Each cycle: quiet clients (some prompts carrying generated emails, phones,
cards, IBANs), a key flooding at 10x its request limit with a small teacher budget, a client that
disconnects from escalating requests, and a fault schedule (`PHASES`); then `kill -9`, integrity
check, every acknowledged escalation looked up in the database, and a restart. At the end the
database, its WAL, the spill file and the gateway logs are scanned for the raw identifiers. It
exits 1 when an invariant fails. It does not stream, run models, or exercise the distillation loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.markup import escape
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from stdnum import iban, luhn

from bench.chaos import ChaosProxy
from bench.gateway_overhead import Server, console, git_state, machine, rss_mib, start, stop, wait_ready
from bench.upstream import run_fast
from models.progress import Progress

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "soak.json"
QUIET_KEY, FLOOD_KEY, ADMIN_KEY = "quiet-key", "flood-key", "soak-admin"
THRESHOLD = 0.5  # "HARD" prompts (upstream logprob -3.0) escalate, the rest stay on the student
STUDENT_LATENCY_MS = 200  # a model's generation time: what makes the student's admission a bottleneck
STUDENT_MAX_INFLIGHT = 40  # above the 16 quiet + 1 dropping + hung flood calls; 200/s with the latency
FLOOD_LIMITS = {"requests_per_minute": 30, "teacher_usd_per_day": 0.005}  # about 27 teacher calls
FLOOD_RPS = 5.0  # 10x its request limit
BURST_RPS = 500.0  # open loop, 2.5x the student's admission (40 slots / 0.2 s)
QUIET_CLIENTS, HARD_SHARE, PII_SHARE = 16, 0.3, 0.25
SOAK_SETTINGS = {  # everything set on top of the product defaults
    "router.threshold": THRESHOLD,
    "server.api_keys": [QUIET_KEY, FLOOD_KEY],
    "server.admin_api_key": ADMIN_KEY,
    "signal.path": "<tmp>/signal.db",
    "guard.student.max_inflight": STUDENT_MAX_INFLIGHT,
    f"limits.tenants.<{FLOOD_KEY}> (PUT /admin/limits)": FLOOD_LIMITS,
}
# (phase, seconds in a 90 s cycle, student proxy, teacher proxy); --cycle-s scales the seconds.
PHASES = (
    ("teacher_down", 10, "up", "down"),
    ("teacher_hung", 25, "up", "hang"),  # past the breaker's stall_s (20 s)
    ("healthy", 10, "up", "up"),  # the teacher's breaker closes again (open_s 5 s, then a probe)
    ("burst", 10, "up", "up"),  # open loop for its first 60 %, then until every burst request is answered
    ("student_hung", 25, "hang", "up"),
    ("healthy_end", 10, "up", "up"),  # the student's breaker closes again; then kill -9
)
FULL_CYCLE_S = sum(p[1] for p in PHASES)


def key_id(key: str) -> str:
    """A key's tenant id, as docs/api.md defines it (gateway.routes.key_id)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


# -- identifiers -------------------------------------------------------------------------------
def identifier(rng: random.Random) -> tuple[str, list[str]]:
    """A generated identifier as written in a prompt, and the byte forms a scan looks for."""
    kind, n = rng.choice(("email", "phone", "card", "iban")), rng.randrange(10**8)
    if kind == "email":
        text = f"jane.doe{n}@example.com"
        return text, [text]
    if kind == "phone":
        text = f"+44 20 7946 0{n % 1000:03d}"  # Ofcom's drama range: valid, never a real line
        return text, [text, text.replace(" ", "")]
    if kind == "card":
        body = "4" + f"{n:08d}" + f"{rng.randrange(10**6):06d}"
        digits = body + luhn.calc_check_digit(body)
        written = " ".join(digits[i : i + 4] for i in range(0, 16, 4))
        return written, [written, digits]
    bban = f"WEST{rng.randrange(10**6):06d}{n:08d}"
    compact = f"GB{iban.calc_check_digits('GB00' + bban)}{bban}"
    spaced = " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))
    return spaced, [compact, spaced]


def scan(paths: list[Path], raw: set[str]) -> dict[str, int]:
    """How many raw identifiers each file holds, read as bytes."""
    if not raw:
        return {}
    pattern = re.compile(b"|".join(re.escape(r.encode()) for r in sorted(raw, key=len, reverse=True)))
    return {p.name: len(pattern.findall(p.read_bytes())) for p in paths if p.exists()}


# -- load --------------------------------------------------------------------------------------
@dataclass
class Result:
    group: str  # quiet | flood | burst | dropper
    phase: str  # the phase it started in
    status: int  # 0: no answer (connection error or the client's own timeout)
    latency_s: float
    acked_id: str | None = None  # an escalation the teacher answered: its record must be committed
    escalated: bool = False
    detail: str = ""  # 200: the routing reason; else the error code, or the exception's name


@dataclass
class Cycle:
    """What one gateway lifetime saw."""

    phase: str = "start"
    running: bool = True
    results: list[Result] = field(default_factory=list)
    ready: list[tuple[float, dict[str, str]]] = field(default_factory=list)  # (t, breakers) polls
    marks: dict[str, tuple[float, float]] = field(default_factory=dict)  # phase -> (start, end)


async def call(session: aiohttp.ClientSession, cyc: Cycle, base: str, group: str, key: str, text: str,
               timeout_s: float = 90.0) -> None:  # fmt: skip
    body = {"model": "tiered", "messages": [{"role": "user", "content": text}], "max_tokens": 32, "temperature": 0}
    phase, began = cyc.phase, time.perf_counter()
    headers = {"authorization": f"Bearer {key}"}
    try:
        async with session.post(base + "/v1/chat/completions", json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:  # fmt: skip
            raw = await resp.read()
            h = resp.headers
            escalated = h.get("x-tiergate-escalated") == "true"
            acked = h.get("x-tiergate-request-id") if escalated and h.get("x-tiergate-tier") == "teacher" else None
            code = h.get("x-tiergate-reason", "") if resp.status == 200 else json.loads(raw)["error"]["code"]
            result = Result(group, phase, resp.status, time.perf_counter() - began, acked, escalated, code)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        result = Result(group, phase, 0, time.perf_counter() - began, detail=type(exc).__name__)
    if cyc.phase == "kill" and result.status == 0:
        result.phase = "kill"  # cut off by the kill itself: not a failure
    cyc.results.append(result)


def prompt(rng: random.Random, n: int, hard: bool, pii: set[str] | None) -> str:
    text = f"Order #{n}: can I change the delivery address?"
    if pii is not None and rng.random() < PII_SHARE:
        written, forms = identifier(rng)
        pii.update(forms)
        text += f" Reach me at {written}."
    return text + (" HARD question." if hard else " simple question.")


async def quiet_client(cyc: Cycle, base: str, seed: int, pii: set[str]) -> None:
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as session:
        while cyc.running:
            await call(
                session,
                cyc,
                base,
                "quiet",
                QUIET_KEY,
                prompt(rng, rng.randrange(10**5), rng.random() < HARD_SHARE, pii),
            )
            await asyncio.sleep(rng.uniform(0.05, 0.2))


async def dropping_client(cyc: Cycle, base: str) -> None:
    """Escalating requests given up after 0.1 s, while the student (0.2 s) is still drafting."""
    async with aiohttp.ClientSession() as session:
        while cyc.running:
            await call(session, cyc, base, "dropper", QUIET_KEY, prompt(random.Random(), 0, True, None), 0.1)
            await asyncio.sleep(0.4)


async def open_loop(cyc: Cycle, base: str, group: str, key: str, rps: float, hard: bool, until: float) -> None:
    """`rps` requests a second, each sent whether or not the ones before have answered."""
    pending: set[asyncio.Task[None]] = set()
    rng = random.Random(group)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        began, sent = time.perf_counter(), 0
        while cyc.running and time.perf_counter() < until:
            while sent < (time.perf_counter() - began) * rps:
                task = asyncio.create_task(call(session, cyc, base, group, key, prompt(rng, sent, hard, None), 30))
                pending.add(task)
                task.add_done_callback(pending.discard)
                sent += 1
            await asyncio.sleep(0.005)
        if pending:
            await asyncio.wait(pending)


async def poll_ready(cyc: Cycle, base: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        while cyc.running:
            try:
                async with session.get(base + "/health/ready") as resp:
                    cyc.ready.append((time.perf_counter(), (await resp.json())["breakers"]))
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                pass
            await asyncio.sleep(0.25)


async def admin(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, base + path, json=body, headers={"authorization": f"Bearer {ADMIN_KEY}"}) as resp,
    ):
        resp.raise_for_status()
        out: dict[str, Any] = await resp.json()
        return out


async def metric(base: str, name: str, labels: str = "") -> float:
    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and labels in line and not line.startswith("#"))  # fmt: skip


# -- one cycle ---------------------------------------------------------------------------------
def breaker_episodes(cyc: Cycle) -> list[dict[str, Any]]:
    """Per fault phase: whether its tier's breaker opened, after how long, and how long after the
    fault ended it was closed again (from the /health/ready polls)."""
    out = []
    for phase, tier in (("teacher_down", "teacher"), ("teacher_hung", "teacher"), ("student_hung", "student")):
        start_t, end_t = cyc.marks[phase]
        opened = next((t for t, b in cyc.ready if start_t <= t <= end_t and b.get(tier) == "open"), None)
        closed = next((t for t, b in cyc.ready if t >= end_t and b.get(tier) == "closed"), None)
        out.append({
            "fault": phase,
            "opened": opened is not None,
            "open_after_s": None if opened is None else round(opened - start_t, 1),
            "closed_after_fault_s": None if opened is None or closed is None else round(closed - end_t, 1),
        })  # fmt: skip
    return out


def phase_stats(results: list[Result]) -> dict[str, Any]:
    ok = sorted(r.latency_s for r in results if r.status == 200)
    q = statistics.quantiles(ok, n=100) if len(ok) > 1 else ok * 99
    return {
        "requests": len(results),
        "ok": len(ok),
        "shed_503": sum(r.detail == "overloaded" for r in results),
        "failures": Counter(r.detail for r in results if r.status != 200),
        "p50_ms": round(q[49] * 1000, 1) if ok else None,
        "p99_ms": round(q[98] * 1000, 1) if ok else None,
    }


def check_database(db: Path, acked: list[str]) -> dict[str, Any]:
    with sqlite3.connect(db) as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        found = {row[0] for i in range(0, len(acked), 500)
                 for row in conn.execute(f"SELECT id FROM signal WHERE id IN ({','.join('?' * len(acked[i:i + 500]))})",
                                         acked[i : i + 500])}  # fmt: skip
        records = conn.execute("SELECT count(*) FROM signal").fetchone()[0]
    conn.close()
    missing = [a for a in acked if a not in found]
    return {"integrity": integrity, "acked": len(acked), "acked_missing": len(missing),
            "missing_ids": missing[:5], "records_total": records}  # fmt: skip


async def run_cycle(
    no: int, gw: Server, proxies: dict[str, ChaosProxy], cycle_s: float, pii: set[str], progress: Progress, task: Any
) -> dict[str, Any]:
    cyc, base = Cycle(), gw.base
    scale = cycle_s / FULL_CYCLE_S
    loops = [quiet_client(cyc, base, no * 100 + i, pii) for i in range(QUIET_CLIENTS)]
    flooding = open_loop(cyc, base, "flood", FLOOD_KEY, FLOOD_RPS, True, float("inf"))
    workers = [asyncio.create_task(c) for c in (*loops, flooding, dropping_client(cyc, base), poll_ready(cyc, base))]
    burst: asyncio.Task[None] | None = None
    for name, seconds, student_mode, teacher_mode in PHASES:
        for tier, mode in (("student", student_mode), ("teacher", teacher_mode)):
            if proxies[tier].mode != mode:  # any change cuts open connections, as a restart would
                proxies[tier].set(mode)
        cyc.phase, began = name, time.perf_counter()
        if name == "burst":
            until = began + 0.6 * seconds * scale
            burst = asyncio.create_task(open_loop(cyc, base, "burst", QUIET_KEY, BURST_RPS, False, until))
        while (left := began + seconds * scale - time.perf_counter()) > 0:
            progress.update(task, description=f"cycle {no} {name}", advance=min(left, 0.5))
            await asyncio.sleep(min(left, 0.5))
        if burst is not None and not burst.done():
            await burst  # every burst request answered before the next fault, so none is cut by it
        cyc.marks[name] = (began, time.perf_counter())
    usage = await admin(base, "GET", f"/admin/limits?tenant={key_id(FLOOD_KEY)}")
    disconnects = await metric(base, "tiergate_client_disconnects_total")
    shed_metric = await metric(base, "tiergate_shed_total", 'tier="student"')
    rss = rss_mib(gw.proc.pid)
    cyc.phase = "kill"
    os.kill(gw.proc.pid, signal.SIGKILL)  # under load: whatever was acknowledged must be on disk
    gw.proc.wait()
    cyc.running = False
    await asyncio.gather(*workers)

    def by(group: str, phase: str | None = None) -> list[Result]:
        return [r for r in cyc.results if r.group == group and (phase is None or r.phase == phase)]

    quiet = {name: phase_stats(by("quiet", name)) for name, *_ in PHASES}
    flood = by("flood")
    spent, budget = usage["usage"].get("teacher_usd_today", 0.0), usage["limits"]["teacher_usd_per_day"]
    return {
        "cycle": no,
        "quiet": quiet,
        "quiet_failures_outside_burst": sum(r.status != 200 for r in by("quiet") if r.phase not in ("burst", "kill"))
        + sum(r.status not in (200, 503) for r in by("quiet", "burst")),
        "cut_by_kill": sum(r.phase == "kill" for r in cyc.results),
        "burst": {
            **phase_stats(by("burst")),
            "escalated": Counter(r.detail for r in by("burst") if r.escalated),
            "student_shed_metric": shed_metric,
        },  # fmt: skip
        "flood": {
            "requests": len(flood),
            "rate_limited_429": sum(r.detail == "rate_limit_exceeded" for r in flood),
            "ok": sum(r.status == 200 for r in flood),
            "teacher_usd": round(spent, 6),
            "budget_usd": budget,
            "limits": usage["limits"],
        },  # fmt: skip
        "dropper": {"gave_up": sum(r.status == 0 for r in by("dropper")), "disconnects_metric": disconnects},
        "breakers": breaker_episodes(cyc),
        "rss_mib": round(rss, 1),
        "acked_ids": [r.acked_id for r in cyc.results if r.acked_id],
        "failure_samples": [
            f"{r.group}/{r.phase}: {r.status} {r.detail}"
            for r in cyc.results
            if r.status != 200 and r.group == "quiet" and r.phase != "kill"
        ][:5],  # fmt: skip
    }


# -- main --------------------------------------------------------------------------------------
async def soak(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tiergate-soak-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")} | {
        "TIERGATE_SERVER__API_KEYS": json.dumps([QUIET_KEY, FLOOD_KEY]),
        "TIERGATE_SERVER__ADMIN_API_KEY": ADMIN_KEY,
        "TIERGATE_SIGNAL__PATH": str(work / "signal.db"),
        "TIERGATE_GUARD__STUDENT__MAX_INFLIGHT": str(STUDENT_MAX_INFLIGHT),
    }
    cycles_n = max(1, round(args.minutes * 60 / args.cycle_s))
    upstreams = [start("student-upstream", "bench.upstream", ["--latency-ms", str(STUDENT_LATENCY_MS)], cpus=None,
                       logs=work, env=env),
                 start("teacher-upstream", "bench.upstream", [], cpus=None, logs=work, env=env)]  # fmt: skip
    servers: list[Server] = list(upstreams)
    cycles, pii, limits_kept = [], set[str](), []
    stack = contextlib.ExitStack()
    try:
        for up in upstreams:
            await wait_ready(up, "/health")
        proxies = {"student": stack.enter_context(ChaosProxy(upstreams[0].base)),
                   "teacher": stack.enter_context(ChaosProxy(upstreams[1].base))}  # fmt: skip
        gw_args = ["--threshold", str(THRESHOLD), "--student-url", proxies["student"].url + "/v1",
                   "--teacher-url", proxies["teacher"].url + "/v1"]  # fmt: skip
        columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("starting", total=cycles_n * args.cycle_s)
            for no in range(1, cycles_n + 1):
                gw = start(f"gateway-{no}", "gateway", gw_args, cpus=None, logs=work, env=env)
                servers.append(gw)
                await wait_ready(gw, "/health/ready")
                if no == 1:
                    await admin(gw.base, "PUT", "/admin/limits", {"tenant": key_id(FLOOD_KEY), **FLOOD_LIMITS})
                else:  # set once, before the first kill: it must have survived it
                    got = (await admin(gw.base, "GET", f"/admin/limits?tenant={key_id(FLOOD_KEY)}"))["limits"]
                    limits_kept.append(all(got[k] == v for k, v in FLOOD_LIMITS.items()))
                cycle = await run_cycle(no, gw, proxies, args.cycle_s, pii, progress, task)
                files = [work / n for n in ("signal.db", "signal.db-wal", "signal.spill.jsonl")] + [gw.log_path]
                cycle["raw_identifiers_after_kill"] = scan(files, pii)  # before sqlite replays the WAL
                cycle["database"] = check_database(work / "signal.db", cycle.pop("acked_ids"))
                cycles.append(cycle)
                progress.console.log(summary_line(cycle))
        gw = start("gateway-final", "gateway", gw_args, cpus=None, logs=work, env=env)  # recovers after the last kill
        servers.append(gw)
        await wait_ready(gw, "/health/ready")
        stop(gw)  # a clean stop flushes; then the final scan covers everything written
        final_files = [work / n for n in ("signal.db", "signal.db-wal", "signal.spill.jsonl")]
        final_scan = scan(final_files + sorted(work.glob("gateway-*.log")), pii)
    except BaseException:
        console.print(f"[red]failed; logs and database kept in {work}")
        raise
    finally:
        stack.close()
        for server in reversed(servers):
            stop(server)
    checks = invariants(cycles, final_scan, limits_kept)
    if all(c["passed"] for c in checks):
        shutil.rmtree(work, ignore_errors=True)
    else:
        console.print(f"[red]invariant failed; logs and database kept in {work}")
    return {
        "benchmark": "soak",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "git": git_state(),
        "method": {
            "cycles": cycles_n,
            "cycle_s": args.cycle_s,
            "phases": [[n, round(s * args.cycle_s / FULL_CYCLE_S, 1), st, te] for n, s, st, te in PHASES],
            "quiet_clients": QUIET_CLIENTS,
            "hard_share": HARD_SHARE,
            "pii_share": PII_SHARE,
            "student_latency_ms": STUDENT_LATENCY_MS,
            "flood_rps": FLOOD_RPS,
            "burst_rps": BURST_RPS,
        },  # fmt: skip
        "settings": SOAK_SETTINGS,
        "raw_identifiers_written": len(pii),
        "raw_identifiers_found": final_scan,
        "flood_limits_survived_restart": limits_kept,
        "cycles": cycles,
        "invariants": checks,
        "all_passed": all(c["passed"] for c in checks),
    }


def invariants(
    cycles: list[dict[str, Any]], final_scan: dict[str, int], limits_kept: list[bool]
) -> list[dict[str, Any]]:
    def check(name: str, value: Any, passed: bool) -> dict[str, Any]:
        return {"name": name, "value": value, "passed": bool(passed)}

    quiet = [c["quiet_failures_outside_burst"] for c in cycles]
    missing = [c["database"]["acked_missing"] for c in cycles]
    integrity = [c["database"]["integrity"] for c in cycles]
    spend = [(c["flood"]["teacher_usd"], c["flood"]["budget_usd"]) for c in cycles]
    raw = sum(final_scan.values()) + sum(sum(c["raw_identifiers_after_kill"].values()) for c in cycles)
    return [
        check("quiet-key failures outside the burst", quiet, not any(quiet)),
        check("acknowledged escalations missing after kill -9", missing, not any(missing)),
        check("PRAGMA integrity_check", integrity, all(i == "ok" for i in integrity)),
        check("flood teacher spend within budget (USD)", spend, all(s <= b for s, b in spend)),
        check("raw identifiers at rest", raw, raw == 0),
        check(
            "burst answers escalated (an overloaded student never escalates)",
            [c["burst"]["escalated"] for c in cycles],
            not any(c["burst"]["escalated"] for c in cycles),
        ),  # fmt: skip
        check("flood limits survived restarts", limits_kept, all(limits_kept)),
    ]


def summary_line(c: dict[str, Any]) -> str:
    db, fl = c["database"], c["flood"]
    return (f"cycle {c['cycle']}: quiet failures {c['quiet_failures_outside_burst']}, shed {c['burst']['shed_503']}, "
            f"429 {fl['rate_limited_429']}, spend {fl['teacher_usd']}/{fl['budget_usd']}, acked {db['acked']} "
            f"missing {db['acked_missing']}, integrity {db['integrity']}, RSS {c['rss_mib']} MiB")  # fmt: skip


def render(report: dict[str, Any]) -> None:
    table = Table(title="Soak: quiet key per phase (all cycles)")
    for col in ("phase", "requests", "ok", "failures", "shed 503", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for name, *_ in PHASES:
        rows = [c["quiet"][name] for c in report["cycles"]]
        fails: Counter[str] = sum((r["failures"] for r in rows), Counter())
        table.add_row(name, str(sum(r["requests"] for r in rows)), str(sum(r["ok"] for r in rows)),
                      ", ".join(f"{k} {v}" for k, v in fails.items()) or "0", str(sum(r["shed_503"] for r in rows)),
                      "/".join(str(r["p50_ms"]) for r in rows), "/".join(str(r["p99_ms"]) for r in rows))  # fmt: skip
    console.print(table)
    cyc = Table(title="Soak: per cycle")
    for col in ("cycle", "burst shed", "flood 429", "flood spend / budget $", "breakers (open after / closed after, s)",
                "disconnects (gave up / metric)", "acked / missing", "integrity", "RSS MiB"):  # fmt: skip
        cyc.add_column(col, justify="right")
    for c in report["cycles"]:
        br = "; ".join(f"{b['fault']} {b['open_after_s']}/{b['closed_after_fault_s']}" for b in c["breakers"])
        cyc.add_row(str(c["cycle"]), f"{c['burst']['shed_503']}/{c['burst']['requests']}",
                    f"{c['flood']['rate_limited_429']}/{c['flood']['requests']}",
                    f"{c['flood']['teacher_usd']:.5f} / {c['flood']['budget_usd']}", br,
                    f"{c['dropper']['gave_up']} / {c['dropper']['disconnects_metric']:.0f}",
                    f"{c['database']['acked']} / {c['database']['acked_missing']}", c["database"]["integrity"],
                    str(c["rss_mib"]))  # fmt: skip
    console.print(cyc)
    inv = Table(title="Soak: invariants")
    for col in ("invariant", "value", "result"):
        inv.add_column(col)
    for c in report["invariants"]:
        inv.add_row(
            c["name"], escape(json.dumps(c["value"])), "[green]pass[/green]" if c["passed"] else "[red]FAIL[/red]"
        )
    console.print(inv)
    console.print("Settings on top of the product defaults: " + json.dumps(report["settings"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    p.add_argument("--minutes", type=float, default=3.0, help="how long to soak; cycles = minutes x 60 / cycle-s")
    p.add_argument("--cycle-s", type=float, default=float(FULL_CYCLE_S), help="one cycle's length; phases scale")
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run_fast(soak(args))
    render(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.log(f"wrote {args.output}")
    if not report["all_passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
