"""`python -m bench.prefix_prior`: does the prior prefix scorer decide as the whole draft does?

Generates the bundled student's greedy drafts in-process (the gateway's student settings) for
the distinct prompts of both domains' streams, then replays the gateway's early-decision rule
on each draft's token logprobs (`ConfidenceRouter.judge_prefix` from `router.min_prefix_tokens`
to `decide_after_tokens`; a draft that ends first is decided whole) at several thresholds, and
compares it with the full-draft decision (`ConfidenceRouter.decide`). It also measures how far
a prefix's own confidence, which the prior reads as the whole draft's, lies from the whole
draft's, per prefix length, against the prior's spread.

Offline and deliberately narrow: no gateway, no teacher, no timing and no served quality
(`bench.early_routing` measures those), and it fits nothing (a fitted prefix scorer needs a
version's logged drafts: `tuning.prefix`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.early_routing import choose_prompts, wilson
from bench.gateway_overhead import git_state, machine
from bench.kb import read_stream
from bench.stream_distill import DOMAINS, MAX_TOKENS, REPO
from models import ChatMessage, Generation, SamplingParams, TokenLogprob, Usage
from models.progress import Progress
from router import ConfidenceRouter, RouterConfig
from router.prefix import PRIOR_SIGMA, logit

RESULTS = REPO / "bench" / "results" / "prefix_prior.json"
SPREAD_LENGTHS = (4, 8, 12, 16)
console = Console(width=None if sys.stdout.isatty() else 160)


@dataclass(frozen=True, slots=True)
class Draft:
    domain: str
    split: str
    logprobs: tuple[float, ...]


def as_generation(logprobs: Sequence[float]) -> Generation:
    """A draft as the router scores it: only its token logprobs count."""
    return Generation(
        text="",
        finish_reason="length",
        usage=Usage(0, len(logprobs)),
        model="student",
        logprobs=tuple(TokenLogprob("", lp) for lp in logprobs),
    )


def replay(router: ConfidenceRouter, logprobs: Sequence[float], threshold: float) -> tuple[bool, int]:
    """The gateway's early decision on a draft that arrives a token at a time
    (`gateway.service._route_early`, on `ConfidenceRouter.judge_so_far`'s schedule): (escalates,
    tokens seen when it was decided)."""
    for k in range(1, len(logprobs) + 1):
        if k == len(logprobs):  # the draft ended first: decided whole
            return router.decide(as_generation(logprobs), threshold).escalate, k
        verdict = router.judge_so_far(logprobs[:k], threshold)
        if verdict is not None and verdict.verdict != "undecided":
            return verdict.verdict == "escalate", k
    return router.decide(as_generation(logprobs), threshold).escalate, 0  # an empty draft


def agreement(router: ConfidenceRouter, drafts: Sequence[Draft], threshold: float) -> dict[str, Any]:
    full = [router.decide(as_generation(d.logprobs), threshold).escalate for d in drafts]
    early = [replay(router, d.logprobs, threshold) for d in drafts]
    pairs = [(e, f) for (e, _), f in zip(early, full, strict=True)]  # (early escalates, full escalates)
    agree = sum(e == f for e, f in pairs)
    at = sorted(k for _, k in early)
    return {
        "threshold": threshold,
        "drafts": len(drafts),
        "full_escalates": sum(full),
        "early_escalates": sum(e for e, _ in early),
        "agreement": agree / len(drafts) if drafts else None,
        "agreement_ci95": wilson(agree, len(drafts)),
        "kept_but_full_escalates": sum((not e) and f for e, f in pairs),
        "escalated_but_full_keeps": sum(e and not f for e, f in pairs),
        "decided_before_final": sum(k < router.decide_after_tokens for k in at),
        "decision_tokens_p50": at[len(at) // 2] if at else None,
    }


def spreads(router: ConfidenceRouter, drafts: Sequence[Draft]) -> list[dict[str, Any]]:
    """Per prefix length: the prior's reading of the prefix (the whole-draft confidence it
    predicts, in logit space) minus the whole draft's, over drafts longer than the prefix."""
    wholes = [logit(router.decide(as_generation(d.logprobs)).confidence) for d in drafts]
    out = []
    for k in SPREAD_LENGTHS:
        diffs = [
            logit(router.judge_prefix(d.logprobs[:k], router.threshold, final=False).confidence) - whole
            for d, whole in zip(drafts, wholes, strict=True)
            if len(d.logprobs) > k
        ]
        out.append(
            {
                "tokens": k,
                "drafts": len(diffs),
                "mean": statistics.fmean(diffs) if diffs else None,
                "sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
                "prior_sigma": PRIOR_SIGMA,
            }
        )
    return out


