"""`python -m bench.footprint`: start-up time and memory of a remote-only gateway against a bare pass-through.

Each round starts `python -m gateway --student-url U --teacher-url U` (defaults otherwise) and
`python -m bench.passthrough --upstream U` against one fake upstream, one at a time so neither
start-up competes with the other for a core, and records seconds from launch to the ready
endpoint's first 200 and RSS once ready and after a fixed run of requests. No load is timed here;
throughput is `bench.gateway_overhead`'s job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.gateway_overhead import (
    EASY,
    JSON_HEADERS,
    NOISY_PCT,
    PROMPTS,
    CpuSnapshot,
    Server,
    console,
    cpu_seconds,
    git_state,
    machine,
    rss_mib,
    start,
    stop,
    unique_hard_body,
    wait_ready,
)
from bench.upstream import run_fast

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "footprint.json"
GOALS = {"rss_mib": 120.0, "ready_s": 1.5}  # issue 10: a remote-only gateway's ceilings
HARD_EVERY = 5  # every 5th request escalates (upstream logprob -3.0 < the default threshold)
# (system, module, ready path); the pass-through's only health route is /health (bench/passthrough.py).
SYSTEMS = (("gateway", "gateway", "/health/ready"), ("passthrough", "bench.passthrough", "/health"))


@dataclass(frozen=True)
class Sample:
    system: str
    round: int
    ready_s: float  # launch (Popen returned) to the ready endpoint's first 200
    other_load_pct: float  # CPU used by processes not ours while it started, % of one core (noise)
    rss_ready_mib: float  # VmRSS once ready
    rss_after_mib: float  # VmRSS after the requests
    peak_rss_mib: float  # VmHWM after the requests: the most the process ever held
    errors: int  # requests that did not answer 200
    escalated: int | None  # answers with x-tiergate-escalated: true (None: the system has no such header)
    native_packages: list[str]  # installed packages whose shared libraries the process has mapped


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def native_packages(maps: str) -> list[str]:
    """Packages under site-packages with a shared library in a /proc/PID/maps text: numpy, torch…
    A C extension is mapped once its module is imported, so this shows what a process loaded."""
    found = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) == 6 else ""  # anonymous mappings have no path
        if "/site-packages/" in path and ".so" in path:
            top = path.split("/site-packages/", 1)[1].split("/", 1)[0]
            found.add(top.removesuffix(".libs"))
    return sorted(found)


async def send(base: str, n: int) -> tuple[int, int | None]:
    """`n` sequential chat completions (every HARD_EVERY-th one HARD); returns (failed, escalated)."""
    errors, escalated, headed = 0, 0, 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for i in range(n):
            body = unique_hard_body() if i % HARD_EVERY == HARD_EVERY - 1 else EASY[i % PROMPTS]
            async with session.post(base + "/v1/chat/completions", data=body, headers=JSON_HEADERS) as resp:
                await resp.read()
                errors += resp.status != 200
                header = resp.headers.get("x-tiergate-escalated")
                headed += header is not None
                escalated += header == "true"
    return errors, (escalated if headed else None)


async def measure(
    system: str,
    module: str,
    ready_path: str,
    args: list[str],
    round_no: int,
    requests: int,
    logs: Path,
    env: dict[str, str],
    watch: list[int],
) -> Sample:
    """One start of one system. `watch`: our other processes (this one, the upstream), whose CPU
    time is not counted as foreign load."""
    before = CpuSnapshot.take(watch)
    server = start(f"{system}-{round_no}", module, args, cpus=None, logs=logs, env=env)
    try:
        ready_s = await wait_ready(server, ready_path)
        rss_ready = rss_mib(server.proc.pid)
        foreign, _ = CpuSnapshot.take(watch).since(before)
        foreign -= cpu_seconds(server.proc.pid)
        errors, escalated = await send(server.base, requests)
        await asyncio.sleep(0.5)  # let background work (audits, the signal writer) settle
        return Sample(
            system=system,
            round=round_no,
            ready_s=round(ready_s, 3),
            other_load_pct=round(max(0.0, foreign) / ready_s * 100),
            rss_ready_mib=round(rss_ready, 1),
            rss_after_mib=round(rss_mib(server.proc.pid), 1),
            peak_rss_mib=round(peak_rss_mib(server.proc.pid), 1),
            errors=errors,
            escalated=escalated,
            native_packages=native_packages(Path(f"/proc/{server.proc.pid}/maps").read_text()),
        )
    finally:
        stop(server)


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Medians per system, gateway/pass-through ratios of those medians, and the goals."""
    metrics = ("ready_s", "rss_ready_mib", "rss_after_mib", "peak_rss_mib")
    medians = {
        system: {m: round(statistics.median(getattr(s, m) for s in samples if s.system == system), 3) for m in metrics}
        for system, _, _ in SYSTEMS
    }
    gw, pt = medians["gateway"], medians["passthrough"]
    ratios = {m: round(gw[m] / pt[m], 2) for m in metrics if pt[m]}
    rss = max(gw["rss_ready_mib"], gw["rss_after_mib"])
    goals = [
        {"goal": f"gateway RSS ≤ {GOALS['rss_mib']:.0f} MiB", "measured": rss, "passed": rss <= GOALS["rss_mib"]},
        {
            "goal": f"gateway ready ≤ {GOALS['ready_s']} s",
            "measured": gw["ready_s"],
            "passed": gw["ready_s"] <= GOALS["ready_s"],
        },
    ]
    mapped = {system: {p for s in samples if s.system == system for p in s.native_packages} for system, _, _ in SYSTEMS}
    return {
        "medians": medians,
        "ratios": ratios,
        "goals": goals,
        "all_goals_met": all(g["passed"] for g in goals),
        # native libraries the gateway loads and the pass-through does not: where extra RSS comes from
        "native_only_in_gateway": sorted(mapped["gateway"] - mapped["passthrough"]),
    }


