"""A support knowledge base: load it, score answers by key facts, build the teacher prompt and the
request stream, and probe how well each tier answers it.

Two fictional companies ship with the benchmark: Kestrel Cycles, an e-bike maker
(`bench/data/kb.jsonl`, the default), and Harborline Credit Union, a bank
(`bench/data/kb_bank.jsonl`). Each row names its company, which the teacher's prompt addresses.
The stream is built deterministically (seeded) from the knowledge base; nothing here starts a
gateway. `probe` loads the real models in-process (`models.LocalBackend`) and never trains.

    python -m bench.kb [--kb FILE] stream [--length 480] [--intents 14] [--out FILE]
    python -m bench.kb [--kb FILE] prompt [--style faq|transcript|qa] [--intents ID ...]
    python -m bench.kb [--kb FILE] probe [--stream FILE] [--splits train heldout] [--out FILE]

`--kb bench/data/kb_bank.jsonl stream` writes `bench/data/stream_bank.jsonl`: a knowledge base
`kb<tag>.jsonl` pairs with `stream<tag>.jsonl` and, for `probe`, `results/kb_probe<tag>[_stream].json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

DATA = Path(__file__).parent / "data"
DEFAULT_KB = DATA / "kb.jsonl"
DEFAULT_STREAM = DATA / "stream.jsonl"
RESULTS = Path(__file__).parent / "results"

Split = Literal["train", "heldout"]
PromptStyle = Literal["faq", "transcript", "qa"]

# Templates of the teacher prompt's framing; `{company}` is the knowledge base's (see `company_of`).
# The transcript style scored best in the probe (bench/README.md, "Online distillation on a stream").
TRANSCRIPT_HEADER = (
    "Transcripts of {company} customer support chats. "
    "The agent answers every question with the facts from the answers below."
)
QA_HEADER = "{company} customer support. Knowledge base:"
QA_FOOTER = (
    "The following is a conversation between a customer and a {company} support agent. "
    "The agent answers in one sentence, copying the facts from the matching knowledge-base line."
)


@dataclass(frozen=True, slots=True)
class Intent:
    id: str
    company: str  # whose support this is; the same on every row of a knowledge base
    question: str  # canonical question (what the teacher's prompt shows)
    answer: str  # one sentence holding every key fact
    key_facts: tuple[str, ...]  # strings a correct answer must contain
    train: tuple[str, ...]  # paraphrases that may be sent through the tiered route (and trained on)
    heldout: tuple[str, ...]  # paraphrases that never become training signal

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Intent:
        return cls(
            id=row["id"],
            company=row["company"],
            question=row["question"],
            answer=row["answer"],
            key_facts=tuple(row["key_facts"]),
            train=tuple(row["train"]),
            heldout=tuple(row["heldout"]),
        )


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One request of a replayed stream (one JSONL line; see bench/README.md for the format)."""

    messages: tuple[dict[str, str], ...]
    reference: str | None = None
    key_facts: tuple[str, ...] = ()
    split: Split = "train"
    intent: str | None = None

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"messages": list(self.messages), "split": self.split}
        if self.reference is not None:
            row["reference"] = self.reference
        if self.key_facts:
            row["key_facts"] = list(self.key_facts)
        if self.intent is not None:
            row["intent"] = self.intent
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> StreamItem:
        split = row.get("split", "train")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
        messages = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"])
        if not messages:
            raise ValueError("a stream item needs at least one message")
        return cls(messages, row.get("reference"), tuple(row.get("key_facts") or ()), split, row.get("intent"))


