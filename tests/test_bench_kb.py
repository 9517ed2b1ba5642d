"""The stream benchmark's knowledge base: scoring, the teacher's prompt and the stream it builds.

These guard the benchmark's integrity: a held-out phrasing must never reach the teacher's prompt
or the trained traffic, and a fact must be found only as a whole word or number.
"""

from __future__ import annotations

from dataclasses import replace

from bench.kb import DEFAULT_STREAM, build_stream, fact_present, key_fact_recall, load_kb, read_stream, teacher_prompt
from bench.stream_distill import teacher_prompt_for


def test_facts_are_found_only_as_whole_words_or_numbers() -> None:
    assert fact_present("Returns within 41 days at Tacoma.", "41")
    assert not fact_present("Returns within 412 days.", "41")
    assert not fact_present("Founded in 2041.", "41")
    assert fact_present("Use the Kestrel-Care portal", "Kestrel Care")  # hyphens read as spaces
    assert key_fact_recall("41 days, shipped to tacoma", ["41", "Tacoma"]) == 1.0
    assert key_fact_recall("about 40 days", ["41", "Tacoma"]) == 0.0


def test_the_faq_prompt_lists_every_train_phrasing_and_no_held_out_one() -> None:
    kb = load_kb()
    prompt = teacher_prompt(kb, "faq")
    for intent in kb:
        assert all(f"Customer: {q}\nAgent: {intent.answer}" in prompt for q in intent.train)
        assert not any(q in prompt for q in intent.heldout)
    canonical = teacher_prompt(kb, "transcript")
    assert canonical.count("Customer:") == len(kb) < prompt.count("Customer:")


def test_the_benchmark_teacher_knows_the_streams_intents() -> None:
    kb, items = load_kb(), read_stream(DEFAULT_STREAM)
    asked = {i.intent for i in items}
    scoped = teacher_prompt_for(items, kb, "faq", "stream")
    assert {k.id for k in kb if k.answer in scoped} == asked
    assert teacher_prompt_for(items, kb, "faq", "all") == teacher_prompt(kb, "faq")
    # A user's stream without intent ids gets the whole knowledge base.
    anonymous = [replace(i, intent=None) for i in items]
    assert teacher_prompt_for(anonymous, kb, "faq", "stream") == teacher_prompt(kb, "faq")


def test_the_committed_stream_is_what_the_builder_makes() -> None:
    """Held-out items are every 4th request, and their phrasings are the knowledge base's held-out ones."""
    kb = load_kb()
    items = read_stream(DEFAULT_STREAM)
    assert items == build_stream(kb, length=480, intents=10, seed=0)
    heldout = {q for k in kb for q in k.heldout}
    for n, item in enumerate(items):
        assert (item.split == "heldout") == (n % 4 == 3)
        assert (item.messages[-1]["content"] in heldout) == (item.split == "heldout")
