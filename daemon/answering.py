"""Answers for applications (the OpenAI-compatible endpoint, daemon/openai_api.py).

The service answers from a snapshot of the version it serves: its own copy of the model and
tokenizer, and the routed memory (immutable), published by the scheduler's worker whenever the
served version changes (an accept, an approval, a rollback, an operator's checkout). The cycle
swaps weights in and out of its own model while it judges candidates; the snapshot's copy never
sees that. A request keeps the snapshot it started with to its last token.

Requests wait in a bounded queue and one answer worker generates them one at a time: the
maintenance cycle runs on the scheduler's worker beside it, and torch's kernels release the GIL, so
neither stalls the other; when both are busy they share the cores. The worker lives only while
requests wait (a new one starts with the next request): an idle torch thread would halve the speed
of every other one (daemon/compute.py).

One request cannot take the worker: a prompt that does not fit the model's context window is
refused before it queues, and an answer whose client has left is cancelled (skipped if it still
waits, stopped between tokens if it is being generated).
"""
from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch

from editors.editable import Editable
from editors.routing import NONE, Memory
from editors.serving import next_tokens, serving_entry

log = logging.getLogger("mendd.answers")
QUEUE_DEPTH = 16  # requests waiting beyond the one being answered; more get 503 with Retry-After


@dataclass(frozen=True)
class Snapshot:
    """One served version, as answers read it."""

    version: str
    editable: Editable
    memory: Memory | None

    @classmethod
    def of(cls, version: str, editable: Editable, memory: Memory | None) -> "Snapshot":
        """A snapshot with its own copy of `editable`'s model and tokenizer."""
        own = Editable(copy.deepcopy(editable.model), copy.deepcopy(editable.tokenizer), editable.edit_names)
        return cls(version, own, memory)

    @cached_property
    def window(self) -> int:
        """The most tokens the model reads: the prompt and the answer together."""
        return self.editable.model.config.max_position_embeddings

    @cached_property
    def longest_token(self) -> int:
        """The most characters one token can stand for (its text in the vocabulary is no shorter)."""
        return max(map(len, self.editable.tokenizer.get_vocab()))

    def prompt_tokens(self, asked: Asked) -> int:
        """How many tokens `asked.text` is; TooLong if it and `asked.max_tokens` do not fit the window.
        A text longer than the room left could hold in the longest tokens is refused untokenized:
        tokenizing a 1 MiB prompt takes seconds."""
        room = self.window - asked.max_tokens
        if len(asked.text) > room * self.longest_token:
            raise TooLong(f"This model's maximum context length is {self.window} tokens; a prompt of "
                          f"{len(asked.text)} characters cannot fit the {max(room, 0)} left beside the "
                          f"{asked.max_tokens} for the completion. Please reduce the prompt or max_tokens.")
        count = len(self.editable.tokenizer(asked.text).input_ids)
        if count > room:
            raise TooLong(f"This model's maximum context length is {self.window} tokens. However, you requested "
                          f"{count + asked.max_tokens} tokens ({count} in the prompt, {asked.max_tokens} for the "
                          "completion). Please reduce the prompt or max_tokens.")
        return count


@dataclass(frozen=True)
class Asked:
    """What to generate: `text` as the model reads it (a chat already through its template), routed on
    `route` (a chat's last user message, as keys are read from plain prompts)."""

    text: str
    route: str
    max_tokens: int = 16
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Piece:
    """Text produced since the last piece; the final piece carries why generation ended."""

    text: str
    finish_reason: str | None = None  # "stop" (end of sequence or a stop string) or "length"


@dataclass
class Answer:
    """A request on its way: the snapshot it is answered from and the pieces as they come."""

    asked: Asked
    snapshot: Snapshot
    served_by: str | None = None  # the correction whose entry served it (routed memory)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pieces: queue.Queue = field(default_factory=queue.Queue)  # Piece, or an Exception, per item
    cancelled: threading.Event = field(default_factory=threading.Event)  # set once no one waits for it


class Busy(Exception):
    """The answer queue is full: ask again later."""


class TooLong(ValueError):
    """The prompt and the tokens asked for do not fit the model's context window."""


