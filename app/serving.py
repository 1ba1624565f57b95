"""Serving recommendations: concurrent requests are batched, and each batch goes to the forward side
(app/inference.py: a child process by default), which keeps the networks loaded in an LRU cache.

The request path never touches the database or the disk once its model is warm: a model id or alias
resolves through a small TTL map, the model's dataset comes from a cache, and the only query (the users'
API events) runs once per batch, in the batcher's worker thread that then hands the batch to the forward side.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.inference import make_forward
from app.lru import LRUCache
from app.metrics import Metrics
from app.services import events as events_svc
from app.services.datasets import load_prepared
from app.services.errors import NotFound
from app.services.models import resolve
from core.db_models import Dataset, Model
from core.settings import Settings
from core.store import Store
from models.data import PreparedDataset
from models.errors import DataError
from models.recommend import check_k


class _Ticket:
    __slots__ = ("answered",)

    def __init__(self):
        self.answered = False


# The request being handled in this task, so `submit` can tell the batcher that it has joined a batch.
_TICKET: ContextVar[_Ticket | None] = ContextVar("recmerge_batch_ticket", default=None)


class MicroBatcher:
    """Collects concurrent `submit` calls into batches, each run as `run(batch)` in a worker thread.

    A batch closes when it holds `max_batch` requests, when every request now waiting has joined it (a
    lone request does not wait), or `max_wait_s` after it could start. Up to `pipeline` batches are
    out at once: with one, the forward side idled while the event loop sent a batch's answers and
    read the next requests (12-30 ms of every ~60 ms cycle at concurrency 32); with two, the next
    batch is ready when the current one ends, and batches settle at about half the concurrency.
    """

    def __init__(self, run: Callable[[list], list], max_batch: int = 32, max_wait_s: float = 0.002,
                 observe: Callable[[int, float], None] | None = None, pipeline: int = 2):
        if pipeline < 1:
            raise ValueError("pipeline must be >= 1")
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.pipeline = pipeline
        self.observe = observe or (lambda size, seconds: None)
        self.in_flight = 0  # requests between `reserve` and their answer
        self._dispatched = 0  # of those, the ones in batches that are out
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._executor: ThreadPoolExecutor | None = None

    @contextmanager
    def reserve(self):
        """Wrap a request's whole handling, so the batcher knows it is coming."""
        ticket = _Ticket()
        token = _TICKET.set(ticket)
        self.in_flight += 1
        try:
            yield
        finally:
            _TICKET.reset(token)
            if not ticket.answered:
                self.in_flight -= 1

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first call, or a new event loop (tests start several)
            self.close()
            self._loop = loop
            self._executor = ThreadPoolExecutor(self.pipeline, thread_name_prefix="recommend")
            self._queue: asyncio.Queue = asyncio.Queue()
            self._arrival = asyncio.Event()
            self._slots = asyncio.Semaphore(self.pipeline)
            self._task = loop.create_task(self._collect())
        fut = loop.create_future()
        self._queue.put_nowait((item, fut, _TICKET.get()))
        self._arrival.set()
        return await fut

    async def _collect(self) -> None:
        q, loop = self._queue, asyncio.get_running_loop()
        while True:
            batch = [await q.get()]
            await self._slots.acquire()
            deadline = loop.time() + self.max_wait_s
            while True:
                while len(batch) < self.max_batch and not q.empty():
                    batch.append(q.get_nowait())
                remaining = deadline - loop.time()
                waiting = self.in_flight - self._dispatched
                if len(batch) >= min(self.max_batch, waiting) or remaining <= 0:
                    break
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), remaining)
                except TimeoutError:
                    pass
            self._dispatched += sum(ticket is not None for _, _, ticket in batch)
            task = loop.create_task(self._answer(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _answer(self, batch: list) -> None:
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.run, [item for item, _, _ in batch])
        except Exception as e:  # the whole batch failed: every caller gets the error
            results = [e] * len(batch)
        finally:
            self._slots.release()
        self.observe(len(batch), time.perf_counter() - start)
        for (_, fut, ticket), result in zip(batch, results):
            if ticket is not None and not ticket.answered:  # no longer waiting, even before it resumes
                ticket.answered = True
                self.in_flight -= 1
                self._dispatched -= 1
            if fut.done():  # the client went away
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    def close(self) -> None:
        for task in (self._task, *self._running):
            if task is not None:
                task.cancel()
        self._running = set()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._loop = self._task = self._executor = None
        self._dispatched = 0  # batches of a closed loop never answer; its requests are gone with it


@dataclass(frozen=True)
class Served:
    """A model ready to answer: its checkpoint, its prepared dataset, and the dataset's id (events are keyed by it)."""

    id: str
    dataset_id: str
    path: str  # the checkpoint file; the forward side loads the network from it
    ds: PreparedDataset


@dataclass(frozen=True)
class Query:
    served: Served
    k: int
    user: str | None = None  # a user of the dataset (or one known only through API events)
    user_index: int | None = None  # None: the user has no sequence in the dataset
    items: np.ndarray | None = None  # a visitor's history (internal ids)


Ranked = list[tuple[int, float]]  # (internal item id, score), best first


class Recommender:
    def __init__(self, engine: Engine, sessions: sessionmaker[Session], store: Store, settings: Settings,
                 metrics: Metrics):
        self.engine = engine
        self.sessions = sessions
        self.store = store
        self.alias_ttl = settings.ALIAS_TTL_S
        self.models = LRUCache(settings.MODEL_CACHE_SIZE, lambda r: metrics.cache.labels(r).inc())
        self.datasets = LRUCache(settings.MODEL_CACHE_SIZE)
        self._refs: dict[str, tuple[str, float]] = {}  # model id or alias -> (model id, valid until)
        self._lookups: dict[str, asyncio.Future] = {}  # ref -> its one lookup in flight
        self._epochs: dict[str, int] = defaultdict(int)  # bumped by forget: a lookup begun before is void

        def observe(size: int, seconds: float) -> None:
            metrics.batch_size.observe(size)
            metrics.batch_seconds.observe(seconds)

        self.forward = make_forward(settings.FORWARD, settings.MODEL_CACHE_SIZE, settings.torch_threads(),
                                    settings.FORWARD_CHUNK)
        self.batcher = MicroBatcher(self.run_batch, settings.BATCH_MAX, settings.BATCH_WAIT_MS / 1000, observe,
                                    settings.BATCH_PIPELINE)

    # --- finding a model -------------------------------------------------------------------------
    def _resolve(self, ref: str, epoch: int) -> str:
        with self.sessions() as s:
            m = resolve(s, ref)
        if self._epochs[ref] == epoch:  # not switched by this process meanwhile
            # An id always names the same model; an alias may be switched by another process.
            self._refs[ref] = (m.id, float("inf") if ref == m.id else time.monotonic() + self.alias_ttl)
        return m.id

    def _lookup(self, ref: str) -> asyncio.Future:
        """The one database lookup of `ref` in flight, started if there is none: when an alias's entry
        expired under load, every request of the next few milliseconds used to run its own lookup in a
        thread (a herd of queries once a second, each fighting the event loop for the GIL)."""
        fut = self._lookups.get(ref)
        if fut is None:
            fut = asyncio.ensure_future(run_in_threadpool(self._resolve, ref, self._epochs[ref]))
            self._lookups[ref] = fut
            fut.add_done_callback(lambda f: self._lookups.pop(ref, None) if self._lookups.get(ref) is f else None)
        return fut

    async def _model_id(self, ref: str) -> str:
        hit, now = self._refs.get(ref), time.monotonic()
        if hit is None or now >= hit[1] + self.alias_ttl:
            return await asyncio.shield(self._lookup(ref))
        if now >= hit[1]:
            # Just expired: answer from the entry while one lookup refreshes it in the background; an
            # entry older than twice the TTL is never used, so another process's switch shows within
            # 2 x ALIAS_TTL_S. A failed refresh (alias deleted) drops the entry: the next request looks up
            # in the open and gets the error.
            self._lookup(ref).add_done_callback(
                lambda f: self._refs.pop(ref, None) if not f.cancelled() and f.exception() else None)
        return hit[0]

    def forget(self, ref: str) -> None:
        """This process switched an alias: the next request must see it at once."""
        self._epochs[ref] += 1
        self._refs.pop(ref, None)
        self._lookups.pop(ref, None)

    def dataset(self, fingerprint: str) -> PreparedDataset:
        return self.datasets.get(fingerprint, self._load_dataset)

    def _load_dataset(self, fingerprint: str) -> PreparedDataset:
        ds = load_prepared(self.store, fingerprint)
        # A served dataset lives long and holds many objects (ids, titles, index maps): moving them out of
        # the collector's generations keeps full collections, which pause the event loop, short.
        gc.freeze()
        return ds

    def _load(self, model_id: str) -> Served:
        with self.sessions() as s:
            row = s.get(Model, model_id)
            fingerprint = s.get(Dataset, row.dataset_id).fingerprint
        return Served(row.id, row.dataset_id, str(self.store.path_for(row.sha256)), self.dataset(fingerprint))

    async def served(self, ref: str) -> Served:
        model_id = await self._model_id(ref)
        return self.models.peek(model_id) or await run_in_threadpool(self.models.get, model_id, self._load)

    # --- answering -------------------------------------------------------------------------------
    async def for_user(self, ref: str, user: str, k: int) -> tuple[Served, Ranked]:
        with self.batcher.reserve():
            s = await self.served(ref)
            k = check_k(min(k, s.ds.n_items), s.ds.n_items)  # a k past the catalogue lists all of it
            try:
                u = s.ds.user_index(user)
            except DataError:
                u = None
                if not await run_in_threadpool(self._has_events, s.dataset_id, user):
                    raise NotFound(f"user {user!r} not found in the dataset of model {s.id}") from None
            return s, await self.batcher.submit(Query(s, k, user=user, user_index=u))

    async def for_visitor(self, ref: str, items: Sequence, k: int) -> tuple[Served, Ranked]:
        with self.batcher.reserve():
            s = await self.served(ref)
            k = check_k(min(k, s.ds.n_items), s.ds.n_items)
            history = np.asarray(events_svc.internal_items(s.ds, items), dtype=np.int64)
            return s, await self.batcher.submit(Query(s, k, items=history))

    def _has_events(self, dataset_id: str, user: str) -> bool:
        with self.sessions() as s:
            return events_svc.count(s, dataset_id, user) > 0

    def run_batch(self, queries: list[Query]) -> list[Ranked | Exception]:
        """Answer a batch (worker thread): one events query, then per model its histories in length-sorted
        chunks of FORWARD_CHUNK forward passes."""
        users = [(q.served.dataset_id, q.user) for q in queries if q.user is not None]
        added = {}
        if users:
            with self.engine.connect() as conn:
                added = events_svc.for_users(conn, users)
        histories = []
        for q in queries:
            if q.items is not None:
                histories.append(q.items)
                continue
            own = q.served.ds.sequence(q.user_index) if q.user_index is not None else np.zeros(0, np.int64)
            extra = [q.served.ds.item_index(i) for i in added.get((q.served.dataset_id, q.user), ())]
            histories.append(np.concatenate([own, np.asarray(extra, dtype=own.dtype)]) if extra else own)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            groups[q.served.id].append(i)
        out: list = [None] * len(queries)
        for rows in groups.values():
            s = queries[rows[0]].served
            k = max(queries[i].k for i in rows)
            try:
                items, scores = self.forward.top_k(s.id, s.path, [histories[i] for i in rows], k, s.ds.n_items)
            except Exception as e:
                for i in rows:
                    out[i] = e
                continue
            for j, i in enumerate(rows):
                n = queries[i].k
                out[i] = [(int(it), float(sc)) for it, sc in zip(items[j, :n], scores[j, :n]) if it > 0]
        return out

    def close(self) -> None:
        self.batcher.close()
        self.forward.close()
