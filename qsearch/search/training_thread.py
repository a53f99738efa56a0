"""One long-lived thread per worker process that runs every trial's training.

Why: Ray Tune runs a function trainable on a fresh thread for each trial, even when it reuses
the worker's actor (``reuse_actors=True``). glibc gives a new thread a malloc arena of its own,
so each trial's tensors came from an arena that had never held them, and the process faulted
its memory in again: about 6,700 minor page faults and 0.1 s of system time per digits trial
of ``benchmarks/bench_orchestration.py``, whose training took 0.38-0.44 s in the study against
0.28-0.31 s for the same call repeated on one thread. Running the training on one thread that
outlives the trials keeps its arena (and any thread-local caches of the kernels) warm from the
second trial on; the same trials then took 0.30-0.33 s with about 0.01 s of system time.

How: :func:`run_on_training_thread` hands the call to that thread and waits. Everything the
call raises comes back to the caller, ``SystemExit`` included: that is how Tune's
``tune.report`` ends a trial it stops, so a stopped trial still ends the caller's thread the
way Tune expects, and the training thread lives on for the next trial. ``tune.report`` and
``tune.get_checkpoint`` work from the training thread: Tune's session is per process.

If the training thread is still busy (a call that never returned, or a nested call), the call
runs on the caller's thread instead, as before: a stuck trial can cost speed, never progress.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

THREAD_NAME = "qsearch-training"

_busy = threading.Lock()  # held while a call runs on the training thread
_start = threading.Lock()
_jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple, dict, Future]] = queue.SimpleQueue()
_thread: threading.Thread | None = None


def _serve() -> None:
    while True:
        fn, args, kwargs, done = _jobs.get()
        try:
            done.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - SystemExit too: it is the caller's to raise
            done.set_exception(e)


def _ensure_thread() -> None:
    global _thread
    with _start:
        if _thread is None:
            # A daemon, like Tune's own trial thread: a trial stuck in it never holds up the
            # worker process's exit.
            _thread = threading.Thread(target=_serve, name=THREAD_NAME, daemon=True)
            _thread.start()


def run_on_training_thread(fn: Callable[..., T], /, *args: object, **kwargs: object) -> T:
    """``fn(*args, **kwargs)`` on this process's training thread (on the caller's thread when
    that one is busy); returns its result or raises what it raised."""
    if not _busy.acquire(blocking=False):
        return fn(*args, **kwargs)
    try:
        _ensure_thread()
        done: Future = Future()
        _jobs.put((fn, args, kwargs, done))
        return done.result()
    finally:
        _busy.release()
