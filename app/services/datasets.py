"""Datasets: prepared from a built-in source or an uploaded file, stored by fingerprint, registered once."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.schemas import DatasetCreate, DatasetUpload
from app.services.errors import NotFound, ServiceError, Unprocessable
from app.services.uploads import SavedUpload
from core.db_models import Dataset
from core.store import Store
from models.data import PreparedDataset, prepare_dataset
from models.errors import RecmergeError


class SourceUnavailable(ServiceError):
    status = 503


def list_datasets(session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(Dataset.created_at)))


def get_dataset(session: Session, dataset_id: str) -> Dataset:
    ds = session.get(Dataset, dataset_id)
    if ds is None:
        raise NotFound(f"dataset {dataset_id!r} not found")
    return ds


def by_fingerprint(session: Session, fingerprint: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.fingerprint == fingerprint))


def _builtin_path(source: str) -> Path:
    from models.download import fetch_ml100k

    fetchers = {"ml-100k": fetch_ml100k}
    try:
        return fetchers[source]()
    except RecmergeError as e:  # the download failed: not the client's fault
        raise SourceUnavailable(str(e)) from None


def create_builtin(session: Session, store: Store, tmp_root: Path, body: DatasetCreate) -> tuple[Dataset, bool]:
    """(dataset, created). The same source with the same filters is prepared once."""
    params = {"min_user": body.min_user, "min_item": body.min_item}
    for row in session.scalars(select(Dataset).where(Dataset.source == body.source)):
        if row.params == params:
            return row, False
    path = _builtin_path(body.source)
    return _register(session, store, tmp_root, body.name, body.source, params,
                     lambda out: prepare_dataset(path, out, None, body.min_user, body.min_item), str)


def create_from_upload(session: Session, store: Store, tmp_root: Path, upload: SavedUpload,
                       fields: DatasetUpload) -> tuple[Dataset, bool]:
    params = fields.model_dump(exclude={"name"}, exclude_none=True)

    def prepare(out: Path) -> PreparedDataset:
        return prepare_dataset(upload.path, out, fields.format, fields.min_user, fields.min_item,
                               user_col=fields.user_col, item_col=fields.item_col, order_col=fields.order_col)

    return _register(session, store, tmp_root, fields.name, f"upload:{upload.filename}", params, prepare,
                     upload.scrub)


def _register(session: Session, store: Store, tmp_root: Path, name: str, source: str, params: dict,
              prepare: Callable[[Path], PreparedDataset], scrub: Callable[[str], str]) -> tuple[Dataset, bool]:
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prepare-", dir=tmp_root) as work:
        out = Path(work) / "prepared"
        try:
            ds = prepare(out)
        except RecmergeError as e:
            raise Unprocessable(scrub(str(e)).replace(str(out), "prepared dataset")) from None
        existing = by_fingerprint(session, ds.fingerprint)
        if existing is not None:
            return existing, False
        store.put_dir(ds.fingerprint, out)
    row = Dataset(name=name, fingerprint=ds.fingerprint, source=source, params=params, n_users=ds.n_users,
                  n_items=ds.n_items, n_interactions=ds.n_interactions)
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # the same content registered by a concurrent request a moment ago
        session.rollback()
        existing = by_fingerprint(session, ds.fingerprint)
        if existing is None:
            raise
        return existing, False
    return row, True


def load_prepared(store: Store, fingerprint: str) -> PreparedDataset:
    return PreparedDataset.load(store.get_dir(fingerprint))
