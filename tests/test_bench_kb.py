"""The stream benchmark's knowledge bases: scoring, the teacher's prompt and the streams they build.

These guard the benchmark's integrity: a held-out phrasing must never reach the teacher's prompt
or the trained traffic, a fact must be found only as a whole word or number, and copying a
neighbouring entry's answer must score nothing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bench.kb import (
    DATA,
    DEFAULT_KB,
    DEFAULT_STREAM,
    build_stream,
    company_of,
    fact_present,
    key_fact_recall,
    load_kb,
    main,
    paired_name,
    read_stream,
    teacher_prompt,
)
from bench.stream_distill import teacher_prompt_for

# Each knowledge base with its company and its committed stream.
DOMAINS = [
    pytest.param(DEFAULT_KB, "Kestrel Cycles", DEFAULT_STREAM, id="kestrel"),
    pytest.param(DATA / "kb_bank.jsonl", "Harborline Credit Union", DATA / "stream_bank.jsonl", id="bank"),
]
KBS = [pytest.param(p.values[0], id=p.id) for p in DOMAINS]


def test_facts_are_found_only_as_whole_words_or_numbers() -> None:
    assert fact_present("Returns within 41 days at Tacoma.", "41")
    assert not fact_present("Returns within 412 days.", "41")
    assert not fact_present("Founded in 2041.", "41")
    assert fact_present("Use the Kestrel-Care portal", "Kestrel Care")  # hyphens read as spaces
    assert key_fact_recall("41 days, shipped to tacoma", ["41", "Tacoma"]) == 1.0
    assert key_fact_recall("about 40 days", ["41", "Tacoma"]) == 0.0


@pytest.mark.parametrize("path", KBS)
def test_every_entry_has_six_train_and_two_held_out_phrasings_and_its_own_facts(path: Path) -> None:
    kb = load_kb(path)
    assert len({k.id for k in kb}) == len(kb)
    for k in kb:
        assert len(k.train) == 6 and len(k.heldout) == 2, k.id
        assert k.train[0] == k.question, k.id
        assert not set(k.train) & set(k.heldout), k.id
        assert len(k.key_facts) >= 2 and key_fact_recall(k.answer, k.key_facts) == 1.0, k.id


@pytest.mark.parametrize("path", KBS)
def test_no_key_fact_occurs_in_another_entrys_answer(path: Path) -> None:
    """Copying a neighbouring line scores 0."""
    kb = load_kb(path)
    clashes = [(k.id, f, o.id) for k in kb for f in k.key_facts for o in kb if o is not k and fact_present(o.answer, f)]
    assert clashes == []


@pytest.mark.parametrize(("path", "company", "stream"), DOMAINS)
def test_the_prompt_names_the_knowledge_bases_company(path: Path, company: str, stream: Path) -> None:
    kb = load_kb(path)
    assert company_of(kb) == company
    for style in ("faq", "transcript", "qa"):
        prompt = teacher_prompt(kb, style)
        assert company in prompt
        assert not any(other.values[1] in prompt for other in DOMAINS if other.values[1] != company)


def test_a_knowledge_base_belongs_to_one_company(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in DEFAULT_KB.read_text().splitlines()[:2]]
    rows[1]["company"] = "Harborline Credit Union"
    mixed = tmp_path / "kb.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="one company"):
        load_kb(mixed)
    del rows[1]["company"]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"kb.jsonl:2: .*company"):
        load_kb(mixed)


@pytest.mark.parametrize("path", KBS)
def test_the_faq_prompt_lists_every_train_phrasing_and_no_held_out_one(path: Path) -> None:
    kb = load_kb(path)
    prompt = teacher_prompt(kb, "faq")
    for intent in kb:
        assert all(f"Customer: {q}\nAgent: {intent.answer}" in prompt for q in intent.train)
        assert not any(q in prompt for q in intent.heldout)
    canonical = teacher_prompt(kb, "transcript")
    assert canonical.count("Customer:") == len(kb) < prompt.count("Customer:")


@pytest.mark.parametrize(("path", "company", "stream"), DOMAINS)
def test_the_benchmark_teacher_knows_the_streams_intents(path: Path, company: str, stream: Path) -> None:
    kb, items = load_kb(path), read_stream(stream)
    asked = {i.intent for i in items}
    scoped = teacher_prompt_for(items, kb, "faq", "stream")
    assert {k.id for k in kb if k.answer in scoped} == asked
    assert not any(q in scoped for k in kb for q in k.heldout)
    assert teacher_prompt_for(items, kb, "faq", "all") == teacher_prompt(kb, "faq")
    # A user's stream without intent ids gets the whole knowledge base.
    anonymous = [replace(i, intent=None) for i in items]
    assert teacher_prompt_for(anonymous, kb, "faq", "stream") == teacher_prompt(kb, "faq")


@pytest.mark.parametrize(("path", "company", "stream"), DOMAINS)
def test_the_committed_stream_is_what_the_builder_makes(path: Path, company: str, stream: Path) -> None:
    """14 intents; held-out items are every 4th request, and their phrasings are the knowledge
    base's held-out ones."""
    kb = load_kb(path)
    items = read_stream(stream)
    assert items == build_stream(kb, length=480, intents=14, seed=0)
    assert len({i.intent for i in items}) == 14
    heldout = {q for k in kb for q in k.heldout}
    for n, item in enumerate(items):
        assert (item.split == "heldout") == (n % 4 == 3)
        assert (item.messages[-1]["content"] in heldout) == (item.split == "heldout")


def test_the_stream_command_writes_beside_its_knowledge_base(tmp_path: Path) -> None:
    assert paired_name(DEFAULT_KB, "stream") == "stream"
    assert paired_name(DATA / "kb_bank.jsonl", "stream") == "stream_bank"
    assert paired_name(Path("faq.jsonl"), "kb_probe") == "kb_probe_faq"
    kb = tmp_path / "kb_bank.jsonl"
    kb.write_text((DATA / "kb_bank.jsonl").read_text())
    main(["--kb", str(kb), "stream", "--length", "24"])
    assert read_stream(tmp_path / "stream_bank.jsonl") == build_stream(load_kb(kb), length=24, intents=14, seed=0)
