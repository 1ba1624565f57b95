"""What a task needs besides its payload: the database, the store, a way to send jobs, the device.

One `Resources` per process (Celery forks its pool after import, so engines are made lazily, in the
process that uses them). The API process and the in-process runner share theirs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

from core import jobs
from core.db import make_engine, make_sessionmaker
from core.db_models import Dataset, Job, Model
from core.settings import Settings, get_settings
from core.store import store_from_settings
from models.errors import CheckpointError, DataError
from workers.public_errors import PathLabels

log = logging.getLogger("recmerge.jobs")


class Dispatcher(Protocol):
    """Where "run job X" messages go: Celery over Redis, or the in-process runner."""

    def send(self, job_id: str, kind: str, message_id: str) -> None: ...

    def pending(self, message_id: str) -> bool | None:
        """Is the message still waiting or being worked on? None = this broker cannot tell."""
        ...


class Resources:
    def __init__(self, settings: Settings, dispatcher: Dispatcher | None = None):
        self.settings = settings
        self.engine = make_engine(settings.DATABASE_URL)
        self.session = make_sessionmaker(self.engine)
        self.store = store_from_settings(settings)
        self.dispatcher = dispatcher
        self.labels = PathLabels()  # store paths handed to job bodies, named for their errors

    def server_roots(self) -> list:
        """Where server paths start: a job error must show none of them."""
        return [self.settings.DATA_DIR, getattr(self.store, "root", ""), self.settings.tmp_dir,
                self.settings.cache_dir]

    @property
    def device(self) -> str | None:
        """None lets the library pick CUDA when present (DEVICE=auto)."""
        return None if self.settings.DEVICE == "auto" else self.settings.DEVICE

    # Sending jobs ---------------------------------------------------------------------------------
    def dispatch(self, job_id: str, kind: str) -> None:
        """Record the message id first, then send: the sweeper can always tell which message a queued
        job waits for. A failed send (broker down) leaves the job queued; the sweeper re-sends it."""
        message_id = jobs.new_id()
        with self.session() as s, s.begin():
            jobs.mark_sent(s, job_id, message_id)
        try:
            self.dispatcher.send(job_id, kind, message_id)
        except Exception as e:
            log.warning("job %s: could not send (%s); the sweeper will retry", job_id, e)

    def release(self, parent_id: str) -> None:
        """A child ended: dispatch its parent if it was the last one."""
        with self.session() as s, s.begin():
            ready = jobs.release(s, parent_id)
            kind = s.get(Job, parent_id).kind if ready else None
        if ready:
            self.dispatch(parent_id, kind)

    # Reading artifacts ----------------------------------------------------------------------------
    def dataset(self, dataset_id: str):
        """(row, PreparedDataset) — the prepared directory comes from the store (a local copy)."""
        from models.data import PreparedDataset

        with self.session() as s:
            row = s.get(Dataset, dataset_id)
        if row is None:
            raise DataError(f"dataset {dataset_id}: no such dataset")
        try:
            path = self.store.get_dir(row.fingerprint)
        except KeyError:
            raise DataError(f"dataset {dataset_id}: its prepared files are missing from the store") from None
        self.labels.add(path, f"dataset {dataset_id}")
        return row, PreparedDataset.load(path)

    def model(self, model_id: str) -> tuple[Model, Path]:
        with self.session() as s:
            row = s.get(Model, model_id)
        if row is None:
            raise CheckpointError(f"model {model_id}: no such model")
        try:
            path = self.store.path_for(row.sha256)
        except KeyError:
            raise CheckpointError(f"model {model_id}: its file is missing from the store") from None
        self.labels.add(path, f"model {row.id} ({row.name})")
        return row, path


_per_process: dict[int, Resources] = {}


def for_worker(make_dispatcher) -> Resources:
    """The Celery worker process's Resources, built on first use in that process."""
    pid = os.getpid()
    if pid not in _per_process:
        _per_process[pid] = Resources(get_settings(), make_dispatcher())
    return _per_process[pid]