def answer_pieces(snapshot: Snapshot, answer: Answer) -> Iterator[Piece]:
    """Generate `answer.asked` from `snapshot`, as pieces of text; fills in the answer's counts and entry."""
    asked, editable, memory = answer.asked, snapshot.editable, snapshot.memory
    tokenizer = editable.tokenizer
    entry = serving_entry(editable, asked.route, memory) if memory is not None and asked.route.strip() else NONE
    answer.served_by = memory.entries[entry].correction_id if entry != NONE else None
    generator = torch.Generator().manual_seed(asked.seed) if asked.seed is not None else None
    ids: list[int] = []
    sent = ""
    for step in next_tokens(editable, [asked.text], asked.max_tokens, memory, [entry], asked.temperature, generator):
        if answer.cancelled.is_set():  # its client has left: the worker is someone else's now
            return
        token = int(step[0])
        if token == tokenizer.eos_token_id:
            yield Piece(_unsent(tokenizer.decode(ids, skip_special_tokens=True), sent), "stop")
            return
        ids.append(token)
        answer.completion_tokens = len(ids)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        stopped = first_stop(text, asked.stop)
        if stopped is not None:
            yield Piece(_unsent(text[:stopped], sent), "stop")
            return
        ready = len(text) - held_back(text, asked.stop)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest of it
            ready = min(ready, len(text) - 1)
        if ready > len(sent):
            yield Piece(text[len(sent):ready])
            sent = text[:ready]
    yield Piece(_unsent(tokenizer.decode(ids, skip_special_tokens=True), sent), "length")


def _unsent(text: str, sent: str) -> str:
    return text[len(sent):]


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string begins in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string: not sent yet,
    so a stop string split across tokens is never half-streamed."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class Answering:
    """The served snapshot and the worker that answers from it."""

    def __init__(self, snapshot: Snapshot, depth: int = QUEUE_DEPTH):
        self._snapshot = snapshot
        self._queue: queue.Queue[Answer] = queue.Queue(maxsize=depth)
        self._lock = threading.Lock()  # a request never finds a worker on its way out
        self._worker: threading.Thread | None = None
        self._closed = False

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def working(self) -> bool:
        """Whether a worker is generating (it ends once no request waits)."""
        with self._lock:
            return self._worker is not None

    def publish(self, snapshot: Snapshot) -> None:
        """Answer new requests from `snapshot`; requests already started keep theirs."""
        self._snapshot = snapshot
        log.info("answers now come from %s", snapshot.version)

    def submit(self, asked: Asked) -> Answer:
        """Queue `asked`; its pieces arrive on the returned answer. Raises TooLong when it does not fit
        the model's context window, Busy when the queue is full."""
        snapshot = self._snapshot
        answer = Answer(asked, snapshot, prompt_tokens=snapshot.prompt_tokens(asked))
        with self._lock:
            if self._closed:
                raise Busy("the service is stopping")
            try:
                self._queue.put_nowait(answer)
            except queue.Full:
                raise Busy(f"{self._queue.maxsize} requests are already waiting") from None
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="mendd-answers", daemon=True)
                self._worker.start()
        return answer

    def close(self) -> None:
        """Stop: the answer being generated finishes; those still waiting fail with a reason."""
        with self._lock:
            self._closed = True
            worker = self._worker
            while True:
                try:
                    self._queue.get_nowait().pieces.put(RuntimeError("the service is stopping"))
                except queue.Empty:
                    break
        if worker is not None:
            worker.join(timeout=30)

    def _next(self) -> Answer | None:
        """The next waiting request, or None after marking the worker gone (under the lock, so a
        request queued meanwhile starts a new worker)."""
        with self._lock:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                self._worker = None
                return None

    def _work(self) -> None:
        while (answer := self._next()) is not None:
            if answer.cancelled.is_set():  # its client left while it waited
                continue
            try:
                for piece in answer_pieces(answer.snapshot, answer):
                    answer.pieces.put(piece)
            except Exception as error:  # the request fails, the worker stays
                log.exception("answering failed")
                answer.pieces.put(error)
