"""Interactions appended through the API. A user's history = the dataset's sequence + these events."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from sqlalchemy import Connection, bindparam, func, select
from sqlalchemy.orm import Session

from app.services.datasets import get_dataset
from app.services.errors import NotFound, Unprocessable
from app.services.models import resolve
from core.db_models import Dataset, Event
from models.data import PreparedDataset
from models.errors import DataError


def target_dataset(session: Session, dataset_id: str | None, model_ref: str | None) -> Dataset:
    if (dataset_id is None) == (model_ref is None):
        raise Unprocessable("name exactly one of dataset_id or model (a model id or alias)")
    if dataset_id is not None:
        return get_dataset(session, dataset_id)
    return get_dataset(session, resolve(session, model_ref).dataset_id)


def internal_items(ds: PreparedDataset, items: Iterable) -> list[int]:
    """Original item ids -> internal ids; an id the dataset does not know is refused by name, as an unknown
    user is: 404, a thing the request names that does not exist."""
    try:
        return [ds.item_index(str(i)) for i in items]
    except DataError as e:
        raise NotFound(str(e)) from None


def append(session: Session, dataset: Dataset, prepared: PreparedDataset, user: str, items: list) -> int:
    """Append in order; returns how many events the user has now. All or nothing."""
    internal_items(prepared, items)
    session.add_all(Event(dataset_id=dataset.id, user_id=user, item_id=str(i)) for i in items)
    session.commit()
    return count(session, dataset.id, user)


def count(session: Session, dataset_id: str, user: str) -> int:
    q = select(func.count()).select_from(Event).where(Event.dataset_id == dataset_id, Event.user_id == user)
    return session.scalar(q)


# Built once: it runs for every recommendation batch, and a fixed statement is compiled once.
_FOR_USERS = (select(Event.dataset_id, Event.user_id, Event.item_id)
              .where(Event.dataset_id.in_(bindparam("datasets", expanding=True)),
                     Event.user_id.in_(bindparam("users", expanding=True)))
              .order_by(Event.id))


def for_users(conn: Connection, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
    """{(dataset_id, user): [original item ids, oldest first]} in one query for a whole batch."""
    pairs = set(pairs)
    if not pairs:
        return {}
    params = {"datasets": sorted({d for d, _ in pairs}), "users": sorted({u for _, u in pairs})}
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for d, u, item in conn.execute(_FOR_USERS, params):
        if (d, u) in pairs:
            out[(d, u)].append(item)
    return out
