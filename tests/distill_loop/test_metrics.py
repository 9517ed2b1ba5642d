"""Agreement metrics on hand-computed cases."""

from __future__ import annotations

import pytest

from distill_loop.metrics import fact_f1, facts, normalise, token_f1

REF = "Unused bikes can be returned within 41 days at our Tacoma returns center."


def test_facts_are_numbers_and_in_sentence_names() -> None:
    assert facts(REF) == {"41", "tacoma"}  # "Unused" opens the sentence: not a name
    assert facts("The Glide costs $1,200. Ask Voltwise.") == {"glide", "1200", "voltwise"}
    assert facts("no facts here") == set()


def test_fact_f1_zeroes_the_right_shape_with_the_wrong_number() -> None:
    wrong = "Unused bikes can be returned within 30 days at our Tacoma returns center."
    # 12 of 13 tokens shared both ways: token F1 = 12/13; one of two facts stated
    assert token_f1(wrong, REF) == pytest.approx(12 / 13)
    assert fact_f1(wrong, REF) == pytest.approx(12 / 13 * 1 / 2)
    assert fact_f1(REF, REF) == 1.0
    short = "Returns: 41 days, Tacoma."
    # candidate tokens returns 41 days tacoma; 4 shared of 4 and 13: F1 = 2·1·(4/13)/(1 + 4/13)
    assert fact_f1(short, REF) == pytest.approx(8 / 17)


def test_fact_f1_is_token_f1_when_the_reference_states_no_fact() -> None:
    assert fact_f1("happy to help", "glad to help") == token_f1("happy to help", "glad to help")


def test_answers_in_other_scripts_are_compared_word_by_word() -> None:
    """ASCII-only words made every Chinese or Russian answer empty, so any two agreed (1.0)."""
    assert token_f1("退款需要五个工作日", "退款需要三个工作日") == pytest.approx(8 / 9)
    assert token_f1("退款需要五个工作日", "请重置您的密码") < 0.2
    assert token_f1("Возврат займёт пять дней", "Сбросьте пароль на странице") == 0.0
    assert token_f1("Возврат займёт пять дней", "возврат займёт пять дней!") == 1.0
    assert normalise("Straße 12") == ["strasse", "12"]