def render(summary: dict[str, Any]) -> None:
    gw, pt, r = summary["medians"]["gateway"], summary["medians"]["passthrough"], summary["ratios"]
    console.print(f"{'median':<16}{'gateway':>10}{'pass-through':>14}{'ratio':>8}")
    for key, label in (
        ("ready_s", "ready (s)"),
        ("rss_ready_mib", "RSS ready"),
        ("rss_after_mib", "RSS after"),
        ("peak_rss_mib", "peak RSS"),
    ):
        console.print(f"{label:<16}{gw[key]:>10.2f}{pt[key]:>14.2f}{r.get(key, float('nan')):>7.2f}x")
    console.print(f"native packages only the gateway loads: {', '.join(summary['native_only_in_gateway']) or 'none'}")
    for goal in summary["goals"]:
        mark = "[green]met" if goal["passed"] else "[red]NOT met"
        console.print(f"{goal['goal']}: {goal['measured']} → {mark}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    logs = Path(tempfile.mkdtemp(prefix="tiergate-footprint-"))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    samples: list[Sample] = []
    upstream: Server | None = None
    try:
        console.log("starting the fake upstream")
        upstream = start("upstream", "bench.upstream", [], cpus=None, logs=logs, env=base_env)
        await wait_ready(upstream, "/health")
        v1 = upstream.base + "/v1"
        cli = {"gateway": ["--student-url", v1, "--teacher-url", v1], "passthrough": ["--upstream", v1]}
        for round_no in range(1, args.rounds + 1):
            # Alternate who starts first, so a warmer page cache favours neither system.
            order = SYSTEMS if round_no % 2 else SYSTEMS[::-1]
            for system, module, ready_path in order:
                data = logs / f"data-{system}-{round_no}"  # fresh state: no registry, signal or policies
                env = base_env | {
                    "TIERGATE_SIGNAL__PATH": str(data / "signal.db"),
                    "TIERGATE_DISTILL__REGISTRY_DIR": str(data / "registry"),
                }
                module = args.gateway_module if system == "gateway" else module
                watch = [os.getpid(), upstream.proc.pid]
                sample = await measure(
                    system, module, ready_path, cli[system], round_no, args.requests, logs, env, watch
                )
                samples.append(sample)
                console.log(
                    f"[{round_no}/{args.rounds}] {system:<11} ready {sample.ready_s:4.2f} s "
                    f"(other load {sample.other_load_pct:3.0f}%)  RSS {sample.rss_ready_mib:5.1f} → "
                    f"{sample.rss_after_mib:5.1f} MiB after {args.requests} req (peak {sample.peak_rss_mib:5.1f})  "
                    f"errors {sample.errors}" + ("" if sample.escalated is None else f"  escalated {sample.escalated}")
                )
    except BaseException:
        console.print(f"[red]failed; logs kept in {logs}")
        raise
    finally:
        if upstream is not None:
            stop(upstream)
    shutil.rmtree(logs, ignore_errors=True)
    summary = summarize(samples)
    render(summary)
    noisy = [s for s in samples if s.other_load_pct > NOISY_PCT]
    if noisy:
        console.print(
            f"[yellow]warning: {len(noisy)} of {len(samples)} starts shared the machine with other processes "
            f"using > {NOISY_PCT:.0f}% of a core; their ready times read high. RSS is not affected."
        )
    return {
        "benchmark": "footprint",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "git": git_state(),
        "method": {
            "gateway": "python -m gateway --student-url U --teacher-url U; defaults otherwise (distill loop on, "
            "no trainable student); signal and registry in a fresh temp dir per start",
            "passthrough": "python -m bench.passthrough --upstream U (aiohttp client)",
            "ready": "seconds from Popen to the first 200 on /health/ready (gateway) or /health (pass-through), "
            "polled every 0.1 s; each system starts alone",
            "rss": "VmRSS from /proc once ready and after the requests; peak is VmHWM",
            "requests": args.requests,
            "request": f"sequential non-streaming chat completions, every {HARD_EVERY}th one HARD (escalates)",
            "rounds": args.rounds,
            "gateway_module": args.gateway_module,
        },
        **summary,
        "noisy_starts": len(noisy),
        "samples": [asdict(s) for s in samples],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="starts per system; medians are reported")
    p.add_argument("--requests", type=int, default=200, help="requests sent before the second RSS reading")
    p.add_argument("--gateway-module", default="gateway", help="module run as the gateway (same flags)")
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run_fast(run(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    console.log(f"wrote {args.output}")
    if any(s["errors"] for s in report["samples"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
