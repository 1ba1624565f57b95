"""Where the serving forward passes run: in a thread of the API process, or in a child process.

The child process is the default. In one process the event loop's thread and the forward thread share
one GIL: each of the ~150 torch ops of a forward pass gives it up and must win it back from a busy event
loop, which made a forward pass up to 5x slower under load and put 150+ ms tails on GET /recommend at
concurrency 32 (docs/results/recommend_load.md). A child has its own interpreter, so HTTP handling and
forward passes run on separate cores.

Only `models/` and app/lru.py are imported here: the child needs nothing of the web stack. Messages on
the pipe are a JSON header plus raw array bytes, never pickles.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection

import numpy as np

from app.lru import LRUCache
from models.errors import CheckpointError, DataError, IncompatibleError, RecmergeError

_ERRORS = {cls.__name__: cls for cls in (RecmergeError, DataError, CheckpointError, IncompatibleError)}


class ForwardFailed(RuntimeError):
    """The forward process died or broke the protocol; the batch could not be computed."""


class LocalForward:
    """Loads networks into an LRU map and answers top-k in the calling thread."""

    kind = "thread"

    def __init__(self, cache_size: int, threads: int, chunk: int):
        import torch

        self._threads = threads
        self._torch = torch
        self.chunk = chunk
        self.networks = LRUCache(cache_size)
        self._lock = threading.Lock()  # pipelined batches take turns: two forwards would only contend

    def _load(self, path: str):
        from models.checkpoint import load_model

        return load_model(path)[0]

    def top_k(self, model_id: str, path: str, histories: Sequence[np.ndarray], k: int,
              n_items: int) -> tuple[np.ndarray, np.ndarray]:
        from models.recommend import top_k

        if self._torch.get_num_threads() != self._threads:  # per thread pool: set where the work runs
            self._torch.set_num_threads(self._threads)
        model = self.networks.get(model_id, lambda _: self._load(path))
        with self._lock:
            return top_k(model, histories, k, n_items, batch_size=self.chunk)

    def close(self) -> None:
        pass


# --- the child process ---------------------------------------------------------------------------
def _child(conn: Connection, cache_size: int, threads: int, chunk: int) -> None:
    forward = LocalForward(cache_size, threads, chunk)
    while True:
        try:
            head = json.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the parent went away
            return
        if head.get("op") == "exit":
            return
        flat = np.frombuffer(conn.recv_bytes(), dtype=np.int64)
        ends = np.cumsum(head["lengths"])
        histories = np.split(flat, ends[:-1]) if len(ends) else []
        try:
            items, scores = forward.top_k(head["model_id"], head["path"], histories, head["k"], head["n_items"])
        except Exception as e:  # every error goes back to the caller; the child lives on
            conn.send_bytes(json.dumps({"ok": False, "kind": type(e).__name__, "message": str(e)}).encode())
            continue
        conn.send_bytes(json.dumps({"ok": True, "shape": list(items.shape)}).encode())
        conn.send_bytes(np.ascontiguousarray(items, dtype=np.int64).tobytes())
        conn.send_bytes(np.ascontiguousarray(scores, dtype=np.float32).tobytes())


class _Generation:
    """One child process and the calls it owes answers to, in the order they were sent."""

    def __init__(self, proc, conn: Connection):
        self.proc, self.conn = proc, conn
        self.pending: collections.deque[Future] = collections.deque()
        self.dead = False


class ForwardProcess:
    """A child process that owns the networks and computes top-k; started on first use, restarted once
    per call if it died (the batch is then retried on the new child).

    Calls do not wait for each other: a call writes its batch into the pipe at once and a reader thread
    hands the answers back in order. So when the child finishes one batch, the next is already in its
    pipe: with one call at a time it idled ~20% of the time at concurrency 32, waiting for the event
    loop's threads to win the GIL back, read the answer and send the next batch."""

    kind = "process"
    child_main = staticmethod(_child)  # what the child runs (a module-level function: spawn imports it)

    def __init__(self, cache_size: int, threads: int, chunk: int):
        self.args = (cache_size, threads, chunk)
        self._lock = threading.Lock()  # starting/stopping the child, and whole messages on the pipe
        self._gen: _Generation | None = None

    def _start(self) -> _Generation:
        # spawn, not fork: the API process has threads (event loop, executors) and torch state.
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=self.child_main, args=(child, *self.args), name="recmerge-forward", daemon=True)
        proc.start()
        child.close()
        gen = _Generation(proc, parent)
        threading.Thread(target=self._read, args=(gen,), name="recmerge-forward-reader", daemon=True).start()
        return gen

    @staticmethod
    def _stop(gen: _Generation) -> None:
        # The pipe is left to the reader thread, which closes it at the child's EOF: closing it here, under a
        # read in progress, could let that read continue on a reused descriptor (the next child's pipe).
        gen.proc.join(timeout=0.5)
        if gen.proc.is_alive():
            gen.proc.kill()
            gen.proc.join(timeout=5)

    @property
    def pid(self) -> int | None:
        gen = self._gen
        return gen.proc.pid if gen is not None else None

    @property
    def _proc(self):
        return self._gen.proc if self._gen is not None else None

    def _read(self, gen: _Generation) -> None:
        """Answers come back in the order the batches were sent; each resolves the oldest pending call."""
        conn = gen.conn
        while True:
            try:
                answer = json.loads(conn.recv_bytes())
                if answer["ok"]:
                    shape = tuple(answer["shape"])
                    items = np.frombuffer(conn.recv_bytes(), dtype=np.int64).reshape(shape)
                    scores = np.frombuffer(conn.recv_bytes(), dtype=np.float32).reshape(shape)
                    result = (items, scores)
                else:  # returned, not raised: the retry below is for a dead child only
                    result = _ERRORS.get(answer["kind"], ForwardFailed)(answer["message"])
            except (EOFError, OSError, ValueError, KeyError) as e:  # died, stopped, or a garbled reply
                with self._lock:
                    gen.dead = True  # writers check this under the lock, so none writes after the close
                    failed = ForwardFailed(f"the forward process stopped: {type(e).__name__}: {e}")
                    while gen.pending:
                        gen.pending.popleft().set_exception(failed)
                    conn.close()
                return
            gen.pending.popleft().set_result(result)

    def _send(self, head: bytes, flat: bytes) -> Future:
        fut: Future = Future()
        with self._lock:
            gen = self._gen
            if gen is None or gen.dead or not gen.proc.is_alive():
                if gen is not None:
                    self._stop(gen)
                gen = self._gen = self._start()
            gen.pending.append(fut)
            try:
                gen.conn.send_bytes(head)
                gen.conn.send_bytes(flat)
            except (OSError, ValueError) as e:  # the child is gone: the reader fails every pending call
                gen.dead = True
                if not fut.done():
                    gen.pending.remove(fut)
                    fut.set_exception(ForwardFailed(f"the forward process stopped: {type(e).__name__}: {e}"))
        return fut

    def top_k(self, model_id: str, path: str, histories: Sequence[np.ndarray], k: int,
              n_items: int) -> tuple[np.ndarray, np.ndarray]:
        histories = [np.asarray(h, dtype=np.int64).reshape(-1) for h in histories]
        head = json.dumps({"model_id": model_id, "path": str(path), "k": int(k), "n_items": int(n_items),
                           "lengths": [len(h) for h in histories]}).encode()
        flat = (np.concatenate(histories) if histories else np.zeros(0, np.int64)).tobytes()
        for attempt in (1, 2):
            try:
                out = self._send(head, flat).result()
                break
            except ForwardFailed as e:
                if attempt == 2:
                    raise ForwardFailed(f"the forward process failed twice: {e}") from e
        if isinstance(out, Exception):
            raise out
        return out

    def close(self) -> None:
        with self._lock:
            gen, self._gen = self._gen, None
            if gen is None:
                return
            try:
                gen.conn.send_bytes(json.dumps({"op": "exit"}).encode())
            except OSError:
                pass
            self._stop(gen)


def make_forward(kind: str, cache_size: int, threads: int, chunk: int) -> LocalForward | ForwardProcess:
    if kind == "process":
        return ForwardProcess(cache_size, threads, chunk)
    if kind == "thread":
        return LocalForward(cache_size, threads, chunk)
    raise ValueError(f"unknown forward kind {kind!r}: expected 'process' or 'thread'")
