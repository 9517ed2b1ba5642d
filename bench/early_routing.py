"""`python -m bench.early_routing`: early (prefix) routing against full-draft routing, on the real models.

Starts one gateway on the embedded default (the bundled student and teacher, in-process, the
knowledge-base teacher prompt of `bench.stream_distill`) with two API keys whose tenants decide
`early` and `full`, and sends each prompt, one request at a time, through both, plus a live
`student` stream (the TTFT reference) and a `teacher` stream (the teacher-alone reference). It
only observes the gateway: nothing is trained, refitted or tuned on the prompts it sends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.gateway_overhead import busy_seconds, cpu_seconds, git_state, machine
from bench.kb import StreamItem, load_kb, read_stream
from bench.stream_distill import DOMAINS, MAX_TOKENS, OVERRIDES, REPO, Override, gateway, score, teacher_prompt_for
from gateway.routes import key_id
from models.progress import Progress
from router import RouterConfig
from router.prefix import MIN_DRAFTS

RESULTS = REPO / "bench" / "results" / "early_routing.json"
Mode = Literal["early", "full", "student", "teacher"]
MODES: tuple[Mode, ...] = ("early", "full", "student", "teacher")
GOAL_TTFT_RATIO = 2.0  # routed (early) TTFT p50 at most this many times the live student stream's
GOAL_ESCALATED_RATIO = 1.3  # an early escalation's total p50 at most this many times the teacher alone
GOAL_AGREEMENT = 0.90  # the early decision's tier matches the full-draft decision's
SETTLE_CPU = 0.10  # after a request, wait until the gateway uses less than this share of a core
SETTLE_MAX_S = 15.0
console = Console(width=None if sys.stdout.isatty() else 160)

# From the stream benchmark's settings, the ones a loop-off gateway needs (the teacher must know
# the company; a fresh store per run; 2 cores).
_SHARED = (
    "TIERGATE_TEACHER__SYSTEM_PROMPT",
    "TIERGATE_TEACHER__MAX_MODEL_LEN",
    "TIERGATE_STUDENT__READ_TIMEOUT_S",
    "TIERGATE_TEACHER__READ_TIMEOUT_S",
    "TIERGATE_SERVER__ADMIN_API_KEY",
    "TIERGATE_SIGNAL__PATH",
    "TIERGATE_DISTILL__REGISTRY_DIR",
)
OWN: dict[str, Override] = {
    "TIERGATE_DISTILL__ENABLED": Override("false", "the student must not change during the comparison"),
    "TIERGATE_CACHE__ENABLED": Override(
        "false",
        "each prompt is asked greedily four times; the teacher answer cache would answer the second "
        "teacher request from memory and the teacher-alone reference would time a lookup",
    ),
    "TIERGATE_SIGNAL__AUDIT_FRACTION": Override(
        "0",
        "requests are timed one at a time: a background audit (the teacher answering a kept draft "
        "again) would run into the next request's time",
    ),
    "TIERGATE_DISTILL__LABEL_BUDGET_PER_HOUR": Override("0", "the same, for active labels"),
    "TIERGATE_TUNING__REFIT_S": Override(
        "86400",
        "no refit while measuring (the default comes every 10 minutes): it would change the prefix scorer "
        "mid-run, fitted on the measured prompts' own drafts",
    ),
    "TIERGATE_SERVER__API_KEYS": Override(
        '["{early_key}", "{full_key}"]', "two tenants, one per decision mode, in the same gateway"
    ),
}


def overrides() -> dict[str, Override]:
    """Every setting the benchmark's gateway changes from the product defaults, with its reason."""
    return {**{k: OVERRIDES[k] for k in _SHARED}, **OWN}


def gateway_env(tmp: Path, fill: dict[str, str]) -> dict[str, str]:
    """The gateway's environment: ours, under any TIERGATE_* variable already set. `fill` gives
    the placeholders ({tmp} is the run's temporary folder)."""
    values = {"tmp": str(tmp), **fill}
    env = dict(os.environ)
    for key, o in overrides().items():
        value = o.value
        if value == "{prompt}":  # the FAQ may itself hold braces; it is the whole value
            value = values["prompt"]
        else:
            for name, v in values.items():
                if name != "prompt":
                    value = value.replace("{" + name + "}", v)
        env.setdefault(key, value)
    return env


