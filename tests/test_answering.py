"""How answers are cut into streamed pieces (stop strings end them and are never half-sent), and
how the answer worker comes and goes with the requests."""
from __future__ import annotations

import threading
import time

import pytest

from daemon.answering import Answering, Asked, Busy, Snapshot, TooLong, first_stop, held_back
from daemon.compute import on_own_thread


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


def _whole(answers: Answering, prompt: str) -> str:
    answer = answers.submit(Asked(prompt, prompt, max_tokens=4))
    text = []
    while not (piece := answer.pieces.get(timeout=60)).finish_reason:
        text.append(piece.text)
    return "".join(text) + piece.text


def _until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_the_answer_worker_ends_once_no_request_waits_and_the_next_request_starts_another(tiny) -> None:
    answers = Answering(Snapshot.of("v0001", tiny, None))
    try:
        first = _whole(answers, "The capital of France is")
        assert _until(lambda: not answers.working)
        assert not [t for t in threading.enumerate() if t.name == "mendd-answers"]
        assert _whole(answers, "The capital of France is") == first
    finally:
        answers.close()


def test_a_closed_answering_refuses_new_requests(tiny) -> None:
    answers = Answering(Snapshot.of("v0001", tiny, None))
    answers.close()
    with pytest.raises(Busy):
        answers.submit(Asked("The capital of France is", "The capital of France is"))


def test_work_on_its_own_thread_returns_its_result_and_the_thread_ends() -> None:
    names: list[str] = []
    assert on_own_thread(lambda: names.append(threading.current_thread().name) or 7, "mendd-probe") == 7
    assert names == ["mendd-probe"]
    assert not [t for t in threading.enumerate() if t.name == "mendd-probe"]


def test_work_on_its_own_thread_raises_its_error_in_the_caller() -> None:
    def fail() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        on_own_thread(fail, "mendd-probe")


def test_a_cancelled_answer_stops_between_tokens_and_a_queued_one_is_skipped(tiny) -> None:
    answers = Answering(Snapshot.of("v0001", tiny, None))
    try:
        running = answers.submit(Asked("The capital of France is", "The capital of France is", max_tokens=200))
        waiting = answers.submit(Asked("The capital of Spain is", "The capital of Spain is", max_tokens=200))
        waiting.cancelled.set()
        running.pieces.get(timeout=60)
        running.cancelled.set()
        assert _until(lambda: not answers.working)
        assert running.completion_tokens < 200 and waiting.completion_tokens == 0
    finally:
        answers.close()


def test_a_prompt_beyond_the_context_window_is_refused_before_it_queues(tiny) -> None:
    answers = Answering(Snapshot.of("v0001", tiny, None))
    window = tiny.model.config.max_position_embeddings
    try:
        with pytest.raises(TooLong, match=str(window)):
            answers.submit(Asked("Paris " * window, "Paris", max_tokens=4))
        with pytest.raises(TooLong):
            answers.submit(Asked("Paris", "Paris", max_tokens=window))
        started = time.monotonic()
        with pytest.raises(TooLong):  # refused on its length in characters, without tokenizing it all
            answers.submit(Asked("x" * (1 << 20), "x", max_tokens=4))
        assert time.monotonic() - started < 0.5
        assert not answers.working
    finally:
        answers.close()