async def generate(limit: int) -> list[Draft]:
    """Greedy `MAX_TOKENS`-token drafts of each domain's first `limit` distinct prompts."""
    from gateway.settings import Settings
    from models.local import LocalBackend

    items = [
        (domain, item) for domain, (_, stream) in DOMAINS.items() for item in choose_prompts(read_stream(stream), limit)
    ]
    backend = LocalBackend(Settings().student)
    await backend.start()
    out = []
    try:
        with Progress(
            TextColumn("drafts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as bar:
            task = bar.add_task("drafts", total=len(items))
            for domain, item in items:
                messages = tuple(ChatMessage(m["role"], m["content"]) for m in item.messages)
                g = await backend.generate(messages, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
                out.append(Draft(domain, item.split, tuple(t.logprob for t in g.logprobs)))
                bar.advance(task)
    finally:
        await backend.aclose()
    return out


def summarize(drafts: Sequence[Draft], thresholds: Sequence[float]) -> dict[str, Any]:
    router = ConfidenceRouter.from_config(RouterConfig())
    by_domain: dict[str, list[Draft]] = {}
    for d in drafts:
        by_domain.setdefault(d.domain, []).append(d)
    return {
        domain: {
            "agreement": [agreement(router, ds, t) for t in thresholds],
            "spread": spreads(router, ds),
        }
        for domain, ds in sorted(by_domain.items())
    }


def print_tables(summary: dict[str, Any]) -> None:
    table = Table(title="the prior's early decision against the full-draft decision")
    for col in ("domain", "threshold", "full escalates", "agreement (95 % CI)", "kept, full escalates",
                "escalated, full keeps", "decided before final", "tokens p50"):  # fmt: skip
        table.add_column(col)
    for domain, s in summary.items():
        for a in s["agreement"]:
            lo, hi = a["agreement_ci95"] or (math.nan, math.nan)
            table.add_row(
                domain, f"{a['threshold']:.2f}", f"{a['full_escalates']}/{a['drafts']}",
                f"{a['agreement']:.3f} [{lo:.2f}, {hi:.2f}]", str(a["kept_but_full_escalates"]),
                str(a["escalated_but_full_keeps"]), f"{a['decided_before_final']}/{a['drafts']}",
                str(a["decision_tokens_p50"]),
            )  # fmt: skip
    console.print(table)
    table = Table(title="logit(prefix confidence) - logit(whole draft's), per prefix length")
    for col in ("domain", "tokens", "mean", "sd", "prior's spread"):
        table.add_column(col)
    for domain, s in summary.items():
        for r in s["spread"]:
            if r["sd"] is not None:
                table.add_row(
                    domain, str(r["tokens"]), f"{r['mean']:+.2f}", f"{r['sd']:.2f}", f"{r['prior_sigma']:.2f}"
                )
    console.print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=80, help="distinct prompts per domain (default 80)")
    p.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="thresholds to replay at (default: 0.25, router.threshold, 0.5)")  # fmt: skip
    p.add_argument("--drafts", type=Path, default=None, help="reuse the drafts of an earlier result file")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    thresholds = args.thresholds or sorted({0.25, RouterConfig().threshold, 0.5})
    started = time.time()
    if args.drafts is not None:
        saved = json.loads(args.drafts.read_text())["drafts"]
        drafts = [Draft(d["domain"], d["split"], tuple(d["logprobs"])) for d in saved]
    else:
        drafts = asyncio.run(generate(args.limit))
    summary = summarize(drafts, thresholds)
    print_tables(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "prefix_prior",
        "started": started,
        "machine": machine(),
        "git": git_state(),
        "method": {
            "limit": args.limit,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "router": RouterConfig().model_dump(),
        },
        "summary": summary,
        "drafts": [{"domain": d.domain, "split": d.split, "logprobs": list(d.logprobs)} for d in drafts],
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
