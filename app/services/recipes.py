"""Registering an uploaded checkpoint: every check runs on the scratch copy before anything is stored."""

from __future__ import annotations

import json

from safetensors import SafetensorError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.services.datasets import get_dataset
from app.services.errors import BadFile, Unprocessable
from app.services.uploads import SavedUpload
from core.db_models import Model
from core.store import Store
from models.admission import MAX_HEADER_BYTES
from models.checkpoint import admit, check_safetensors_file, load_model
from models.errors import RecmergeError
from models.recipes import RECIPES, recipe_options


def parse_recipe(text: str | None) -> dict | None:
    """The `recipe` form field: a JSON object naming a registered recipe and options of that recipe."""
    if text is None or not text.strip():
        return None
    try:
        recipe = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise Unprocessable(f"recipe: not valid JSON ({str(e)[:80]})") from None
    if not isinstance(recipe, dict):
        raise Unprocessable("recipe: must be a JSON object")
    return normalized_recipe(recipe, "recipe")


def normalized_recipe(recipe: dict, where: str) -> dict:
    """{"name", **every option} as the recipe registry validates it (defaults filled in)."""
    options = dict(recipe)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise Unprocessable(f"{where}: needs a 'name' naming a recipe ({', '.join(RECIPES)})")
    try:
        return {"name": name, **recipe_options(name, options).model_dump()}
    except RecmergeError as e:
        raise Unprocessable(f"{where}: {e}") from None


def check_recipe_agrees(form: dict, header: dict, filename: str) -> None:
    """The form may restate the file's recipe, never contradict it: stored metadata describes the file."""
    try:
        header = normalized_recipe(header, filename)
    except Unprocessable:
        pass  # a recipe this registry does not know (a merge's, an older version's): compared as written
    for key in ["name", *sorted((set(form) | set(header)) - {"name"})]:
        if form.get(key) != header.get(key):
            raise Unprocessable(f"recipe: {key}={json.dumps(form.get(key))[:60]} in the form, but {filename}'s "
                                f"header says {json.dumps(header.get(key))[:60]}")


def register_upload(session: Session, store: Store, upload: SavedUpload, name: str, dataset_id: str,
                    recipe_text: str | None = None) -> tuple[Model, bool]:
    """(model, created). Refusals: unknown dataset 404; not safetensors or truncated 400; bad metadata,
    wrong fingerprint, wrong tensor names, shapes or dtypes, NaN/Inf, a recipe that disagrees 422.
    Admission (models/admission.py) proves the header against the tensors before any model is built."""
    dataset = get_dataset(session, dataset_id)
    recipe = parse_recipe(recipe_text)
    label = upload.filename  # the client's own name for its file, never our scratch path
    try:
        check_safetensors_file(upload.path, where=label, max_header=MAX_HEADER_BYTES)
    except RecmergeError as e:
        raise BadFile(upload.scrub(str(e))) from None
    try:
        meta = admit(upload.path, where=label)
        if meta.dataset_fingerprint != dataset.fingerprint:
            raise Unprocessable(f"{label}: trained on dataset fingerprint {meta.dataset_fingerprint[:12]}, "
                                f"but dataset {dataset.id} has {dataset.fingerprint[:12]}")
        if meta.n_items != dataset.n_items:
            raise Unprocessable(f"{label}: has {meta.n_items} items, dataset {dataset.id} has {dataset.n_items}")
        if recipe is not None:
            check_recipe_agrees(recipe, meta.recipe, label)
        load_model(upload.path, where=label)  # finite weights; names, shapes and dtypes were admitted
    except (RecmergeError, SafetensorError) as e:
        raise Unprocessable(upload.scrub(str(e))) from None

    existing = session.scalar(select(Model).where(Model.kind == "recipe", Model.sha256 == upload.sha256))
    if existing is not None:
        return existing, False
    was_stored = store.exists(upload.sha256)
    store.put_file(upload.path, upload.sha256)
    row = Model(kind="recipe", name=name, dataset_id=dataset.id, sha256=upload.sha256, size=upload.size,
                backbone=json.loads(meta.backbone.to_json()), recipe=meta.recipe, merge=meta.merge)
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