# -- statistics --------------------------------------------------------------------------------
def quantile(xs: Sequence[float], q: float) -> float | None:
    """Linear-interpolated quantile (q in [0, 1]); None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k/n (95 % by default); None for n = 0."""
    if n == 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(
    xs: Sequence[float], *, reps: int = 4000, level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (seeded, so a result file reproduces)."""
    if not xs:
        return None
    rng = random.Random(seed)
    n = len(xs)
    means = sorted(sum(rng.choices(xs, k=n)) / n for _ in range(reps))
    tail = (1 - level) / 2
    lo, hi = quantile(means, tail), quantile(means, 1 - tail)
    assert lo is not None and hi is not None
    return lo, hi


# -- one request ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Row:
    prompt: int  # index into the run's prompts
    split: str
    intent: str | None
    mode: Mode
    tier: str
    reason: str
    decided_by: str | None
    confidence: float | None
    ttft_s: float | None  # to the first chunk with content (None: no content came)
    total_s: float
    text: str
    recall: float | None
    teacher_tokens: float  # prompt + completion, from /metrics (hedges and their estimates included)
    hedges: dict[str, float]  # tiergate_hedges_total delta, by outcome
    hedge_tokens: dict[str, float]  # tiergate_hedge_tokens_total delta, by outcome


Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metric_sum(m: Metrics, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in m.items() if n == name and want <= set(lab))


def delta_by(before: Metrics, after: Metrics, name: str, label: str) -> dict[str, float]:
    keys = {dict(lab).get(label) for (n, lab) in after if n == name} - {None}
    out = {}
    for k in sorted(k for k in keys if k is not None):
        d = metric_sum(after, name, **{label: k}) - metric_sum(before, name, **{label: k})
        if d:
            out[k] = d
    return out


class Bench:
    def __init__(self, url: str, pid: int, keys: dict[str, str]) -> None:
        self.url, self.pid = url, pid
        self.http = httpx.Client(base_url=url, timeout=httpx.Timeout(900.0, connect=10.0))
        self.clients = {
            mode: openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=900.0)
            for mode, key in keys.items()
        }

    def metrics(self) -> Metrics:
        resp = self.http.get("/metrics")
        resp.raise_for_status()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text)
            for s in family.samples
        }

    def settle(self) -> None:
        """Wait until the gateway is idle (a cancelled hedge or a stopped draft winds down after
        its response ends), so the next request is timed alone."""
        deadline = time.monotonic() + SETTLE_MAX_S
        while time.monotonic() < deadline:
            before = cpu_seconds(self.pid)
            time.sleep(0.25)
            if (cpu_seconds(self.pid) - before) / 0.25 < SETTLE_CPU:
                return

    def ask(self, mode: Mode, index: int, item: StreamItem) -> Row:
        model = {"early": "tiered", "full": "tiered", "student": "student", "teacher": "teacher"}[mode]
        before = self.metrics()
        start = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []
        with self.clients[mode].chat.completions.with_streaming_response.create(
            model=model,
            messages=list(item.messages),  # type: ignore[arg-type]
            stream=True,
            max_tokens=MAX_TOKENS,
            temperature=0,
        ) as raw:
            headers = raw.headers
            stream = raw.parse()
            assert isinstance(stream, openai.Stream), "stream=True parses to chunks"
            for chunk in stream:
                content = chunk.choices[0].delta.content if chunk.choices else None
                if content:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    parts.append(content)
        total = time.perf_counter() - start
        self.settle()
        after = self.metrics()
        text = "".join(parts)
        conf = headers.get("x-tiergate-confidence")
        teacher = sum(
            metric_sum(after, name, tier="teacher") - metric_sum(before, name, tier="teacher")
            for name in ("tiergate_prompt_tokens_total", "tiergate_completion_tokens_total")
        )
        return Row(
            prompt=index,
            split=item.split,
            intent=item.intent,
            mode=mode,
            tier=headers["x-tiergate-tier"],
            reason=headers.get("x-tiergate-reason", ""),
            decided_by=headers.get("x-tiergate-decided-by"),
            confidence=None if conf in (None, "none") else float(conf),
            ttft_s=ttft,
            total_s=total,
            text=text,
            recall=score(text, item),
            teacher_tokens=teacher,
            hedges=delta_by(before, after, "tiergate_hedges_total", "outcome"),
            hedge_tokens=delta_by(before, after, "tiergate_hedge_tokens_total", "outcome"),
        )

    def set_policy(self, admin_key: str, tenant: str, decision: str, threshold: float) -> None:
        body = {"tenant": tenant, "kind": "fixed", "threshold": threshold, "decision": decision}
        resp = self.http.put("/admin/policy", json=body, headers={"authorization": f"Bearer {admin_key}"})
        resp.raise_for_status()

    def close(self) -> None:
        self.http.close()
        for c in self.clients.values():
            c.close()


def order_for(index: int) -> list[Mode]:
    """The four requests of prompt `index`, rotated so each mode goes first, second, ... equally
    often (a Latin square: whatever warms up for the next request favours no mode)."""
    k = index % len(MODES)
    return list(MODES[k:] + MODES[:k])


def choose_prompts(items: Sequence[StreamItem], limit: int) -> list[StreamItem]:
    """Distinct prompts (a greedy repeat is the same request), held-out ones first, in stream order."""
    seen: set[str] = set()
    out: list[StreamItem] = []
    for split in ("heldout", "train"):
        for item in items:
            key = json.dumps(item.messages)
            if item.split == split and key not in seen:
                seen.add(key)
                out.append(item)
    return out[:limit]


# -- summary and goals ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Goal:
    name: str
    detail: str
    measured: float | None
    bar: float
    met: bool | None


def _p50(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarize(rows: Sequence[Row]) -> dict[str, Any]:
    """Everything the goals and the tables read, from the per-request rows."""
    by: dict[Mode, dict[int, Row]] = {m: {} for m in MODES}
    for r in rows:
        by[r.mode][r.prompt] = r
    prompts = sorted(set.intersection(*(set(v) for v in by.values()))) if rows else []
    out: dict[str, Any] = {"prompts": len(prompts), "modes": {}}
    for mode in MODES:
        rs = [by[mode][p] for p in prompts]
        recalls = [r.recall for r in rs if r.recall is not None]
        out["modes"][mode] = {
            "requests": len(rs),
            "to_teacher": sum(r.tier == "teacher" for r in rs),
            "ttft_p50_s": _p50([r.ttft_s for r in rs]),
            "ttft_p90_s": quantile([r.ttft_s for r in rs if r.ttft_s is not None], 0.9),
            "total_p50_s": _p50([r.total_s for r in rs]),
            "recall": statistics.fmean(recalls) if recalls else None,
            "recall_ci95": bootstrap_ci(recalls),
            "teacher_tokens": sum(r.teacher_tokens for r in rs),
            "decided_by": {k: sum(r.decided_by == k for r in rs) for k in sorted({str(r.decided_by) for r in rs})},
            "reasons": {k: sum(r.reason == k for r in rs) for k in sorted({r.reason for r in rs})},
        }
    early = [by["early"][p] for p in prompts]
    kept = [r for r in early if r.tier == "student"]
    escalated = [r for r in early if r.tier == "teacher"]
    student_ttft = out["modes"]["student"]["ttft_p50_s"]
    out["ttft"] = {
        "early_all_p50_s": out["modes"]["early"]["ttft_p50_s"],
        "early_kept_p50_s": _p50([r.ttft_s for r in kept]),
        "early_escalated_p50_s": _p50([r.ttft_s for r in escalated]),
        "full_all_p50_s": out["modes"]["full"]["ttft_p50_s"],
        "student_p50_s": student_ttft,
        "teacher_p50_s": out["modes"]["teacher"]["ttft_p50_s"],
        "early_vs_student": _ratio(out["modes"]["early"]["ttft_p50_s"], student_ttft),
        "early_kept_vs_student": _ratio(_p50([r.ttft_s for r in kept]), student_ttft),
        "full_vs_student": _ratio(out["modes"]["full"]["ttft_p50_s"], student_ttft),
    }
    esc_prompts = [r.prompt for r in escalated]
    full_esc = [by["full"][p] for p in prompts if by["full"][p].tier == "teacher"]
    out["escalated"] = {
        "early_requests": len(escalated),
        "early_total_p50_s": _p50([r.total_s for r in escalated]),
        "teacher_alone_total_p50_s": _p50([by["teacher"][p].total_s for p in esc_prompts]),
        "early_vs_teacher": _ratio(
            _p50([r.total_s for r in escalated]), _p50([by["teacher"][p].total_s for p in esc_prompts])
        ),
        "per_prompt_ratio_p50": _p50([r.total_s / by["teacher"][r.prompt].total_s for r in escalated]),
        "full_requests": len(full_esc),
        "full_total_p50_s": _p50([r.total_s for r in full_esc]),
        "full_vs_teacher": _ratio(
            _p50([r.total_s for r in full_esc]), _p50([by["teacher"][r.prompt].total_s for r in full_esc])
        ),
    }
    agree = sum(by["early"][p].tier == by["full"][p].tier for p in prompts)
    out["agreement"] = {
        "agreed": agree,
        "prompts": len(prompts),
        "rate": agree / len(prompts) if prompts else None,
        "ci95": wilson(agree, len(prompts)),
        # (early tier, full tier) -> count
        "table": {
            f"{e}/{f}": sum(by["early"][p].tier == e and by["full"][p].tier == f for p in prompts)
            for e in ("student", "teacher")
            for f in ("student", "teacher")
        },
    }
    paired = [
        (by["early"][p].recall, by["full"][p].recall)
        for p in prompts
        if by["early"][p].recall is not None and by["full"][p].recall is not None
    ]
    diffs = [float(e) - float(f) for e, f in paired if e is not None and f is not None]
    out["recall"] = {
        "early": out["modes"]["early"]["recall"],
        "early_ci95": out["modes"]["early"]["recall_ci95"],
        "full": out["modes"]["full"]["recall"],
        "full_ci95": out["modes"]["full"]["recall_ci95"],
        "diff_early_minus_full": statistics.fmean(diffs) if diffs else None,
        "diff_ci95": bootstrap_ci(diffs),
        "prompts_differing": sum(d != 0 for d in diffs),
    }
    hedges: dict[str, float] = {}
    hedge_tokens: dict[str, float] = {}
    for r in early:
        for k, v in r.hedges.items():
            hedges[k] = hedges.get(k, 0.0) + v
        for k, v in r.hedge_tokens.items():
            hedge_tokens[k] = hedge_tokens.get(k, 0.0) + v
    out["hedging"] = {
        "hedges": hedges,
        "hedge_tokens": hedge_tokens,
        # Teacher tokens a hedge spent on a request that was then kept: spent for nothing.
        "wasted_tokens": hedge_tokens.get("cancelled", 0.0),
        "early_teacher_tokens": out["modes"]["early"]["teacher_tokens"],
        "full_teacher_tokens": out["modes"]["full"]["teacher_tokens"],
    }
    return out


def goals(s: dict[str, Any]) -> list[Goal]:
    """The issue's four goals, read from a summary. `met` is None where nothing was measured."""
    ttft = s["ttft"]["early_vs_student"]
    esc = s["escalated"]["early_vs_teacher"]
    agree = s["agreement"]["rate"]
    diff_ci = s["recall"]["diff_ci95"]
    recall_met = None if diff_ci is None else diff_ci[0] <= 0.0 <= diff_ci[1]
    return [
        Goal(
            "ttft",
            "routed (early) stream TTFT p50 / live student stream TTFT p50",
            ttft,
            GOAL_TTFT_RATIO,
            None if ttft is None else ttft <= GOAL_TTFT_RATIO,
        ),
        Goal(
            "escalated_latency",
            "early-escalated total p50 / teacher alone total p50 (same prompts)",
            esc,
            GOAL_ESCALATED_RATIO,
            None if esc is None else esc <= GOAL_ESCALATED_RATIO,
        ),
        Goal(
            "agreement",
            "early decision's tier = full-draft decision's tier",
            agree,
            GOAL_AGREEMENT,
            None if agree is None else agree >= GOAL_AGREEMENT,
        ),
        Goal(
            "recall",
            "served key-fact recall, early - full (95 % CI holds 0)",
            s["recall"]["diff_early_minus_full"],
            0.0,
            recall_met,
        ),
    ]


# -- reporting -----------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _ci(ci: Sequence[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def print_tables(s: dict[str, Any], goal_list: Sequence[Goal]) -> None:
    table = Table(title=f"per mode ({s['prompts']} prompts, one request at a time)")
    for col in (
        "mode",
        "to teacher",
        "TTFT p50 s",
        "TTFT p90 s",
        "total p50 s",
        "recall",
        "recall 95% CI",
        "teacher tok",
    ):
        table.add_column(col, justify="right")
    for mode, m in s["modes"].items():
        table.add_row(
            mode,
            f"{m['to_teacher']}/{m['requests']}",
            _fmt(m["ttft_p50_s"], ".2f"),
            _fmt(m["ttft_p90_s"], ".2f"),
            _fmt(m["total_p50_s"], ".2f"),
            _fmt(m["recall"]),
            _ci(m["recall_ci95"]),
            f"{m['teacher_tokens']:.0f}",
        )
    console.print(table)
    t, e, a, h = s["ttft"], s["escalated"], s["agreement"], s["hedging"]
    console.print(
        f"TTFT p50: early {_fmt(t['early_all_p50_s'], '.2f')} s (kept {_fmt(t['early_kept_p50_s'], '.2f')}, "
        f"escalated {_fmt(t['early_escalated_p50_s'], '.2f')}), full {_fmt(t['full_all_p50_s'], '.2f')}, "
        f"student {_fmt(t['student_p50_s'], '.2f')}, teacher {_fmt(t['teacher_p50_s'], '.2f')}"
    )
    console.print(
        f"escalated total p50: early {_fmt(e['early_total_p50_s'], '.2f')} s over {e['early_requests']} vs teacher "
        f"alone {_fmt(e['teacher_alone_total_p50_s'], '.2f')} s; full {_fmt(e['full_total_p50_s'], '.2f')} s "
        f"over {e['full_requests']} (x{_fmt(e['full_vs_teacher'], '.2f')})"
    )
    console.print(f"agreement {a['agreed']}/{a['prompts']} {_ci(a['ci95'])}; (early/full) {a['table']}")
    console.print(f"hedges {h['hedges'] or '-'}; hedge tokens {h['hedge_tokens'] or '-'}")
    table = Table(title="goals")
    for col in ("goal", "measured", "bar", "verdict"):
        table.add_column(col)
    verdict = {True: "[green]met", False: "[red]missed", None: "-"}
    for g in goal_list:
        table.add_row(g.detail, _fmt(g.measured), _fmt(g.bar, ".2f"), verdict[g.met])
    console.print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.early_routing", description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=40, help="distinct prompts, held-out first (default 40)")
    p.add_argument(
        "--warmup",
        type=int,
        default=40,
        help="train prompts (none of the measured ones) logged before the refit phase (default 40; 0: prior only)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help=f"result JSON (default {RESULTS.relative_to(REPO)})")
    return p.parse_args(argv)


@dataclass
class Run:
    """What one benchmark run shares between its gateways."""

    prompts: list[StreamItem]
    spare: StreamItem  # the warm-up request's prompt: measured by nobody
    teacher_prompt: str
    threshold: float
    admin: str
    keys: dict[str, str]
    progress: Progress

    def env(self, folder: Path, extra: dict[str, Override] | None = None) -> dict[str, str]:
        fill = {"prompt": self.teacher_prompt, "admin_key": self.admin, **{f"{m}_key": k for m, k in self.keys.items()}}
        env = gateway_env(folder, fill)
        env.update({k: o.value for k, o in (extra or {}).items()})
        return env

    def open(self, url: str, pid: int) -> Bench:
        bench = Bench(url, pid, {**self.keys, "student": self.keys["early"], "teacher": self.keys["early"]})
        for mode in ("early", "full"):
            bench.set_policy(self.admin, key_id(self.keys[mode]), mode, self.threshold)
        return bench


def measure(run: Run, folder: Path, label: str) -> tuple[list[Row], dict[str, Any]]:
    """One gateway (fresh store in `folder`, or the one a warm-up left there): every prompt's four
    requests, rotated, one at a time. Returns the rows and how busy the machine was meanwhile."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    with gateway(run.env(folder), folder / f"gateway-{label}.log") as (url, proc):
        bench = run.open(url, proc.pid)
        try:
            for mode in MODES:  # first requests pay one-off costs; not measured
                bench.ask(mode, -1, run.spare)
            t0, busy0 = time.perf_counter(), busy_seconds()
            cpu0 = cpu_seconds(proc.pid) + cpu_seconds(os.getpid())
            task = run.progress.add_task(f"{label}: prompts x 4 requests", total=len(run.prompts))
            for i, item in enumerate(run.prompts):
                rows.extend(bench.ask(mode, i, item) for mode in order_for(i))
                run.progress.advance(task)
            wall = time.perf_counter() - t0
            ours = cpu_seconds(proc.pid) + cpu_seconds(os.getpid()) - cpu0
            other = busy_seconds() - busy0 - ours
        finally:
            bench.close()
    load = {
        "wall_s": wall,
        "ours_cores": ours / wall,
        "other_load_pct": max(0.0, other) / wall * 100,  # % of one core, of the machine's CPUs
        "loadavg_end": os.getloadavg(),
    }
    return rows, load


# The warm-up gateway only: what it takes to log full drafts for the prefix refit.
WARMUP: dict[str, Override] = {
    "TIERGATE_SIGNAL__AUDIT_FRACTION": Override(
        "1",
        "a kept draft is logged only when audited: at 1 every warm-up draft is logged whole, at weight 1 "
        "(at the default 5 %, 30 drafts take about 600 requests)",
    ),
    "TIERGATE_TUNING__REFIT_S": Override("15", "refit within seconds of the warm-up instead of 10 minutes"),
}


def prefix_state(registry: Path, since: float = 0.0) -> dict[str, Any] | None:
    """The fitted prefix scorer in the registry's routing state files, if one was saved after
    `since` (a Unix time)."""
    for path in sorted(registry.rglob("*.json")):
        try:
            if path.stat().st_mtime <= since:
                continue
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        prefix = body.get("prefix") if isinstance(body, dict) else None
        if isinstance(prefix, dict) and prefix.get("coef"):
            return prefix
    return None


def warm_up(run: Run, folder: Path, items: Sequence[StreamItem]) -> dict[str, Any]:
    """Log `items`' full drafts (full-draft tenant, every draft audited) in a gateway of its own,
    then wait for a refit after the last of them is logged. The scorer is saved in `folder`'s
    registry, where the measuring gateway loads it at start-up."""
    folder.mkdir(parents=True, exist_ok=True)
    env = run.env(folder, WARMUP)
    t0 = time.perf_counter()
    with gateway(env, folder / "gateway-warmup.log") as (url, proc):
        bench = run.open(url, proc.pid)
        try:
            task = run.progress.add_task("warm-up: full drafts to refit on", total=len(items))
            for i, item in enumerate(items):
                bench.ask("full", i, item)
                run.progress.advance(task)
            logged = time.time()  # `ask` waited for the gateway to be idle: every audit is on record
            deadline = time.monotonic() + 120.0
            while (state := prefix_state(folder / "registry", logged)) is None or state.get("n", 0) < MIN_DRAFTS:
                if time.monotonic() > deadline:
                    break
                time.sleep(2.0)
        finally:
            bench.close()
    return {"requests": len(items), "seconds": time.perf_counter() - t0, "scorer": prefix_state(folder / "registry")}


def write(
    path: Path, run: Run, phases: dict[str, dict[str, Any]], started: float, warm_items: int, *, show: bool
) -> None:
    """The result JSON of the phases measured so far (written after each, so a failed refit
    phase leaves the prior's results); `show` prints their tables."""
    out_phases: dict[str, Any] = {}
    for name, ph in phases.items():
        summary = summarize(ph["rows"])
        goal_list = goals(summary)
        if show:
            console.rule(f"prefix scorer: {name}")
            print_tables(summary, goal_list)
            ld = ph["load"]
            console.print(
                f"{ld['wall_s'] / 60:.1f} min measured; gateway + this process {ld['ours_cores']:.2f} cores, "
                f"other processes {ld['other_load_pct']:.0f} % of a core ({os.cpu_count()} CPUs)"
            )
        out_phases[name] = {
            "load": ph["load"],
            **({"warmup": ph["warmup"]} if "warmup" in ph else {}),
            "summary": summary,
            "goals": [asdict(g) for g in goal_list],
            "rows": [asdict(r) for r in ph["rows"]],
        }
    out = {
        "benchmark": "early_routing",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "machine": {**machine(), "platform": platform.platform()},
        "git": git_state(),
        "method": {
            "stream": str(DOMAINS["kestrel"][1].relative_to(REPO)),
            "prompts": len(run.prompts),
            "selection": "distinct prompts, held-out first, in stream order",
            "warmup_prompts": warm_items,
            "requests_per_prompt": list(MODES),
            "order": "rotated per prompt (Latin square), one request at a time, the gateway idle before each",
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "threshold": run.threshold,
            "router": RouterConfig().model_dump(),
            "phases": {
                "prior": "a new gateway: the prefix scorer is the prior",
                "refit": "a gateway whose prefix scorer was refitted on the warm-up's logged full drafts",
            },
            "overrides": {k: asdict(o) for k, o in overrides().items()},
            "warmup_overrides": {k: asdict(o) for k, o in WARMUP.items()},
        },
        "phases": out_phases,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    kb_path, stream_path = DOMAINS["kestrel"]
    stream = read_stream(stream_path)
    everything = choose_prompts(stream, len(stream))
    prompts = everything[: args.limit]
    # The warm-up request and the refit's warm-up: train prompts that are not measured.
    spare, *rest = [i for i in everything[args.limit :] if i.split == "train"]
    warm_items = rest[: args.warmup]
    started = time.time()
    phases: dict[str, dict[str, Any]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="tiergate-early-") as tmp,
        Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress,
    ):
        run = Run(
            prompts,
            spare,
            teacher_prompt_for(stream, load_kb(kb_path), "faq", "stream"),
            RouterConfig().threshold,
            secrets.token_hex(16),
            {m: secrets.token_hex(16) for m in ("early", "full")},
            progress,
        )
        console.log(f"{len(prompts)} prompts from {stream_path.relative_to(REPO)}; {os.cpu_count()} CPUs")
        rows, load = measure(run, Path(tmp) / "prior", "prior")
        phases["prior"] = {"rows": rows, "load": load}
        write(args.out, run, phases, started, len(warm_items), show=False)
        if args.warmup:
            warm = warm_up(run, Path(tmp) / "refit", warm_items)
            if warm["scorer"] is None:
                console.print("[yellow]the refit fitted no prefix scorer: the refit phase is skipped")
            else:
                rows, load = measure(run, Path(tmp) / "refit", "refit")
                phases["refit"] = {"rows": rows, "load": load, "warmup": warm}
    write(args.out, run, phases, started, len(warm_items), show=True)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