def load_kb(path: Path = DEFAULT_KB) -> list[Intent]:
    kb = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            kb.append(Intent.from_json(json.loads(line)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{n}: not a knowledge-base entry: {exc!r}") from exc
    company_of(kb)  # one company per file
    return kb


def company_of(kb: Sequence[Intent]) -> str:
    """The one company whose knowledge `kb` holds."""
    companies = {k.company for k in kb}
    if not companies:
        raise ValueError("an empty knowledge base")
    if len(companies) != 1:
        raise ValueError(f"a knowledge base belongs to one company, not {sorted(companies)}")
    return companies.pop()


def paired_name(kb_path: Path, kind: str) -> str:
    """`kind` tagged like the knowledge base's file name: ("kb.jsonl", "stream") -> "stream",
    ("kb_bank.jsonl", "stream") -> "stream_bank", ("faq.jsonl", "stream") -> "stream_faq"."""
    stem = kb_path.stem
    return kind + (stem[2:] if stem == "kb" or stem.startswith("kb_") else f"_{stem}")


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[-\u2010-\u2015]", " ", text.lower()).split())


def fact_present(answer: str, fact: str) -> bool:
    """Case-insensitive; hyphens count as spaces; a fact must not sit inside a longer word or number
    ("11" is not found in "112" or "2011")."""
    pattern = r"(?<![a-z0-9])" + re.escape(_norm(fact)) + r"(?![a-z0-9])"
    return re.search(pattern, _norm(answer)) is not None


def key_fact_recall(answer: str, facts: Sequence[str]) -> float:
    """Share of `facts` present in `answer`, in [0, 1]."""
    if not facts:
        raise ValueError("no key facts to score against")
    return sum(fact_present(answer, f) for f in facts) / len(facts)


def teacher_prompt(kb: Sequence[Intent], style: PromptStyle = "transcript") -> str:
    """The teacher's static system prompt: every entry of `kb`.

    `faq`: every known phrasing of every entry (its `train` paraphrases, never the held-out ones)
    as a past "Customer:/Agent:" exchange, like a support FAQ that lists how customers ask.
    `transcript`: the same with the canonical question only. `qa`: one "Q: … A: …" line per
    intent plus a one-shot exchange. The gateway's transcript format appends the live
    conversation after it, so the base model's next "Agent:" turn copies from the matching one.
    """
    company = company_of(kb)
    if style in ("faq", "transcript"):
        asked = (lambda k: k.train) if style == "faq" else (lambda k: (k.question,))
        turns = [f"Customer: {q}\nAgent: {k.answer}" for k in kb for q in asked(k)]
        return TRANSCRIPT_HEADER.format(company=company) + "\n\n" + "\n\n".join(turns)
    lines = "\n".join(f"Q: {k.question} A: {k.answer}" for k in kb)
    shot = kb[min(4, len(kb) - 1)]
    header, footer = QA_HEADER.format(company=company), QA_FOOTER.format(company=company)
    return f"{header}\n{lines}\n\n{footer}\n\nCustomer: {shot.train[3]}\nAgent: {shot.answer}"


def build_stream(
    kb: Sequence[Intent],
    *,
    length: int,
    heldout_every: int = 4,
    intents: int | None = None,
    seed: int = 0,
) -> list[StreamItem]:
    """A deterministic request stream: train paraphrases, with every `heldout_every`-th request a
    held-out one, so each window carries the same share of held-out items.

    `intents` keeps a seeded subset of the knowledge base (popular questions recur more often);
    each pool is shuffled and replayed in a fresh seeded order when it runs out.
    """
    if length < 1 or heldout_every < 2:
        raise ValueError("length must be >= 1 and heldout_every >= 2")
    rng = random.Random(seed)
    chosen = list(kb) if intents is None or intents >= len(kb) else rng.sample(list(kb), intents)
    train = [(k, q) for k in chosen for q in k.train]
    heldout = [(k, q) for k in chosen for q in k.heldout]
    if not train or not heldout:
        raise ValueError("the knowledge base needs train and held-out paraphrases")

    def cycle(pool: list[tuple[Intent, str]]) -> Any:
        while True:
            order = pool[:]
            rng.shuffle(order)
            yield from order

    draw = {"train": cycle(train), "heldout": cycle(heldout)}
    out = []
    for i in range(length):
        split: Split = "heldout" if i % heldout_every == heldout_every - 1 else "train"
        intent, question = next(draw[split])
        out.append(
            StreamItem(({"role": "user", "content": question},), intent.answer, intent.key_facts, split, intent.id)
        )
    return out


def asked_intents(kb: Sequence[Intent], items: Sequence[StreamItem]) -> list[Intent]:
    """The entries a stream asks about (by its items' `intent`); all of `kb` when it names none."""
    asked = {i.intent for i in items if i.intent}
    return [k for k in kb if k.id in asked] if asked else list(kb)


def write_stream(path: Path, items: Sequence[StreamItem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item.to_json()) + "\n" for item in items))


def read_stream(path: Path) -> list[StreamItem]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(StreamItem.from_json(json.loads(line)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{n}: not a stream item: {exc}") from exc
    return items


# -- probe ---------------------------------------------------------------------------------------
async def _answers(backend: Any, questions: Sequence[str], max_tokens: int, label: str) -> list[str]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from models import ChatMessage, SamplingParams
    from models.progress import Progress

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task(label, total=len(questions))

        async def one(question: str) -> str:
            gen = await backend.generate((ChatMessage("user", question),), params)
            bar.advance(task)
            return str(gen.text).strip()

        return list(await asyncio.gather(*(one(q) for q in questions)))


async def probe(
    kb: Sequence[Intent],
    setups: Sequence[str],
    max_tokens: int,
    limit: int | None,
    splits: Sequence[Split] = ("heldout",),
) -> dict[str, Any]:
    """Greedy answers to every question of `splits` from each set-up; key-fact recall per set-up.

    `kb` is both what the teachers know and what they are asked about."""
    import torch

    from models import BackendConfig
    from models.local import LocalBackend

    torch.set_num_threads(1)
    items = [(k, q, split) for split in splits for k in kb for q in getattr(k, split)][:limit]
    questions = [q for _, q, _ in items]

    def gemma(style: PromptStyle) -> BackendConfig:  # the FAQ of all 41 intents is about 8k tokens
        prompt = teacher_prompt(kb, style)
        return BackendConfig(
            model="gemma-3-270m", prompt_format="transcript", max_model_len=16384, system_prompt=prompt
        )

    configs = {
        "teacher+faq": gemma("faq"),
        "teacher+kb": gemma("transcript"),
        "teacher+kb_qa": gemma("qa"),
        "student": BackendConfig(model="smollm2-135m-instruct", prompt_format="chat_template"),
        "student+kb": BackendConfig(
            model="smollm2-135m-instruct", prompt_format="chat_template", system_prompt=teacher_prompt(kb, "qa")
        ),
    }
    out: dict[str, Any] = {"questions": len(items), "max_tokens": max_tokens, "setups": {}}
    for name in setups:
        # Queued requests count against the whole-generation deadline, so allow for the queue.
        cfg = configs[name].model_copy(update={"max_batch_size": 8, "read_timeout_s": 3600.0})
        backend = LocalBackend(cfg)
        await backend.start()
        start = time.perf_counter()
        try:
            answers = await _answers(backend, questions, max_tokens, name)
        finally:
            await backend.aclose()
        scores = [key_fact_recall(a, k.key_facts) for a, (k, _, _) in zip(answers, items, strict=True)]
        per_split = {
            split: round(sum(sc for sc, (_, _, sp) in zip(scores, items, strict=True) if sp == split) / n, 4)
            for split in splits
            if (n := sum(sp == split for _, _, sp in items))
        }
        out["setups"][name] = {
            "recall": round(sum(scores) / len(scores), 4),
            "recall_by_split": per_split,
            "seconds": round(time.perf_counter() - start, 1),
            "answers": [
                {"intent": k.id, "question": q, "split": sp, "answer": a, "recall": s}
                for (k, q, sp), a, s in zip(items, answers, scores, strict=True)
            ],
        }
        shown = ", ".join(f"{sp} {r:.3f}" for sp, r in per_split.items())
        print(f"{name:14s} key-fact recall {shown} ({len(items)} questions)", flush=True)  # noqa: T201
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.kb", description=__doc__.split("\n\n")[0])
    p.add_argument("--kb", type=Path, default=DEFAULT_KB)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stream", help="write a request stream built from the knowledge base")
    s.add_argument("--out", type=Path, default=None, help="default: bench/data/stream<tag>.jsonl for kb<tag>.jsonl")
    s.add_argument("--length", type=int, default=480)
    s.add_argument("--heldout-every", type=int, default=4, help="every N-th request is held out (default 4)")
    s.add_argument("--intents", type=int, default=14, help="a seeded subset of this many intents (0: all)")
    s.add_argument("--seed", type=int, default=0)
    pr = sub.add_parser("prompt", help="print the teacher's system prompt")
    pr.add_argument("--style", choices=get_args(PromptStyle), default="faq")
    pr.add_argument("--intents", nargs="*", default=None, help="only these intent ids (default: all)")
    pb = sub.add_parser("probe", help="key-fact recall of each tier on the held-out questions")
    setups = ["teacher+faq", "teacher+kb", "teacher+kb_qa", "student", "student+kb"]
    pb.add_argument("--setups", nargs="+", choices=setups, default=setups)
    pb.add_argument("--max-tokens", type=int, default=40)
    pb.add_argument("--limit", type=int, default=None, help="first N questions only")
    pb.add_argument("--splits", nargs="+", choices=["train", "heldout"], default=["heldout"])
    pb.add_argument(
        "--stream",
        type=Path,
        default=None,
        help="only the intents this stream asks about (what the stream benchmark's teacher knows)",
    )
    pb.add_argument("--out", type=Path, default=None, help="default results/kb_probe<tag>[_stream].json")
    args = p.parse_args(argv)
    kb = load_kb(args.kb)
    if args.cmd == "stream":
        intents = args.intents or None
        items = build_stream(kb, length=args.length, heldout_every=args.heldout_every, intents=intents, seed=args.seed)
        args.out = args.out or args.kb.with_name(paired_name(args.kb, "stream") + ".jsonl")
        write_stream(args.out, items)
        n_held = sum(i.split == "heldout" for i in items)
        print(f"wrote {len(items)} requests ({n_held} held-out) to {args.out}")  # noqa: T201
    elif args.cmd == "prompt":
        scoped = [k for k in kb if args.intents is None or k.id in args.intents]
        sys.stdout.write(teacher_prompt(scoped, args.style) + "\n")
    else:
        if args.stream is not None:
            kb = asked_intents(kb, read_stream(args.stream))
        result = asyncio.run(probe(kb, args.setups, args.max_tokens, args.limit, args.splits))
        result["intents"] = [k.id for k in kb]
        args.out = args.out or RESULTS / (
            paired_name(args.kb, "kb_probe") + ("_stream" if args.stream else "") + ".json"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")  # noqa: T201


if __name__ == "__main__":
    main()
