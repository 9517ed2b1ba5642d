"""`python -m bench.local_throughput`: in-process student throughput as concurrent callers grow,
and a stream's time to first token alone and behind a running long generation.

Calls `models.local.LocalBackend` directly (no HTTP, no gateway): N closed-loop callers of
`generate`, greedy, fixed `max_tokens` and requests per cell, reporting tokens/s, req/s and the
ratio to one caller; then rounds of one `stream`'s time to first token (TTFT) alone against the
same stream arriving while a 128-token request runs. It does not measure sampling or long prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.gateway_overhead import busy_seconds
from models import BackendConfig, ChatMessage, SamplingParams
from models.local import LocalBackend
from models.progress import Progress

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "local_throughput.json"
GOAL_RATIO = 4.0  # tokens/s at the highest concurrency over tokens/s at one caller
GOAL_TTFT_RATIO = 2.0  # TTFT behind a running long request over TTFT alone, at most
# Asks for more than 128 tokens of answer, so the request ahead runs to its max_tokens.
LONG_PROMPT = (
    "Write a detailed, step-by-step guide of at least 600 words on how to return an item, "
    "get a refund, and what to do if the refund is late."
)

_TOPICS = (
    "change the delivery address of my order",
    "get a refund for a damaged item",
    "reset my account password",
    "cancel my subscription",
    "track a parcel that is late",
    "update the card on file",
    "return shoes that do not fit",
    "use two discount codes at once",
)
_FORMS = (
    "How do I {}?",
    "Can you tell me how to {}?",
    "I need to {}. What are the steps?",
    "Is it possible to {} after the order shipped?",
    "What is the fastest way to {}?",
)
# 40 distinct prompts of different lengths, so batches really are padded and varied.
PROMPTS = tuple(form.format(topic) for topic in _TOPICS for form in _FORMS)

# Wide enough for the results table when output is piped to a file.
console = Console(width=None if sys.stdout.isatty() else 140)


@dataclass
class Cell:
    concurrency: int
    requests: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    requests_per_s: float
    p50_latency_s: float
    max_latency_s: float
    batches: int  # batches the owner thread started for this cell (one runs until no row is left)
    mean_batch: float  # rows per decode step (requests join and leave a running batch)
    other_load_pct: float  # CPU used by other processes during the cell, % of one core (noise)
    tokens_ratio_to_1: float = float("nan")
    requests_ratio_to_1: float = float("nan")


async def run_cell(
    backend: LocalBackend, concurrency: int, n_requests: int, params: SamplingParams, progress: Progress
) -> Cell:
    """Closed loop: each of `concurrency` callers sends its next request when the last returns."""
    task = progress.add_task(f"  concurrency {concurrency}", total=n_requests)
    pending = iter(range(n_requests))
    latencies: list[float] = []
    tokens = 0
    batches_before, steps_before, rows_before = backend.batches_run, backend.steps_run, backend.rows_stepped
    busy_before, ours_before = busy_seconds(), time.process_time()

    async def caller() -> None:
        nonlocal tokens
        for i in pending:
            messages = (ChatMessage("user", PROMPTS[(i * 7 + concurrency) % len(PROMPTS)]),)
            t0 = time.perf_counter()
            gen = await backend.generate(messages, params)
            latencies.append(time.perf_counter() - t0)
            tokens += gen.usage.completion_tokens
            progress.advance(task)

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    wall = time.perf_counter() - began
    other = (busy_seconds() - busy_before) - (time.process_time() - ours_before)
    progress.remove_task(task)
    batches, steps = backend.batches_run - batches_before, backend.steps_run - steps_before
    return Cell(
        concurrency=concurrency,
        requests=n_requests,
        completion_tokens=tokens,
        wall_s=round(wall, 3),
        tokens_per_s=tokens / wall,
        requests_per_s=n_requests / wall,
        p50_latency_s=statistics.median(latencies),
        max_latency_s=max(latencies),
        batches=batches,
        mean_batch=(backend.rows_stepped - rows_before) / steps if steps else float("nan"),
        other_load_pct=max(0.0, other / wall * 100),
    )


@dataclass
class TtftRound:
    alone_s: float  # the short stream's time to first token on an idle backend
    behind_s: float  # the same stream's, sent `behind_after_s` after the long request was
    long_tokens: int  # completion tokens of the request ahead
    long_running_at_first_token: bool  # the long request had not finished when the stream's first token came


async def first_token_s(backend: LocalBackend, messages: tuple[ChatMessage, ...], params: SamplingParams) -> float:
    """Seconds from calling `stream` to its first delta; the rest of the stream is read too."""
    began = time.perf_counter()
    first: float | None = None
    async for _ in backend.stream(messages, params):
        if first is None:
            first = time.perf_counter() - began
    assert first is not None
    return first


async def ttft_round(
    backend: LocalBackend, i: int, params: SamplingParams, long_tokens: int, behind_after_s: float
) -> TtftRound:
    """One short stream alone, then the same stream sent `behind_after_s` after a long request."""
    short = (ChatMessage("user", PROMPTS[(i * 11) % len(PROMPTS)]),)
    alone = await first_token_s(backend, short, params)
    long_params = SamplingParams(max_tokens=long_tokens, temperature=0.0)
    long_done = asyncio.Event()

    async def long_request() -> int:
        gen = await backend.generate((ChatMessage("user", LONG_PROMPT),), long_params)
        long_done.set()
        return gen.usage.completion_tokens

    ahead = asyncio.create_task(long_request())
    await asyncio.sleep(behind_after_s)
    behind = await first_token_s(backend, short, params)
    running = not long_done.is_set()
    return TtftRound(alone, behind, await ahead, running)


def render(cells: list[Cell], goal: dict[str, Any]) -> None:
    table = Table(title="In-process student throughput (LocalBackend.generate, closed loop)")
    columns = ("callers", "requests", "tokens", "wall s", "tok/s", "× c=1", "req/s", "× c=1", "p50 s", "rows/step")
    for col in (*columns, "other load %"):
        table.add_column(col, justify="right")
    for c in cells:
        table.add_row(
            str(c.concurrency),
            str(c.requests),
            str(c.completion_tokens),
            f"{c.wall_s:.1f}",
            f"{c.tokens_per_s:.1f}",
            f"{c.tokens_ratio_to_1:.2f}",
            f"{c.requests_per_s:.2f}",
            f"{c.requests_ratio_to_1:.2f}",
            f"{c.p50_latency_s:.2f}",
            f"{c.mean_batch:.1f}",
            f"{c.other_load_pct:.0f}",
        )
    console.print(table)
    console.print("other load %: CPU used by processes not ours during the cell (noise), % of one core.")
    verdict = "[green]pass[/green]" if goal["passed"] else "[red]FAIL[/red]"
    console.print(
        f"Goal: tokens/s at {goal['concurrency']} callers ≥ {goal['goal_ratio']:.1f}× one caller's: "
        f"measured {goal['ratio']:.2f}× → {verdict}"
    )


def render_ttft(ttft: dict[str, Any]) -> None:
    table = Table(
        title=f"Time to first token: alone vs {ttft['behind_after_s']} s behind a {ttft['long_tokens']}-token request"
    )
    for col in ("round", "alone s", "behind s", "× alone", "tokens ahead", "ahead still running"):
        table.add_column(col, justify="right")
    for n, r in enumerate(ttft["rounds"], 1):
        table.add_row(
            str(n),
            f"{r['alone_s']:.3f}",
            f"{r['behind_s']:.3f}",
            f"{r['behind_s'] / r['alone_s']:.1f}",
            str(r["long_tokens"]),
            "yes" if r["long_running_at_first_token"] else "no",
        )
    console.print(table)
    verdict = "[green]pass[/green]" if ttft["passed"] else "[red]FAIL[/red]"
    console.print(
        f"Goal: median TTFT behind ≤ {ttft['goal_ratio']:.1f}× median TTFT alone: "
        f"{ttft['median_behind_s']:.3f} s vs {ttft['median_alone_s']:.3f} s = {ttft['ratio']:.2f}× → {verdict}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.local_throughput", description=__doc__)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--model", default="smollm2-135m-instruct", help="bundled model name or transformers folder")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default=BackendConfig().dtype)
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16], help="none: skip the throughput cells")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests-per-caller", type=int, default=4, help="requests per cell = this × callers")
    p.add_argument("--min-requests", type=int, default=8, help="at least this many requests per cell")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--ttft-rounds", type=int, default=3, help="TTFT alone/behind rounds; 0 skips them")
    p.add_argument("--long-tokens", type=int, default=128, help="max_tokens of the request ahead")
    p.add_argument("--behind-after", type=float, default=0.5, help="seconds between the long request and the stream")
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)  # one thread is fastest on a busy 2-core machine
    biggest = max(args.concurrency, default=1)
    # Batching settings stay at their shipped defaults: this measures what the gateway runs.
    config = BackendConfig(kind="local", model=args.model, device=args.device, dtype=args.dtype)
    backend = LocalBackend(config)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    with console.status(f"loading {args.model} on {args.device}…"):
        began = time.perf_counter()
        await backend.start()
        load_s = time.perf_counter() - began
    info = backend.info
    console.log(f"loaded {info.name} ({info.detail}) in {load_s:.1f}s; torch threads {torch.get_num_threads()}")
    cells: list[Cell] = []
    rounds: list[TtftRound] = []
    try:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            warm = progress.add_task("warm-up (discarded)", total=2)
            # First calls pay for lazy init and new shapes; one single and one full batch.
            await backend.generate((ChatMessage("user", PROMPTS[0]),), params)
            progress.advance(warm)
            await asyncio.gather(
                *(backend.generate((ChatMessage("user", PROMPTS[i % len(PROMPTS)]),), params) for i in range(biggest))
            )
            progress.advance(warm)
            progress.remove_task(warm)
            for concurrency in args.concurrency:
                n = max(args.min_requests, args.requests_per_caller * concurrency)
                cell = await run_cell(backend, concurrency, n, params, progress)
                cells.append(cell)
                progress.console.log(
                    f"concurrency {concurrency:>2}: {cell.tokens_per_s:7.1f} tok/s  {cell.requests_per_s:6.2f} req/s"
                    f"  p50 {cell.p50_latency_s:5.2f} s  rows/step {cell.mean_batch:4.1f}"
                    f"  other load {cell.other_load_pct:3.0f}%"
                )
            task = progress.add_task("  TTFT alone / behind", total=args.ttft_rounds)
            for i in range(args.ttft_rounds):
                rounds.append(await ttft_round(backend, i, params, args.long_tokens, args.behind_after))
                progress.advance(task)
            progress.remove_task(task)
    finally:
        await backend.aclose()
    report: dict[str, Any] = {
        "benchmark": "local_throughput",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        },
        "method": {
            "model": args.model,
            "device": info.detail.get("device", args.device),
            "dtype": info.detail.get("dtype", args.dtype),
            "torch_threads": torch.get_num_threads(),
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "max_batch_size": config.max_batch_size,
            "batch_wait_ms": config.batch_wait_ms,
            "load": "closed loop, N asyncio callers of LocalBackend.generate, one shared request counter",
            "requests_per_cell": f"max({args.min_requests}, {args.requests_per_caller} × callers)",
            "prompts": f"{len(PROMPTS)} distinct short customer-support questions",
        },
        "load_s": round(load_s, 2),
    }
    if cells:
        base = next((c for c in cells if c.concurrency == 1), cells[0])
        for c in cells:
            c.tokens_ratio_to_1 = c.tokens_per_s / base.tokens_per_s
            c.requests_ratio_to_1 = c.requests_per_s / base.requests_per_s
        top = max(cells, key=lambda c: c.concurrency)
        goal = {
            "concurrency": top.concurrency,
            "goal_ratio": GOAL_RATIO,
            "ratio": round(top.tokens_ratio_to_1, 3),
            "passed": top.tokens_ratio_to_1 >= GOAL_RATIO,
        }
        render(cells, goal)
        report |= {"cells": [asdict(c) for c in cells], "goal": goal}
    if rounds:
        alone = statistics.median(r.alone_s for r in rounds)
        behind = statistics.median(r.behind_s for r in rounds)
        ttft = {
            "stream": f"one of the same prompts, max_tokens {args.max_tokens}, greedy",
            "long_tokens": args.long_tokens,
            "behind_after_s": args.behind_after,
            "rounds": [asdict(r) for r in rounds],
            "median_alone_s": round(alone, 4),
            "median_behind_s": round(behind, 4),
            "ratio": round(behind / alone, 3),
            "goal_ratio": GOAL_TTFT_RATIO,
            "passed": behind / alone <= GOAL_TTFT_RATIO,
        }
        render_ttft(ttft)
        report["ttft"] = ttft
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    console.log(f"wrote {args.output}")


if __name__ == "__main__":
    main()
