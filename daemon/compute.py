"""Where torch work runs in a long-lived process: on threads that end when their work does.

torch on CPU uses GNU OpenMP, and each thread that runs a parallel op keeps its own pool of
OpenMP workers for as long as it lives. Once a process holds more OpenMP threads than it has
cores, libgomp stops spin-waiting in every pool (it throttles the spin from ~3 ms to 100 turns),
and a model that decodes one token at a time through hundreds of small parallel ops gets about
half as fast: SmolLM2 on 2 cores, 28 tokens/s alone, 15 once a second long-lived thread has run
a single forward (bench/serving.py). So the service never keeps a torch thread idle: startup,
each scheduler job and each burst of answers run on a fresh thread that exits at its end, and
two pools exist only while two pieces of work really run at once.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_own_thread(work: Callable[[], T], name: str) -> T:
    """`work()` run on a new thread named `name`, waited for; its result returned, its exception raised."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # noqa: BLE001 - handed to the caller as it is
            outcome["error"] = error

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def on_own_thread_each_call(job: Callable[..., None], name: str) -> Callable[..., None]:
    """`job` wrapped so each call runs on a fresh thread (a scheduler's long-lived worker calls it)."""
    def call(*args, **kwargs) -> None:
        on_own_thread(lambda: job(*args, **kwargs), name)
    call.__name__ = getattr(job, "__name__", name)
    return call
