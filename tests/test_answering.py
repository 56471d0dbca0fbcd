"""How answers are cut into streamed pieces: stop strings end them and are never half-sent."""
from __future__ import annotations

from daemon.answering import first_stop, held_back


def test_the_earliest_stop_string_ends_the_text() -> None:
    assert first_stop("Paris. Then Rome\n", ("\n", ". T")) == 5


def test_text_without_a_stop_string_has_no_stop() -> None:
    assert first_stop("Paris", ("\n",)) is None


def test_the_start_of_a_stop_string_is_held_back_until_it_is_decided() -> None:
    assert held_back("Paris<|e", ("<|end|>",)) == 3


def test_nothing_is_held_back_when_the_end_cannot_start_a_stop_string() -> None:
    assert held_back("Paris", ("<|end|>", "\n")) == 0


def test_the_longest_possible_start_is_held_back() -> None:
    assert held_back("a##", ("#x", "##y")) == 2
