"""Serving recommendations: loaded models stay in an LRU cache, and concurrent requests are batched
into one forward pass.

The request path never touches the database or the disk once its model is warm: a model id or alias
resolves through a small TTL map, the model and its dataset come from the caches, and the only query
(the users' API events) runs once per batch, in the same worker thread as the forward pass.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from app.db_models import Dataset, Model
from app.metrics import Metrics
from app.services import events as events_svc
from app.services.datasets import load_prepared
from app.services.errors import NotFound
from app.services.models import resolve
from app.settings import Settings
from app.store import Store
from models.backbone import SeqRecModel
from models.data import PreparedDataset
from models.errors import DataError
from models.recommend import check_k, top_k


class LRUCache:
    """Thread-safe LRU map whose misses are filled by a loader, one load at a time."""

    def __init__(self, size: int, on_lookup: Callable[[str], None] | None = None):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # two requests missing the same model load it once
        self._on_lookup = on_lookup or (lambda result: None)

    def peek(self, key):
        """The cached value or None, without loading: safe to call on the event loop."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self._on_lookup("hit")
            return value

    def get(self, key, load: Callable):
        if (value := self.peek(key)) is not None:
            return value
        with self._load_lock:
            if (value := self.peek(key)) is not None:
                return value
            self._on_lookup("miss")
            value = load(key)
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            return value

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items


class MicroBatcher:
    """Collects concurrent `submit` calls into one `run(batch)` executed in a worker thread.

    A batch closes when it holds `max_batch` requests, when every request now in flight has joined
    it (a lone request does not wait), or `max_wait_s` after its first request. While one batch
    computes the next one fills up, so batches grow with load.
    """

    def __init__(self, run: Callable[[list], list], max_batch: int = 32, max_wait_s: float = 0.002,
                 observe: Callable[[int, float], None] | None = None, thread_init: Callable[[], None] | None = None):
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.observe = observe or (lambda size, seconds: None)
        self.thread_init = thread_init
        self.in_flight = 0  # requests between `reserve` and their answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @contextmanager
    def reserve(self):
        """Wrap a request's whole handling, so the batcher knows it is coming."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first call, or a new event loop (tests start several)
            self.close()
            self._loop = loop
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="recommend", initializer=self.thread_init)
            self._queue: asyncio.Queue = asyncio.Queue()
            self._arrival = asyncio.Event()
            self._task = loop.create_task(self._collect())
        fut = loop.create_future()
        self._queue.put_nowait((item, fut))
        self._arrival.set()
        return await fut

    async def _collect(self) -> None:
        q, loop = self._queue, asyncio.get_running_loop()
        while True:
            batch = [await q.get()]
            deadline = loop.time() + self.max_wait_s
            while True:
                while len(batch) < self.max_batch and not q.empty():
                    batch.append(q.get_nowait())
                remaining = deadline - loop.time()
                if len(batch) >= min(self.max_batch, self.in_flight) or remaining <= 0:
                    break
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), remaining)
                except TimeoutError:
                    pass
            await self._answer(batch)

    async def _answer(self, batch: list) -> None:
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.run, [item for item, _ in batch])
        except Exception as e:  # the whole batch failed: every caller gets the error
            results = [e] * len(batch)
        self.observe(len(batch), time.perf_counter() - start)
        for (_, fut), result in zip(batch, results):
            if fut.done():  # the client went away
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._loop = self._task = self._executor = None


@dataclass(frozen=True)
class Served:
    """A model ready to answer: the network, its prepared dataset, and the dataset's id (events are keyed by it)."""

    id: str
    dataset_id: str
    model: SeqRecModel
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
        self.chunk = settings.FORWARD_CHUNK
        self.models = LRUCache(settings.MODEL_CACHE_SIZE, lambda r: metrics.cache.labels(r).inc())
        self.datasets = LRUCache(settings.MODEL_CACHE_SIZE)
        self._refs: dict[str, tuple[str, float]] = {}  # model id or alias -> (model id, valid until)

        def observe(size: int, seconds: float) -> None:
            metrics.batch_size.observe(size)
            metrics.batch_seconds.observe(seconds)

        threads = settings.torch_threads()
        self.batcher = MicroBatcher(self.run_batch, settings.BATCH_MAX, settings.BATCH_WAIT_MS / 1000, observe,
                                    thread_init=lambda: torch.set_num_threads(threads))

    # --- finding a model -------------------------------------------------------------------------
    def _resolve(self, ref: str) -> str:
        with self.sessions() as s:
            m = resolve(s, ref)
        # An id always names the same model; an alias may be switched by another process.
        self._refs[ref] = (m.id, float("inf") if ref == m.id else time.monotonic() + self.alias_ttl)
        return m.id

    def forget(self, ref: str) -> None:
        """This process switched an alias: the next request must see it at once."""
        self._refs.pop(ref, None)

    def dataset(self, fingerprint: str) -> PreparedDataset:
        return self.datasets.get(fingerprint, lambda fp: load_prepared(self.store, fp))

    def _load(self, model_id: str) -> Served:
        from models.checkpoint import load_model

        with self.sessions() as s:
            row = s.get(Model, model_id)
            fingerprint = s.get(Dataset, row.dataset_id).fingerprint
        model, _ = load_model(self.store.path_for(row.sha256))
        return Served(row.id, row.dataset_id, model, self.dataset(fingerprint))

    async def served(self, ref: str) -> Served:
        hit = self._refs.get(ref)
        model_id = hit[0] if hit and hit[1] > time.monotonic() else await run_in_threadpool(self._resolve, ref)
        return self.models.peek(model_id) or await run_in_threadpool(self.models.get, model_id, self._load)

    # --- answering -------------------------------------------------------------------------------
    async def for_user(self, ref: str, user: str, k: int) -> tuple[Served, Ranked]:
        with self.batcher.reserve():
            s = await self.served(ref)
            k = check_k(k, s.ds.n_items)
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
            k = check_k(k, s.ds.n_items)
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
                items, scores = top_k(s.model, [histories[i] for i in rows], k, s.ds.n_items, batch_size=self.chunk)
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
