"""Run a producer one step ahead of its consumer on a second thread, results in order.

The merge pass reads, checks and hashes the next block of every input while the current one is merged and
written: those are syscalls, hashlib and torch reductions, which release the GIL, so the two threads use
two cores. Measured on 3 x 1 GB checkpoints + 3 Fishers (docs/results/merge_memory.md, run 5).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_DONE = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


@contextmanager
def prefetched(produce: Callable[[T], R], items: Iterable[T], ahead: int = 1) -> Iterator[Iterator[R]]:
    """`produce(item)` for every item, in order, on a worker thread that keeps at most `ahead` results
    waiting (plus the one it is making). A producer's exception is raised in the consumer at the item
    that failed; leaving the block early (an exception in the consumer) stops the producer before it
    starts another item, and the block returns only once the thread has ended."""
    if ahead < 1:
        raise ValueError("prefetched: ahead must be at least 1")
    results: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                results.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if stop.is_set() or not put(produce(item)):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            put(_Failed(e))
            return
        put(_DONE)

    def consume() -> Iterator[R]:
        while True:
            value = results.get()
            if value is _DONE:
                return
            if isinstance(value, _Failed):
                raise value.error
            yield value

    worker = threading.Thread(target=run, name="recmerge-prefetch", daemon=True)
    worker.start()
    try:
        yield consume()
    finally:
        stop.set()
        worker.join()
