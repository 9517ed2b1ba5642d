"""`python -m bench.prefix_cache`: the knowledge-base teacher with and without the prefix cache.

Loads the bundled Gemma-3-270M teacher twice through `models.local.LocalBackend`, with the
stream benchmark's FAQ system prompt (a domain's 14 intents, about 2,900 tokens), once with
`prefix_cache` on (the default) and once off, and times the same stream questions on each:
one at a time, then in groups of 4 sent together. Greedy, 40 tokens, as the stream benchmark
asks. Reports seconds per request, the ratio, and whether both gave the same answers. It does
not measure HTTP, the student, or prompts without a long static start.
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
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.gateway_overhead import busy_seconds
from bench.kb import asked_intents, load_kb, read_stream, teacher_prompt
from bench.stream_distill import DOMAINS, MAX_TOKENS
from models import BackendConfig, ChatMessage, SamplingParams
from models.local import LocalBackend
from models.progress import Progress

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "prefix_cache.json"
console = Console(width=None if sys.stdout.isatty() else 140)


async def measure(
    config: BackendConfig, questions: list[tuple[ChatMessage, ...]], group: int, progress: Progress
) -> dict[str, Any]:
    """Seconds per request alone and in groups sent together, and the answers given."""
    backend = LocalBackend(config)
    await backend.start()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    name = "on" if config.prefix_cache else "off"
    try:
        task = progress.add_task(f"prefix cache {name}", total=2 * len(questions))
        solo, answers = [], []
        for q in questions:
            t = time.perf_counter()
            answers.append((await backend.generate(q, params)).text)
            solo.append(time.perf_counter() - t)
            progress.advance(task)
        grouped = []
        for i in range(0, len(questions), group):
            chunk = questions[i : i + group]
            t = time.perf_counter()
            await asyncio.gather(*[backend.generate(q, params) for q in chunk])
            grouped.append((time.perf_counter() - t) / len(chunk))
            progress.advance(task, len(chunk))
        loaded = backend.loaded
        cached = len(loaded.prefix) if loaded is not None and loaded.prefix is not None else 0
        return {
            "solo_s_per_request": statistics.median(solo),
            "grouped_s_per_request": statistics.median(grouped),
            "cached_prefix_tokens": cached,
            "answers": answers,
        }
    finally:
        await backend.aclose()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    kb_path, stream_path = DOMAINS[args.domain]
    kb, items = load_kb(kb_path), read_stream(stream_path)
    prompt = teacher_prompt(asked_intents(kb, items), "faq")
    questions = [tuple(ChatMessage(**m) for m in it.messages) for it in items[: args.requests]]
    config = BackendConfig(model="gemma-3-270m", prompt_format="transcript", system_prompt=prompt, max_model_len=4096)
    busy0, t0 = busy_seconds(), time.perf_counter()
    with Progress(console=console) as progress:
        on = await measure(config, questions, args.group, progress)
        off = await measure(config.model_copy(update={"prefix_cache": False}), questions, args.group, progress)
    wall = time.perf_counter() - t0
    return {
        "domain": args.domain,
        "requests": len(questions),
        "group": args.group,
        "on": on,
        "off": off,
        "solo_speedup": off["solo_s_per_request"] / on["solo_s_per_request"],
        "grouped_speedup": off["grouped_s_per_request"] / on["grouped_s_per_request"],
        "same_answers": on["answers"] == off["answers"],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "busy_cores_mean": (busy_seconds() - busy0) / wall,
    }


def render(result: dict[str, Any]) -> None:
    table = Table(title=f"teacher with the {result['domain']} FAQ prompt, {result['requests']} questions")
    table.add_column("prefix cache")
    table.add_column("s/request alone", justify="right")
    table.add_column(f"s/request, {result['group']} at once", justify="right")
    for name in ("on", "off"):
        r = result[name]
        table.add_row(name, f"{r['solo_s_per_request']:.2f}", f"{r['grouped_s_per_request']:.2f}")
    table.add_row("off ÷ on", f"{result['solo_speedup']:.1f}×", f"{result['grouped_speedup']:.1f}×", style="bold")
    console.print(table)
    cached = result["on"]["cached_prefix_tokens"]
    console.print(f"cached prefix: {cached} tokens; same answers: {result['same_answers']}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.prefix_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--domain", choices=list(DOMAINS), default="kestrel")
    p.add_argument("--requests", type=int, default=16, help="stream questions asked of each (default 16)")
    p.add_argument("--group", type=int, default=4, help="questions sent together in the second pass")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    render(result)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()
