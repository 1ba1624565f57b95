"""Registering an uploaded checkpoint: every check runs on the scratch copy before anything is stored."""

from __future__ import annotations

import json

from safetensors import SafetensorError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db_models import Model
from app.services.datasets import get_dataset
from app.services.errors import BadFile, Unprocessable
from app.services.uploads import SavedUpload
from app.store import Store
from models.checkpoint import check_safetensors_file, load_model, read_metadata
from models.errors import RecmergeError


def parse_recipe(text: str | None) -> dict | None:
    if text is None or not text.strip():
        return None
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError as e:
        raise Unprocessable(f"recipe: not valid JSON ({e})") from None
    if not isinstance(recipe, dict):
        raise Unprocessable("recipe: must be a JSON object")
    return recipe


def register_upload(session: Session, store: Store, upload: SavedUpload, name: str, dataset_id: str,
                    recipe_text: str | None = None) -> tuple[Model, bool]:
    """(model, created). Refusals: unknown dataset 404; not safetensors or truncated 400; bad metadata,
    wrong fingerprint, wrong tensor names or shapes, NaN/Inf 422."""
    dataset = get_dataset(session, dataset_id)
    recipe = parse_recipe(recipe_text)
    try:
        check_safetensors_file(upload.path)
    except RecmergeError as e:
        raise BadFile(upload.scrub(str(e))) from None
    try:
        meta = read_metadata(upload.path)
        if meta.dataset_fingerprint != dataset.fingerprint:
            raise Unprocessable(f"{upload.filename}: trained on dataset fingerprint {meta.dataset_fingerprint[:12]}, "
                                f"but dataset {dataset.id} has {dataset.fingerprint[:12]}")
        if meta.n_items != dataset.n_items:
            raise Unprocessable(f"{upload.filename}: has {meta.n_items} items, dataset {dataset.id} has "
                                f"{dataset.n_items}")
        load_model(upload.path)  # tensor names, shapes and finiteness against the backbone it declares
    except (RecmergeError, SafetensorError) as e:
        raise Unprocessable(upload.scrub(str(e))) from None

    existing = session.scalar(select(Model).where(Model.kind == "recipe", Model.sha256 == upload.sha256))
    if existing is not None:
        return existing, False
    was_stored = store.exists(upload.sha256)
    store.put_file(upload.path, upload.sha256)
    row = Model(kind="recipe", name=name, dataset_id=dataset.id, sha256=upload.sha256, size=upload.size,
                backbone=json.loads(meta.backbone.to_json()), recipe=recipe or meta.recipe, merge=meta.merge)
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # the same file registered by a concurrent upload a moment ago
        session.rollback()
        existing = session.scalar(select(Model).where(Model.kind == "recipe", Model.sha256 == upload.sha256))
        if existing is None:
            if not was_stored:
                store.delete(upload.sha256)
            raise
        return existing, False
    return row, True
