"""`python -m bench.stream_distill`: does online distillation cut escalations while quality holds?

Replays a JSONL stream in order through a real gateway it starts (loopback, temporary store and
registry, knowledge-base-prompted teacher) with the loop on, and compares each window with loop
off, all-teacher and all-student. It only observes the gateway; it never trains or scores inside it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.chaos import free_port
from bench.gateway_overhead import busy_seconds, cpu_seconds, git_state, machine
from bench.kb import (
    DATA,
    Intent,
    PromptStyle,
    StreamItem,
    asked_intents,
    build_stream,
    key_fact_recall,
    load_kb,
    read_stream,
)
from bench.kb import teacher_prompt as kb_teacher_prompt
from distill_loop import DistillConfig, read_samples
from models.progress import Progress

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
HOST = "127.0.0.1"
MAX_TOKENS = 40  # every request; a correct answer states its two facts well within this
READY_TIMEOUT_S = 900.0  # first start converts the bundled models (about 90 s) before loading them
BUDGET_S = 3600.0  # the bound on a full run, per domain, on 2 CPU cores
# Each domain: its knowledge base and its committed stream (bench.kb builds one from the other).
DOMAINS = {
    "kestrel": (DATA / "kb.jsonl", DATA / "stream.jsonl"),  # Kestrel Cycles, e-bikes
    "bank": (DATA / "kb_bank.jsonl", DATA / "stream_bank.jsonl"),  # a fictional credit union
}

Mode = Literal["tiered", "student", "teacher"]
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (sample name, sorted labels) -> value
console = Console(width=None if sys.stdout.isatty() else 160)


@dataclass(frozen=True, slots=True)
class RunConfig:
    name: str
    label: str
    mode: Mode
    loop: bool  # distillation loop on in its gateway
    sequential: bool  # replay strictly one request at a time (the student changes as it goes)


CONFIGS = {
    "loop_on": RunConfig("loop_on", "distillation loop on", "tiered", True, True),
    "loop_off": RunConfig("loop_off", "loop off (static student)", "tiered", False, False),
    "all_teacher": RunConfig("all_teacher", "all-teacher", "teacher", False, False),
    "all_student": RunConfig("all_student", "all-student", "student", False, False),
}
STATIC = ("all_student", "all_teacher", "loop_off")


# -- what the benchmark's gateways change from the product defaults -----------------------------
@dataclass(frozen=True, slots=True)
class Override:
    """One setting the benchmark changes, and why. `value` may hold `{tmp}` (the run's temporary
    folder), `{admin_key}` (a random key per gateway) or `{prompt}` (the teacher's FAQ prompt)."""

    value: str
    why: str


# Every gateway of every profile. Nothing here touches the distillation recipe (learning rate,
# epochs, steps, held-out share, the gate): those are the product defaults (distill_loop/config.py).
OVERRIDES: dict[str, Override] = {
    "TIERGATE_TEACHER__SYSTEM_PROMPT": Override(
        "{prompt}",
        "the teacher must know the company: the knowledge base as an FAQ of the stream's intents "
        "(a deployment writes its own knowledge into the teacher's prompt)",
    ),
    "TIERGATE_TEACHER__MAX_MODEL_LEN": Override(
        "4096",
        "the FAQ prompt (a stream's 14 intents, about 2,900 Gemma tokens) does not fit the 2,048-token default; "
        "a deployment sizes this to its own prompt",
    ),
    "TIERGATE_STUDENT__READ_TIMEOUT_S": Override(
        "600", "2 CPU cores: a request queued behind training and a 2,900-token teacher prefill can wait minutes"
    ),
    "TIERGATE_TEACHER__READ_TIMEOUT_S": Override("600", "the same, for the teacher"),
    "TIERGATE_DISTILL__TRIGGER_RECORDS": Override(
        "16",
        "a 480-request stream gives only a few records per minute, so the product's 64 would allow "
        "few runs; production traffic reaches 64 records in minutes",
    ),
    "TIERGATE_DISTILL__POLL_S": Override(
        "2", "the replay is short: a run starts within 2 s of its trigger rather than 5 (no effect on what is learned)"
    ),
    "TIERGATE_SERVER__ADMIN_API_KEY": Override(
        "{admin_key}", "the benchmark reads versions and sets the threshold through the admin API"
    ),
    "TIERGATE_SIGNAL__PATH": Override("{tmp}/signal.db", "a fresh signal store per gateway, deleted afterwards"),
    "TIERGATE_DISTILL__REGISTRY_DIR": Override("{tmp}/registry", "a fresh version registry per gateway"),
    "TIERGATE_RUNTIME__LOG_LEVEL": Override("INFO", "the loop's decisions are read from the gateway log"),
}


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    window: int  # requests per reported window
    ref_concurrency: int  # requests in flight for `--loop-off run`
    overrides: dict[str, Override] = field(default_factory=dict)  # on top of OVERRIDES
    stream: dict[str, int] | None = None  # build_stream arguments (None: the domain's stream file)
    # Seconds to wait after the stream for a run still in flight, to show its gate decision
    # (reported apart from the goals, which count only what happened during the stream).
    drain_s: float = 0.0


FULL = Profile("full", window=24, ref_concurrency=4)
QUICK = Profile(
    "quick",
    window=8,
    ref_concurrency=4,
    overrides={
        "TIERGATE_DISTILL__TRIGGER_RECORDS": Override("5", "40 requests: a run every few escalations"),
        "TIERGATE_DISTILL__LORA__MAX_STEPS": Override(
            "24", "a run in about a minute on 2 cores; at 8 steps the candidates did not learn the facts"
        ),
        "TIERGATE_DISTILL__GATE__MIN_HELDOUT": Override(
            "4", "40 requests never hold 20 held-out records; 4 is the fewest a sign test at p 0.1 can pass"
        ),
        "TIERGATE_DISTILL__GATE__MAX_ITEMS": Override("8", "a gate in seconds"),
        "TIERGATE_DISTILL__QUALITY_TARGET": Override(
            "0.8",
            "a handful of items cannot bound agreement near 0.95: at 80 % confidence n items that all "
            "agree give a Wilson lower bound of n / (n + 0.71), 0.92 for 8",
        ),
    },
    # 5 intents: 30 distinct train prompts, of which the loop's 30 % hash split holds out 7
    # (Kestrel) or 11 (bank), the 4th asked by request 13. With 4 Kestrel intents it held out 5,
    # the 4th first asked at request 25, and the first gated run came too late for 40 requests.
    stream={"length": 40, "intents": 5, "seed": 0},
    drain_s=300.0,
)
# Settings the issue names as the product's recipe: the full profile must leave them alone.
RECIPE = (
    "TIERGATE_DISTILL__LORA__LR",
    "TIERGATE_DISTILL__LORA__EPOCHS",
    "TIERGATE_DISTILL__LORA__MAX_STEPS",
    "TIERGATE_DISTILL__HOLDOUT_FRACTION",
    "TIERGATE_DISTILL__GATE__MAX_P_VALUE",
)
_PLACEHOLDER = re.compile(r"\{(tmp|admin_key|prompt)\}")


def overrides(profile: Profile, lr: float | None = None) -> dict[str, Override]:
    """Every setting a gateway of `profile` changes from the product defaults, with its reason."""
    out = {**OVERRIDES, **profile.overrides}
    if lr is not None:
        out["TIERGATE_DISTILL__LORA__LR"] = Override(str(lr), "given with --lr (a tuning run, not the product)")
    return out


def gateway_env(
    tmp: Path, admin_key: str, prompt: str, *, loop: bool, profile: Profile, lr: float | None = None
) -> dict[str, str]:
    """The environment of one gateway: ours, under any TIERGATE_* variable already set, except the
    loop flag, which is what distinguishes the configurations."""
    fill = {"tmp": str(tmp), "admin_key": admin_key, "prompt": prompt}
    env = dict(os.environ)
    for key, o in overrides(profile, lr).items():
        env.setdefault(key, _PLACEHOLDER.sub(lambda m: fill[m.group(1)], o.value))
    env["TIERGATE_DISTILL__ENABLED"] = "true" if loop else "false"
    return env


def effective_distill(env: dict[str, str]) -> dict[str, Any] | None:
    """The loop's settings as the gateway reads them: the product defaults under the
    TIERGATE_DISTILL__* variables of `env` (None, with a warning, when they do not validate here)."""
    nested: dict[str, Any] = {}
    for key, value in env.items():
        if key.startswith("TIERGATE_DISTILL__"):
            *path, leaf = key.removeprefix("TIERGATE_DISTILL__").lower().split("__")
            node = nested
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = value
    try:
        return DistillConfig.model_validate(nested).model_dump(mode="json")
    except ValidationError as exc:
        console.log(f"[yellow]could not read the distill settings back: {exc}")
        return None


# -- the gateway process -----------------------------------------------------------------------
@contextmanager
def gateway(env: dict[str, str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`python -m gateway` on a free loopback port; yields its base URL once both tiers are ready."""
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--host", HOST, "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://{HOST}:{port}"
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"gateway exited with {proc.returncode} while starting:\n{tail}")
                try:
                    if httpx.get(f"{url}/health/ready", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gateway not ready after {READY_TIMEOUT_S:.0f}s (log: {log_path})")
                time.sleep(0.5)
            yield url, proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# -- talking to it -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    tier: str
    escalated: bool
    confidence: float | None
    threshold: float
    student_version: str
    seconds: float


def _conf(value: str | None) -> float | None:
    return None if value in (None, "none") else float(value)


class Client:
    def __init__(self, url: str, admin_key: str) -> None:
        self.url = url
        self.http = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900.0, connect=10.0))
        self.admin = {"authorization": f"Bearer {admin_key}"}

    async def chat(self, model: str, messages: Sequence[dict[str, str]]) -> Reply:
        body = {"model": model, "messages": list(messages), "temperature": 0, "max_tokens": MAX_TOKENS}
        start = time.perf_counter()
        resp = await self.http.post("/v1/chat/completions", json=body)
        resp.raise_for_status()
        h = resp.headers
        return Reply(
            text=resp.json()["choices"][0]["message"]["content"] or "",
            tier=h["x-tiergate-tier"],
            escalated=h["x-tiergate-escalated"] == "true",
            confidence=_conf(h.get("x-tiergate-confidence")),
            threshold=float(h["x-tiergate-threshold"]),
            student_version=h["x-tiergate-student-version"],
            seconds=time.perf_counter() - start,
        )

    async def metrics(self) -> Metrics:
        resp = await self.http.get("/metrics")
        resp.raise_for_status()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text)
            for s in family.samples
        }

    async def set_threshold(self, threshold: float) -> None:
        resp = await self.http.put("/admin/threshold", json={"threshold": threshold}, headers=self.admin)
        resp.raise_for_status()

    async def versions(self) -> dict[str, Any]:
        """The registry's versions and history; empty for a student without one (404)."""
        resp = await self.http.get("/admin/student/versions", headers=self.admin)
        if resp.status_code == 404:
            return {"current": None, "versions": [], "history": []}
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    async def aclose(self) -> None:
        await self.http.aclose()


def total(m: Metrics, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in m.items() if n == name and want <= set(lab))


# -- one request, one window -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outcome:
    index: int
    split: str
    intent: str | None
    served: str
    served_score: float | None
    to_teacher: bool  # answered by the teacher (escalated, or forced)
    confidence: float | None
    student: str | None  # the student's own answer, when measured (held-out, or all-student)
    student_score: float | None
    student_version: str
    seconds: float
    # What the request cost (/metrics, background audits and labels meanwhile included); None
    # when it cannot be told apart from its window's (several in flight, or an older result).
    cost_usd: float | None = None


def score(text: str | None, item: StreamItem) -> float | None:
    return None if text is None or not item.key_facts else key_fact_recall(text, item.key_facts)


async def serve(client: Client, mode: Mode, index: int, item: StreamItem) -> Outcome:
    """Send one stream item the way `mode` says and measure what came back.

    Tiered, held-out: never through `tiered` (an escalation would become training signal).
    The student is asked alone (its own answer, scored without bias), and the gateway's own rule
    is applied to its confidence header: below the threshold, the teacher's answer is served.
    That is the same decision, the same calls and the same cost as the tiered route.
    """
    student: Reply | None = None
    if mode == "teacher":
        served = await client.chat("teacher", item.messages)
    elif mode == "student":
        served = student = await client.chat("student", item.messages)
    elif item.split == "heldout":
        student = await client.chat("student", item.messages)
        escalate = student.confidence is None or student.confidence < student.threshold
        served = await client.chat("teacher", item.messages) if escalate else student
    else:
        served = await client.chat("tiered", item.messages)
    return Outcome(
        index=index,
        split=item.split,
        intent=item.intent,
        served=served.text,
        served_score=score(served.text, item),
        to_teacher=served.tier == "teacher",
        confidence=(student or served).confidence,
        student=student.text if student else None,
        student_score=score(student.text, item) if student else None,
        student_version=(student or served).student_version,
        seconds=served.seconds + (student.seconds if student is not None and student is not served else 0.0),
    )


@dataclass
class WindowRow:
    config: str
    window: int
    first: int  # stream index of the window's first request
    n: int
    n_heldout: int
    escalation_rate: float
    student_quality: float | None  # key-fact recall of the student's own answers, held-out items
    served_quality: float | None  # key-fact recall of what the client got, held-out items
    served_quality_all: float | None  # the same over every item with key facts
    cost_usd: float
    cost_per_request_usd: float
    rel_cost_vs_all_teacher: float | None = None
    student_version: str = ""
    distill_promoted: int = 0
    distill_rejected: int = 0
    mean_latency_s: float = 0.0
    seconds: float = 0.0


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def window_row(
    name: str,
    w: int,
    first: int,
    got: Sequence[Outcome],
    cost: float,
    seconds: float,
    after: Metrics | None = None,
) -> WindowRow:
    held = [o for o in got if o.split == "heldout"]
    return WindowRow(
        config=name,
        window=w,
        first=first,
        n=len(got),
        n_heldout=len(held),
        escalation_rate=sum(o.to_teacher for o in got) / len(got),
        student_quality=_mean([o.student_score for o in held]),
        served_quality=_mean([o.served_score for o in held]),
        served_quality_all=_mean([o.served_score for o in got]),
        cost_usd=cost,
        cost_per_request_usd=cost / len(got),
        student_version=got[-1].student_version,
        distill_promoted=int(total(after, "tiergate_distill_runs_total", result="promoted")) if after else 0,
        distill_rejected=int(total(after, "tiergate_distill_runs_total", result="rejected")) if after else 0,
        mean_latency_s=statistics.fmean(o.seconds for o in got),
        seconds=seconds,
    )


def _describe(label: str, row: WindowRow) -> str:
    sq = f"{row.served_quality:.2f}" if row.served_quality is not None else "-"
    return f"{label}  w{row.window}: esc {row.escalation_rate:.2f} served {sq} [{row.student_version}]"


async def replay(
    client: Client,
    cfg: RunConfig,
    items: Sequence[StreamItem],
    window: int,
    concurrency: int,
    progress: Progress,
) -> tuple[list[WindowRow], list[Outcome]]:
    """Replay `items` window by window; each window's cost is the /metrics difference around it.

    In order (loop on), each request's cost is the difference around it too: one reading ends a
    request and starts the next, so the requests' costs add up to their window's."""
    task = progress.add_task(cfg.label, total=len(items))
    rows: list[WindowRow] = []
    outcomes: list[Outcome] = []
    limit = asyncio.Semaphore(1 if cfg.sequential else concurrency)

    async def one(i: int) -> Outcome:
        async with limit:
            out = await serve(client, cfg.mode, i, items[i])
        progress.advance(task)
        return out

    snapshot = await client.metrics()
    for w, first in enumerate(range(0, len(items), window)):
        idx = range(first, min(first + window, len(items)))
        before, t0 = snapshot, time.perf_counter()
        if cfg.sequential:  # loop on: strictly in order, since the student changes as it goes
            got = []
            for i in idx:
                out = await one(i)
                reading = await client.metrics()
                spent = total(reading, "tiergate_cost_usd_total") - total(snapshot, "tiergate_cost_usd_total")
                got.append(replace(out, cost_usd=spent))
                snapshot = reading
        else:  # static: order is moot
            got = list(await asyncio.gather(*map(one, idx)))
            snapshot = await client.metrics()
        after, seconds = snapshot, time.perf_counter() - t0
        cost = total(after, "tiergate_cost_usd_total") - total(before, "tiergate_cost_usd_total")
        rows.append(window_row(cfg.name, w, first, got, cost, seconds, after))
        outcomes += got
        progress.update(task, description=_describe(cfg.label, rows[-1]))
    return rows, outcomes


# -- static references: each distinct prompt once -----------------------------------------------
@dataclass(frozen=True, slots=True)
class Answer:
    reply: Reply
    cost_usd: float  # the /metrics cost difference around this one request


def prompt_key(item: StreamItem) -> str:
    return json.dumps(item.messages, sort_keys=True)


async def answer_distinct(
    client: Client, model: Literal["student", "teacher"], items: Sequence[StreamItem], progress: Progress, label: str
) -> dict[str, Answer]:
    """Forced-tier answers to every distinct prompt, one at a time, each with its own cost.

    A static tier decodes greedily, so a repeated prompt gets the same answer at the same cost;
    asking once per distinct prompt measures the same thing in a fraction of the time.
    """
    distinct = {prompt_key(i): i for i in items}
    task = progress.add_task(f"{label} ({len(distinct)} distinct prompts)", total=len(distinct))
    out: dict[str, Answer] = {}
    for key, item in distinct.items():
        before = await client.metrics()
        reply = await client.chat(model, item.messages)
        after = await client.metrics()
        cost = total(after, "tiergate_cost_usd_total") - total(before, "tiergate_cost_usd_total")
        out[key] = Answer(reply, cost)
        progress.advance(task)
    return out


def static_outcomes(
    name: str,
    items: Sequence[StreamItem],
    window: int,
    student: dict[str, Answer] | None,
    teacher: dict[str, Answer] | None,
    threshold: float | None,
) -> tuple[list[WindowRow], list[Outcome]]:
    """Per-item outcomes and windows of a static configuration from the distinct-prompt answers.

    `loop_off` applies the gateway's rule (escalate when confidence < threshold) to the
    student's confidence: the same decision, answer and cost as its tiered route, less the
    background audits (5 % of confident requests by default), which change no answer.
    """
    outcomes: list[Outcome] = []
    costs: list[float] = []
    for i, item in enumerate(items):
        key = prompt_key(item)
        s = student[key] if student is not None else None
        t = teacher[key] if teacher is not None else None
        if name == "all_student":
            assert s is not None
            served, to_teacher, cost, secs = s, False, s.cost_usd, s.reply.seconds
        elif name == "all_teacher":
            assert t is not None
            served, to_teacher, cost, secs = t, True, t.cost_usd, t.reply.seconds
            s = None  # the student's answer is not part of this configuration
        else:
            assert s is not None and t is not None and threshold is not None
            conf = s.reply.confidence
            to_teacher = conf is None or conf < threshold
            served = t if to_teacher else s
            cost = s.cost_usd + (t.cost_usd if to_teacher else 0.0)
            secs = s.reply.seconds + (t.reply.seconds if to_teacher else 0.0)
        outcomes.append(
            Outcome(
                index=i,
                split=item.split,
                intent=item.intent,
                served=served.reply.text,
                served_score=score(served.reply.text, item),
                to_teacher=to_teacher,
                confidence=s.reply.confidence if s else None,
                student=s.reply.text if s else None,
                student_score=score(s.reply.text, item) if s else None,
                student_version=served.reply.student_version,
                seconds=secs,
                cost_usd=cost,
            )
        )
        costs.append(cost)
    rows = [
        window_row(name, w, first, outcomes[first : first + window], sum(costs[first : first + window]), 0.0)
        for w, first in enumerate(range(0, len(items), window))
    ]
    return rows, outcomes


# -- reading the loop's decisions from the gateway's log ---------------------------------------
_LOG_EVENTS = (
    ("run", re.compile(r"distillation run on (\d+) examples")),
    ("rejected", re.compile(r"candidate rejected by the gate: (\S+)")),
    ("promoted", re.compile(r"promoted (\S+) \(held-out NLL ([\d.]+) -> ([\d.]+)[;)]")),
    ("swapped", re.compile(r"student hot-swapped (\S+) -> (\S+)")),
    ("rollback", re.compile(r"auto-rollback (\S+) -> (\S+)")),
    ("failed", re.compile(r"distillation run failed")),
    ("step", re.compile(r"distill step (\d+)/(\d+) loss ([\d.]+)")),
)


def log_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        for kind, pattern in _LOG_EVENTS:
            m = pattern.search(line)
            if m:
                events.append({"event": kind, "at": line[:23], "groups": list(m.groups())})
                break
    return events


# -- the whole run -----------------------------------------------------------------------------
@dataclass
class RunResult:
    rows: dict[str, list[WindowRow]] = field(default_factory=dict)
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    other_cpu_cores: dict[str, float] = field(default_factory=dict)  # mean cores used by other processes
    threshold: float | None = None
    confidence_quantiles: dict[str, float] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)
    # Wall seconds of each gateway from start to stop (model loading included): the time budget.
    phases: dict[str, float] = field(default_factory=dict)


def quantiles(values: Sequence[float]) -> dict[str, float]:
    qs = statistics.quantiles(values, n=20, method="inclusive")  # 5 % steps
    return {"p10": qs[1], "p25": qs[4], "p50": statistics.median(values), "p75": qs[14], "p90": qs[17]}


def rss_gb(pid: int) -> dict[str, float]:
    """A process's resident memory now and at its peak, in GiB (training runs inside the gateway)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    kib = {k: int(status[k].split()[0]) for k in ("VmRSS", "VmHWM")}
    return {"end": round(kib["VmRSS"] / 2**20, 2), "peak": round(kib["VmHWM"] / 2**20, 2)}


class CpuWatch:
    """Wall time, and the mean number of cores other processes used meanwhile (noise)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t0, self.busy0, self.own0 = time.perf_counter(), busy_seconds(), cpu_seconds(pid)

    def stop(self) -> tuple[float, float]:
        wall = time.perf_counter() - self.t0
        other = (busy_seconds() - self.busy0) - (cpu_seconds(self.pid) - self.own0)
        return wall, max(0.0, other) / wall


async def run_static(
    items: Sequence[StreamItem],
    names: Sequence[str],
    args: argparse.Namespace,
    profile: Profile,
    prompt: str,
    result: RunResult,
    progress: Progress,
    logs: Path,
) -> None:
    """all-student (its confidences pick the threshold), all-teacher and loop off, on one gateway
    without a loop. Loop off is derived from the other two, or replayed (`--loop-off run`)."""
    admin = secrets.token_hex(16)
    need_student = bool({"all_student", "loop_off"} & set(names)) and (
        "all_student" in names or args.loop_off == "derive" or result.threshold is None
    )
    need_teacher = "all_teacher" in names or ("loop_off" in names and args.loop_off == "derive")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tiergate-stream-static-") as tmp:
        env = gateway_env(Path(tmp), admin, prompt, loop=False, profile=profile, lr=args.lr)
        with gateway(env, logs / "static.log") as (url, proc):
            client = Client(url, admin)
            try:
                student = teacher = None
                if need_student:
                    watch = CpuWatch(proc.pid)
                    student = await answer_distinct(client, "student", items, progress, "all-student")
                    result.seconds["all_student"], result.other_cpu_cores["all_student"] = watch.stop()
                    if result.threshold is None:
                        confs = [student[prompt_key(i)].reply.confidence for i in items]
                        result.confidence_quantiles = quantiles([c for c in confs if c is not None])
                        result.threshold = round(result.confidence_quantiles["p50"], 4)
                        console.log(
                            "student confidence over the stream: "
                            + ", ".join(f"{k} {v:.3f}" for k, v in result.confidence_quantiles.items())
                            + f"; threshold = median = {result.threshold}"
                        )
                if need_teacher:
                    watch = CpuWatch(proc.pid)
                    teacher = await answer_distinct(client, "teacher", items, progress, "all-teacher")
                    result.seconds["all_teacher"], result.other_cpu_cores["all_teacher"] = watch.stop()
                for name in names:
                    if name == "loop_off" and args.loop_off == "run":
                        await client.set_threshold(_need_threshold(result))
                        watch = CpuWatch(proc.pid)
                        rows, outs = await replay(
                            client, CONFIGS[name], items, args.window, profile.ref_concurrency, progress
                        )
                        result.seconds[name], result.other_cpu_cores[name] = watch.stop()
                    else:
                        threshold = _need_threshold(result) if name == "loop_off" else None
                        rows, outs = static_outcomes(name, items, args.window, student, teacher, threshold)
                    result.rows[name], result.outcomes[name] = rows, outs
            finally:
                await client.aclose()
    result.phases["references gateway"] = time.perf_counter() - t0


def _need_threshold(result: RunResult) -> float:
    if result.threshold is None:
        raise SystemExit("no threshold: run all_student first or pass --threshold")
    return result.threshold


async def run_online(
    items: Sequence[StreamItem],
    args: argparse.Namespace,
    profile: Profile,
    prompt: str,
    result: RunResult,
    progress: Progress,
    logs: Path,
) -> None:
    """The distillation loop on, replayed strictly in order."""
    admin = secrets.token_hex(16)
    log_path = logs / "online.log"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tiergate-stream-online-") as tmp:
        env = gateway_env(Path(tmp), admin, prompt, loop=True, profile=profile, lr=args.lr)
        env["TIERGATE_ROUTER__THRESHOLD"] = str(_need_threshold(result))
        with gateway(env, log_path) as (url, proc):
            client = Client(url, admin)
            try:
                watch = CpuWatch(proc.pid)
                rows, outs = await replay(client, CONFIGS["loop_on"], items, args.window, 1, progress)
                result.rows["loop_on"], result.outcomes["loop_on"] = rows, outs
                result.seconds["loop_on"], result.other_cpu_cores["loop_on"] = watch.stop()
                memory = rss_gb(proc.pid)
                m = await client.metrics()
                versions = await client.versions()
                # The goals above count what happened during the stream; a run still training
                # may be waited for (--quick), to show its gate decision, reported apart.
                after = await drain(client, log_path, profile.drain_s, versions)
            finally:
                await client.aclose()
        # The gateway has stopped, so its writer has flushed every record.
        signal = signal_summary(_signal_records(Path(env["TIERGATE_SIGNAL__PATH"])), items)
        if signal["heldout_leaks"]:
            console.print(f"[bold red]{signal['heldout_leaks']} signal records hold a held-out prompt")
        distill_env = {k: v for k, v in env.items() if k.startswith("TIERGATE_DISTILL__")}
        result.distill = {
            "settings": distill_env,
            "effective": effective_distill(env),
            "promotions": promotions(versions, outs, m),
            "labels": label_stats(m),
            "signal": signal,
            "after_stream": after,
            "runs": {
                r: int(total(m, "tiergate_distill_runs_total", result=r))
                for r in ("promoted", "rejected", "skipped", "failed")
            },
            "gate": {
                f"{dict(lab)['result']}:{dict(lab)['reason']}": v
                for (n, lab), v in m.items()
                if n == "tiergate_distill_gate_total"
            },
            "swaps": int(total(m, "tiergate_student_swaps_total")),
            "gateway_rss_gb": memory,
            "signal_records_written": int(total(m, "tiergate_signal_records_total", result="written")),
            "versions": versions,
            "log_events": [e for e in log_events(log_path.read_text(errors="replace")) if e["event"] != "step"],
            "train_losses": [
                [int(e["groups"][0]), int(e["groups"][1]), float(e["groups"][2])]
                for e in log_events(log_path.read_text(errors="replace"))
                if e["event"] == "step"
            ],
        }
    result.phases["loop-on gateway"] = time.perf_counter() - t0


def run_in_flight(events: Sequence[dict[str, Any]]) -> bool:
    """Whether the log shows a distillation run started and not yet decided."""
    started: int = sum(e["event"] == "run" for e in events)
    decided: int = sum(e["event"] in ("promoted", "rejected", "failed") for e in events)
    return started > decided


async def drain(client: Client, log_path: Path, limit_s: float, versions: dict[str, Any]) -> dict[str, Any] | None:
    """Wait up to `limit_s` for a run in flight at the end of the stream, and return what it
    decided (the log events and pointer changes after the stream); None when none was waited for."""
    before = log_events(log_path.read_text(errors="replace"))
    if limit_s <= 0 or not run_in_flight(before):
        return None
    console.log(f"a distillation run is in flight at the end of the stream: waiting up to {limit_s:.0f} s")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        await asyncio.sleep(2.0)
        if not run_in_flight(log_events(log_path.read_text(errors="replace"))):
            break
    text = log_path.read_text(errors="replace")
    events = [e for e in log_events(text)[len(before) :] if e["event"] != "step"]
    later = await client.versions()
    done = len(versions.get("history") or [])
    for e in events:
        console.print(f"after the stream: {e['event']} {' '.join(e['groups'])}")
    return {
        "waited_s": time.perf_counter() - t0,
        "decided": not run_in_flight(log_events(text)),
        "log_events": events,
        "history": (later.get("history") or [])[done:],
        "promotions": promotions(later),
    }


def _signal_records(path: Path) -> list[tuple[str, str]]:
    """(kind, last user message) of every record in a signal database."""
    if not path.exists():
        return []
    return [
        (s.kind, next((m.content for m in reversed(s.messages) if m.role == "user"), "")) for s in read_samples(path)
    ]


def signal_summary(records: Sequence[tuple[str, str]], items: Sequence[StreamItem]) -> dict[str, Any]:
    """Records by kind, and how many hold a held-out prompt: these must never reach the signal
    (the benchmark sends them only to a forced tier); any other number breaks the comparison."""
    heldout = {m["content"] for i in items if i.split == "heldout" for m in i.messages if m["role"] == "user"}
    by_kind: dict[str, int] = {}
    for kind, _ in records:
        by_kind[kind] = by_kind.get(kind, 0) + 1
    return {"records": by_kind, "heldout_leaks": sum(text in heldout for _, text in records)}


def relative_costs(result: RunResult) -> None:
    base = {r.window: r.cost_per_request_usd for r in result.rows.get("all_teacher", [])}
    for rows in result.rows.values():
        for r in rows:
            if base.get(r.window):
                r.rel_cost_vs_all_teacher = r.cost_per_request_usd / base[r.window]


def summary(result: RunResult) -> dict[str, dict[str, float | None]]:
    """Whole-stream numbers per configuration, and the first vs the last window."""
    out: dict[str, dict[str, float | None]] = {}
    for name, outs in result.outcomes.items():
        held = [o for o in outs if o.split == "heldout"]
        rows = result.rows[name]
        cost = sum(r.cost_usd for r in rows)
        teacher_cost = sum(r.cost_usd for r in result.rows.get("all_teacher", []))
        out[name] = {
            "requests": len(outs),
            "escalation_rate": sum(o.to_teacher for o in outs) / len(outs),
            "student_quality": _mean([o.student_score for o in held]),
            "served_quality": _mean([o.served_score for o in held]),
            "served_quality_all": _mean([o.served_score for o in outs]),
            "cost_per_request_usd": cost / len(outs),
            "rel_cost_vs_all_teacher": cost / teacher_cost if teacher_cost else None,
            "first_window_escalation": rows[0].escalation_rate,
            "last_window_escalation": rows[-1].escalation_rate,
            "first_window_served_quality": rows[0].served_quality,
            "last_window_served_quality": rows[-1].served_quality,
            "seconds": result.seconds.get(name),
            "other_cpu_cores": result.other_cpu_cores.get(name),
        }
    return out


# -- the goals, over the last quarter of the stream ---------------------------------------
def request_costs(rows: Sequence[WindowRow], outcomes: Sequence[Outcome]) -> list[float]:
    """Each request's cost: its own where measured, otherwise an equal share of its window's."""
    share = {i: r.cost_usd / r.n for r in rows for i in range(r.first, r.first + r.n)}
    return [o.cost_usd if o.cost_usd is not None else share[o.index] for o in outcomes]


def last_quarter_start(n: int) -> int:
    """Index of the first request of the last quarter of an `n`-request stream."""
    return n - math.ceil(n / 4)


def quarter_stats(outs: Sequence[Outcome], costs: Sequence[float]) -> dict[str, Any]:
    held = [o for o in outs if o.split == "heldout"]
    return {
        "first": outs[0].index if outs else None,
        "requests": len(outs),
        "heldout": len(held),
        "escalation_rate": sum(o.to_teacher for o in outs) / len(outs) if outs else None,
        "served_recall_all": _mean([o.served_score for o in outs]),
        "served_recall_heldout": _mean([o.served_score for o in held]),
        "student_recall_heldout": _mean([o.student_score for o in held]),
        "cost_usd": sum(costs),
    }


def last_quarter(
    outcomes: Mapping[str, Sequence[Outcome]], costs: Mapping[str, Sequence[float]]
) -> dict[str, dict[str, Any]]:
    """Per configuration, its numbers over the last quarter of the stream, and its cost there
    divided by all-teacher's over the same requests."""
    out = {}
    for name, outs in outcomes.items():
        start = last_quarter_start(len(outs))
        out[name] = quarter_stats(outs[start:], costs[name][start:])
    base = out.get("all_teacher", {}).get("cost_usd")
    for q in out.values():
        q["cost_vs_all_teacher"] = q["cost_usd"] / base if base else None
    return out


@dataclass(frozen=True, slots=True)
class Goal:
    name: str
    measured: float | None
    bar: float | None
    met: bool | None  # None: not measured (a configuration was not run)
    detail: str  # the line the report prints


def _margin(met: bool, gap: float, bar: float) -> str:
    rel = f" ({gap / bar:.0%} of the bar)" if bar else ""
    return f"met, {gap:.3f} to spare" if met else f"missed by {gap:.3f}{rel}"


def _ratio_goal(
    name: str, what: str, on: float | None, ref: float | None, factor: float, ref_label: str, at_most: bool
) -> Goal:
    if on is None or ref is None:
        return Goal(name, on, None, None, f"{what}: not measured (needs loop on and {ref_label})")
    bar = factor * ref
    met = on <= bar if at_most else on >= bar
    of = f"{factor:.0%} of {ref_label} {ref:.3f}" if factor != 1 else f"{ref_label}'s"
    return Goal(name, on, bar, met, f"{what} {on:.3f} vs bar {bar:.3f} ({of}): {_margin(met, abs(on - bar), bar)}")


def goals(lq: dict[str, dict[str, Any]], promo: dict[str, Any] | None) -> list[Goal]:
    """The issue's four goals: loop on over the last quarter against the references there, and
    the loop's promotions over the whole stream."""
    on, off, teacher = (lq.get(n, {}) for n in ("loop_on", "loop_off", "all_teacher"))
    out = [
        _ratio_goal(
            "escalation",
            "escalation",
            on.get("escalation_rate"),
            off.get("escalation_rate"),
            0.5,
            "loop off",
            at_most=True,
        ),
        _ratio_goal(
            "served_recall_all",
            "served recall, all requests",
            on.get("served_recall_all"),
            teacher.get("served_recall_all"),
            0.95,
            "all-teacher",
            at_most=False,
        ),
        _ratio_goal(
            "served_recall_heldout",
            "served recall, held-out",
            on.get("served_recall_heldout"),
            teacher.get("served_recall_heldout"),
            1.0,
            "all-teacher",
            at_most=False,
        ),
    ]
    if promo is None:
        out.append(Goal("promotions", None, 2, None, "promotions: not measured (loop on was not run)"))
    else:
        n, rolled = promo["promoted"], promo["rollbacks"]
        met = n >= 2 and rolled == 0
        misses = ([f"{2 - n} promotion{'s' if 2 - n > 1 else ''} short"] if n < 2 else []) + (
            [f"{rolled} rollback{'s' if rolled > 1 else ''}"] if rolled else []
        )
        verdict = "met" if met else "missed: " + ", ".join(misses)
        out.append(Goal("promotions", n, 2, met, f"{n} promoted (bar >= 2), {rolled} rolled back (bar 0): {verdict}"))
    return out


def promotions(versions: dict[str, Any], outcomes: Sequence[Outcome] = (), m: Metrics | None = None) -> dict[str, Any]:
    """Promotions and rollbacks from the registry's history (the admin versions endpoint), each
    promoted version with its gate report, and where in the stream it first answered."""
    history = versions.get("history") or []
    metas = {v["name"]: v for v in versions.get("versions") or []}
    first_served: dict[str, int] = {}
    for o in outcomes:
        first_served.setdefault(o.student_version, o.index)
    rollbacks = [h for h in history if "rollback" in str(h.get("reason", ""))]
    rolled_back = {h.get("from") for h in rollbacks}
    promoted = []
    for h in history:
        if h.get("reason") != "promoted":
            continue
        name = h.get("to")
        gate = (metas.get(name) or {}).get("gate") or {}
        paired = gate.get("paired") or {}
        promoted.append(
            {
                "version": name,
                "parent": h.get("from"),
                "time": h.get("time"),
                "first_served_at": first_served.get(name),
                "n_heldout": gate.get("n_heldout"),
                "heldout_sources": gate.get("heldout_sources"),
                "wins": paired.get("wins"),
                "losses": paired.get("losses"),
                "p_value": paired.get("p_value"),
                "routing_floor": gate.get("routing_threshold"),
                # With a quality target: the floor's threshold, estimate, lower bound and items.
                "quality_floor": gate.get("floor_candidate"),
                "quality_target": gate.get("quality_target"),
                "rolled_back": name in rolled_back,
            }
        )
    n_promoted = int(total(m, "tiergate_distill_runs_total", result="promoted")) if m else 0
    n_rollbacks = int(total(m, "tiergate_student_rollbacks_total")) if m else 0
    return {
        # The history keeps the last 50 pointer changes; the counters every one.
        "promoted": max(len(promoted), n_promoted),
        "rollbacks": max(len(rollbacks), n_rollbacks),
        "versions": promoted,
        "rollback_events": rollbacks,
    }


def label_stats(m: Metrics) -> dict[str, Any]:
    """Active teacher labels from /metrics (0 where the gateway exports none)."""
    by: dict[str, dict[str, int]] = {}
    for (name, lab), value in m.items():
        if name == "tiergate_labels_total":
            labels = dict(lab)
            by.setdefault(labels.get("reason", "?"), {})[labels.get("outcome", "?")] = int(value)
    return {
        "total": int(total(m, "tiergate_labels_total")),
        "ok": int(total(m, "tiergate_labels_total", outcome="ok")),
        "failed": int(total(m, "tiergate_labels_total", outcome="failed")),
        "by_reason": by,
        "cost_usd": total(m, "tiergate_label_cost_usd_total"),
    }


# -- outputs -----------------------------------------------------------------------------------
COLORS = {"loop_on": "tab:blue", "loop_off": "tab:orange", "all_teacher": "tab:green", "all_student": "tab:red"}


def plot(result: RunResult, path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 12.5), sharex=True)
    ax_esc, ax_q, ax_all, ax_cost = axes
    for name, rows in result.rows.items():
        x = [r.first + r.n for r in rows]  # requests served by the end of the window
        c, label = COLORS[name], CONFIGS[name].label
        ax_esc.plot(x, [r.escalation_rate for r in rows], "o-", color=c, label=label)
        ax_q.plot(x, [r.served_quality for r in rows], "o-", color=c, label=f"{label}: served")
        if CONFIGS[name].mode == "tiered":
            ax_q.plot(x, [r.student_quality for r in rows], "x--", color=c, label=f"{label}: student alone")
        ax_all.plot(x, [r.served_quality_all for r in rows], "o-", color=c, label=f"{label}: served")
        ax_cost.plot(x, [r.rel_cost_vs_all_teacher for r in rows], "o-", color=c, label=label)
    for r_prev, r in zip(result.rows.get("loop_on", []), result.rows.get("loop_on", [])[1:], strict=False):
        if r.student_version != r_prev.student_version:
            for ax in axes:
                ax.axvline(r.first, color="tab:blue", alpha=0.3, linestyle=":")
            ax_esc.annotate(r.student_version, (r.first, 1.02), fontsize=7, color="tab:blue")
    ax_esc.set_ylabel("escalation rate\n(share answered by teacher)")
    ax_esc.set_ylim(-0.05, 1.1)
    ax_q.set_ylabel("key-fact recall,\nheld-out requests")
    ax_q.set_ylim(-0.05, 1.05)
    ax_all.set_ylabel("key-fact recall,\nall requests (served)")
    ax_all.set_ylim(-0.05, 1.05)
    ax_cost.set_ylabel("cost per request\n/ all-teacher")
    ax_cost.set_xlabel(f"requests replayed (windows of {window}; dotted: loop-on student swapped)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Online distillation on a replayed stream (threshold {result.threshold})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(result: RunResult, path: Path) -> None:
    rows = [asdict(r) for name in result.rows for r in result.rows[name]]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_tables(result: RunResult) -> None:
    for name, rows in result.rows.items():
        table = Table(title=CONFIGS[name].label)
        for col in (
            "window",
            "requests",
            "escalation",
            "student q",
            "served q",
            "served q (all)",
            "cost/req",
            "vs teacher",
            "version",
        ):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(
                str(r.window),
                f"{r.first}-{r.first + r.n - 1}",
                _fmt(r.escalation_rate),
                _fmt(r.student_quality),
                _fmt(r.served_quality),
                _fmt(r.served_quality_all),
                f"${r.cost_per_request_usd * 1e6:.0f}/M",
                _fmt(r.rel_cost_vs_all_teacher),
                r.student_version,
            )
        console.print(table)


def print_overrides(settings: dict[str, Override], profile: Profile, prompt: str) -> None:
    title = f"settings changed from the product defaults ({profile.name} profile)"
    if profile is QUICK:
        title += ": QUICK, small runs, not the product's recipe"
    table = Table(title=title)
    for col in ("variable", "value", "why"):
        table.add_column(col)
    for key, o in settings.items():
        value = f"FAQ prompt, {len(prompt):,} chars" if o.value == "{prompt}" else o.value
        mark = " (quick)" if key in profile.overrides and profile is QUICK else ""
        table.add_row(key.removeprefix("TIERGATE_") + mark, value, o.why)
    console.print(table)


def print_goals(
    lq: dict[str, dict[str, Any]],
    goal_list: Sequence[Goal],
    promo: dict[str, Any] | None,
    labels: dict[str, Any] | None,
    *,
    quick: bool,
) -> None:
    first = next(iter(lq.values()), {})
    span = f"requests {first['first']}-{first['first'] + first['requests'] - 1}" if first.get("requests") else "-"
    table = Table(title=f"last quarter of the stream: {span}")
    for col in ("configuration", "escalation", "served q, all", "served q, held-out", "student, held-out", "cost"):
        table.add_column(col, justify="right")
    for name, q in lq.items():
        table.add_row(
            CONFIGS[name].label,
            _fmt(q["escalation_rate"], ".3f"),
            _fmt(q["served_recall_all"], ".3f"),
            _fmt(q["served_recall_heldout"], ".3f"),
            _fmt(q["student_recall_heldout"], ".3f"),
            _fmt(q["cost_vs_all_teacher"], ".3f"),
        )
    console.print(table)
    table = Table(title="goals" + (" (--quick: the mechanism, not the result)" if quick else ""))
    for col in ("goal", "measured", "bar", "verdict"):
        table.add_column(col)
    verdict = {True: "[green]met", False: "[red]missed", None: "-"}
    for g in goal_list:
        spec = ".0f" if g.name == "promotions" else ".3f"  # a count
        table.add_row(g.detail, _fmt(g.measured, spec), _fmt(g.bar, spec), verdict[g.met])
    console.print(table)
    if promo is not None and promo["versions"]:
        table = Table(title="promoted versions (gate reports)")
        for col in (
            "version",
            "first served at",
            "held-out items",
            "sources",
            "wins/losses (p)",
            "floor",
            "rolled back",
        ):
            table.add_column(col)
        for v in promo["versions"]:
            p = "-" if v["p_value"] is None else f"{v['p_value']:.3f}"
            table.add_row(
                str(v["version"]),
                str(v["first_served_at"] if v["first_served_at"] is not None else "-"),
                str(v["n_heldout"] if v["n_heldout"] is not None else "-"),
                json.dumps(v["heldout_sources"]) if v["heldout_sources"] else "-",
                f"{v['wins']}/{v['losses']} ({p})",
                _fmt(v["routing_floor"], ".3f"),
                "yes" if v["rolled_back"] else "no",
            )
        console.print(table)
    if labels is not None:
        console.print(
            f"active labels: {labels['total']} ({labels['ok']} ok, {labels['failed']} failed; "
            f"by reason {labels['by_reason'] or '-'}), spend ${labels['cost_usd']:.6f}"
        )


def print_timing(result: RunResult, elapsed: float, *, reused: bool) -> None:
    table = Table(title="wall time")
    table.add_column("part")
    table.add_column("minutes", justify="right")
    for name, secs in result.seconds.items():
        table.add_row(f"{CONFIGS[name].label} (replay)", f"{secs / 60:.1f}")
    for phase, secs in result.phases.items():
        table.add_row(f"{phase} (start to stop)", f"{secs / 60:.1f}")
    table.add_row("total", f"{elapsed / 60:.1f}")
    console.print(table)
    memory = result.distill.get("gateway_rss_gb")
    if memory:
        console.print(f"loop-on gateway memory: {memory['end']:.2f} GiB at the end, {memory['peak']:.2f} GiB peak")
    if elapsed > BUDGET_S:
        console.print(
            f"[bold yellow]total {elapsed / 60:.1f} min is over the {BUDGET_S / 60:.0f}-minute budget "
            f"of a run on 2 cores ({os.cpu_count()} CPUs here)"
        )
    if reused:
        console.print("(references reused from an earlier result: the total leaves out their time)")


def reuse_static(path: Path, items: Sequence[StreamItem], window: int, result: RunResult) -> None:
    """Take the static references (and their threshold) from an earlier result on the same stream,
    so a tuning run replays only the loop. Their numbers do not depend on the loop's settings."""
    old = json.loads(path.read_text())
    if old["stream"]["requests"] != len(items) or old["stream"]["window"] != window:
        raise SystemExit(f"{path}: another stream or window ({old['stream']}); cannot reuse its references")
    load_result(old, STATIC, result)


def load_result(old: dict[str, Any], names: Sequence[str], result: RunResult) -> None:
    """Windows, outcomes and timings of `names` from a result JSON, and its threshold."""
    for name in names:
        if name in old["windows"]:
            result.rows[name] = [WindowRow(**r) for r in old["windows"][name]]
            result.outcomes[name] = [Outcome(**o) for o in old["outcomes"][name]]
            for key, into in (("seconds", result.seconds), ("other_cpu_cores", result.other_cpu_cores)):
                if old["summary"][name].get(key) is not None:
                    into[name] = old["summary"][name][key]
    if result.threshold is None:
        result.threshold = old["threshold"]
        result.confidence_quantiles = old["student_confidence"]


def replot(path: Path) -> None:
    """Redraw the PNG of an earlier result JSON (same name, .png)."""
    old = json.loads(path.read_text())
    result = RunResult()
    load_result(old, list(CONFIGS), result)
    plot(result, path.with_suffix(".png"), old["stream"]["window"])
    console.print(f"wrote {path.with_suffix('.png')}")


def teacher_prompt_for(items: list[StreamItem], kb: list[Intent], style: PromptStyle, scope: str) -> str:
    """The teacher's knowledge: the entries the stream asks about, or the whole knowledge base.

    Gemma-3-270M copies the right line far more often from a short FAQ than from all 41 entries
    (bench/README.md has the probe); a stream without intent ids gets the whole base."""
    return kb_teacher_prompt(asked_intents(kb, items) if scope == "stream" else kb, style)


def load_items(args: argparse.Namespace, profile: Profile) -> tuple[list[StreamItem], str]:
    if args.stream is not None:
        items, source = read_stream(args.stream), str(args.stream)
    elif profile.stream is not None:
        items = build_stream(load_kb(args.kb), **profile.stream)
        source = f"built in memory from {args.kb.name}: {profile.stream}"
    else:
        stream = DOMAINS[args.domain][1]
        items, source = read_stream(stream), str(stream.relative_to(REPO))
    return (items[: args.limit] if args.limit else items), source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.stream_distill", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--domain",
        choices=list(DOMAINS),
        default="kestrel",
        help="kestrel (bench/data/kb.jsonl, stream.jsonl) or bank (kb_bank.jsonl, stream_bank.jsonl)",
    )
    p.add_argument("--stream", type=Path, default=None, help="JSONL stream (default: the domain's)")
    p.add_argument("--window", type=int, default=None, help="requests per reported window")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument(
        "--quick", action="store_true", help="40 requests over 5 intents, with small runs: a few minutes on 2 cores"
    )
    p.add_argument("--threshold", type=float, default=None, help="skip the median rule and use this threshold")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument(
        "--loop-off",
        choices=["derive", "run"],
        default="derive",
        help="derive loop off from the all-student and all-teacher answers (default), or replay it too",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="LoRA learning rate (default: the product's; TIERGATE_DISTILL__LORA__LR wins)",
    )
    p.add_argument("--replot", type=Path, default=None, help="only redraw the PNG of this result JSON")
    p.add_argument(
        "--reuse-static", type=Path, default=None, help="take all-student, all-teacher, loop off from this result JSON"
    )
    p.add_argument(
        "--kb", type=Path, default=None, help="knowledge base for the teacher prompt (default: the domain's)"
    )
    p.add_argument(
        "--teacher-prompt",
        choices=get_args(PromptStyle),
        default="faq",
        help="how the knowledge base is written into the teacher's prompt (bench.kb.teacher_prompt)",
    )
    p.add_argument(
        "--teacher-kb",
        choices=["stream", "all"],
        default="stream",
        help="the entries the stream asks about (by `intent`), or the whole knowledge base",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output path prefix (default bench/results/stream_distill_<domain>[_quick])",
    )
    args = p.parse_args(argv)
    if args.kb is None:
        args.kb = DOMAINS[args.domain][0]
    return args


def default_prefix(domain: str, quick: bool) -> Path:
    return RESULTS / f"stream_distill_{domain}{'_quick' if quick else ''}"


async def amain(args: argparse.Namespace) -> None:
    profile = QUICK if args.quick else FULL
    args.window = args.window or profile.window
    items, source = load_items(args, profile)
    prompt = teacher_prompt_for(items, load_kb(args.kb), args.teacher_prompt, args.teacher_kb)
    prefix = args.out or default_prefix(args.domain, args.quick)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    logs = prefix.parent / f"{prefix.name}_logs"
    logs.mkdir(exist_ok=True)
    result = RunResult(threshold=args.threshold)
    if args.reuse_static is not None:
        reuse_static(args.reuse_static, items, args.window, result)
    n_held = sum(i.split == "heldout" for i in items)
    settings = overrides(profile, args.lr)
    print_overrides(settings, profile, prompt)
    console.log(
        f"{args.domain}: {len(items)} requests ({n_held} held-out) from {source}; windows of {args.window}; "
        f"{os.cpu_count()} CPUs"
    )
    started, t0 = time.time(), time.perf_counter()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        static = [n for n in STATIC if n in args.configs and n not in result.rows]
        if static:
            await run_static(items, static, args, profile, prompt, result, progress, logs)
        if "loop_on" in args.configs:
            await run_online(items, args, profile, prompt, result, progress, logs)
    elapsed = time.perf_counter() - t0
    relative_costs(result)
    print_tables(result)
    summ = summary(result)
    lq = last_quarter(result.outcomes, {n: request_costs(result.rows[n], outs) for n, outs in result.outcomes.items()})
    promo = result.distill.get("promotions")
    goal_list = goals(lq, promo)
    out = {
        "benchmark": "stream_distill",
        "domain": args.domain,
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "machine": {**machine(), "platform": platform.platform()},
        "git": git_state(),
        "stream": {"source": source, "requests": len(items), "heldout": n_held, "window": args.window},
        "threshold": result.threshold,
        "threshold_rule": "given" if args.threshold is not None else "median of all-student confidences",
        "reused_static_from": str(args.reuse_static) if args.reuse_static else None,
        "student_confidence": result.confidence_quantiles,
        "max_tokens": MAX_TOKENS,
        "profile": {"name": profile.name, "window": args.window, "ref_concurrency": profile.ref_concurrency},
        # What the gateways change from the product defaults, and why ({prompt}, {tmp}, {admin_key}
        # stand for the teacher prompt, the temporary folder and the per-gateway key).
        "overrides": {k: asdict(o) for k, o in settings.items()},
        "teacher_prompt": prompt,
        "elapsed_s": {"total": elapsed, "budget": BUDGET_S, **result.phases},
        "summary": summ,
        "last_quarter": lq,
        "goals": [asdict(g) for g in goal_list],
        "promotions": promo,
        "labels": result.distill.get("labels"),
        "windows": {name: [asdict(r) for r in rows] for name, rows in result.rows.items()},
        "distill": result.distill,
        "outcomes": {name: [asdict(o) for o in outs] for name, outs in result.outcomes.items()},
    }
    prefix.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    write_csv(result, prefix.with_suffix(".csv"))
    plot(result, prefix.with_suffix(".png"), args.window)
    for name, s in summ.items():
        console.print(
            f"{CONFIGS[name].label:28s} escalation {_fmt(s['escalation_rate'])} "
            f"(first {_fmt(s['first_window_escalation'])}, last {_fmt(s['last_window_escalation'])})  "
            f"held-out served {_fmt(s['served_quality'])} student {_fmt(s['student_quality'])}  "
            f"cost vs all-teacher {_fmt(s['rel_cost_vs_all_teacher'])}"
        )
    if result.distill:
        console.print(f"distillation runs: {result.distill['runs']}; gate: {result.distill['gate']}")
    print_goals(lq, goal_list, promo, result.distill.get("labels"), quick=args.quick)
    print_timing(result, elapsed, reused=args.reuse_static is not None)
    console.print(f"wrote {prefix}.json, .csv, .png (gateway logs in {logs})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot is not None:
        replot(args.replot)
    else:
        asyncio.run(amain(args))


if __name__ == "__main__":
    main()
