"""Registered models (uploaded recipes and merged models) and the aliases that point at them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.services.errors import NotFound
from core.db_models import Alias, Model


def list_models(session: Session, kind: str | None = None, dataset_id: str | None = None) -> list[Model]:
    q = select(Model).order_by(Model.created_at)
    if kind is not None:
        q = q.where(Model.kind == kind)
    if dataset_id is not None:
        q = q.where(Model.dataset_id == dataset_id)
    return list(session.scalars(q))


def get_model(session: Session, model_id: str, kind: str | None = None) -> Model:
    m = session.get(Model, model_id)
    if m is None or (kind is not None and m.kind != kind):
        raise NotFound(f"{kind or 'model'} {model_id!r} not found")
    return m


def resolve(session: Session, ref: str) -> Model:
    """A model by id, else by alias name."""
    m = session.get(Model, ref)
    if m is not None:
        return m
    alias = session.get(Alias, ref)
    if alias is None:
        raise NotFound(f"model or alias {ref!r} not found")
    return session.get(Model, alias.model_id)


def list_aliases(session: Session) -> list[Alias]:
    return list(session.scalars(select(Alias).order_by(Alias.name)))


def get_alias(session: Session, name: str) -> Alias:
    alias = session.get(Alias, name)
    if alias is None:
        raise NotFound(f"alias {name!r} not found")
    return alias


def set_alias(session: Session, name: str, model_id: str) -> Alias:
    get_model(session, model_id)
    for _ in range(2):  # a concurrent first PUT of the same name makes our INSERT fail; then we UPDATE
        alias = session.get(Alias, name)
        if alias is None:
            alias = Alias(name=name, model_id=model_id)
            session.add(alias)
        else:
            alias.model_id = model_id
        try:
            session.commit()
            return alias
        except IntegrityError:
            session.rollback()
    raise RuntimeError(f"alias {name!r}: could not be written")
