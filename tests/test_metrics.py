"""F1 / exact match with SQuAD normalisation, max over gold answers (hand-made cases)."""

from __future__ import annotations

import pytest

from zoexp.metrics import accuracy, exact_match, f1, normalize_answer


def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("An apple a day, the doctor's away.") == "apple day doctors away"
    assert normalize_answer("theory of the atom") == "theory of atom"  # "the" inside a word stays


@pytest.mark.parametrize("prediction,golds,em", [
    ("Denver Broncos", ["Denver Broncos"], 1.0),
    ("the Denver Broncos.", ["Denver Broncos"], 1.0),   # article and punctuation
    ("DENVER broncos", ["Denver Broncos"], 1.0),        # case
    ("Broncos", ["Denver Broncos"], 0.0),
    ("Carolina Panthers", ["Denver Broncos", "carolina panthers"], 1.0),  # any gold answer
    ("", ["Denver Broncos"], 0.0),
])
def test_exact_match(prediction, golds, em):
    assert exact_match(prediction, golds) == em


@pytest.mark.parametrize("prediction,golds,expected", [
    ("Denver Broncos", ["Denver Broncos"], 1.0),
    ("the Broncos of Denver", ["Denver Broncos"], 0.8),        # P = 2/3, R = 1
    ("Broncos", ["Denver Broncos"], 2 / 3),                    # P = 1, R = 1/2
    ("Carolina", ["Denver Broncos", "Carolina Panthers"], 2 / 3),  # max over the gold answers
    ("a the an", ["Denver Broncos"], 0.0),                     # only articles: empty after normalisation
    ("", ["Denver Broncos"], 0.0),
    ("4", ["4", "four"], 1.0),
    ("Denver Denver", ["Denver Broncos"], 0.5),                # counts are clipped: 1 common token
])
def test_f1(prediction, golds, expected):
    assert f1(prediction, golds) == pytest.approx(expected)


def test_accuracy():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
