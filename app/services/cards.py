"""GET /models/{id}/card: the model card (models/card.py) of a stored model, filled from its row, its file's
header, the rows of the models it came from and the job that made it."""

from __future__ import annotations

import json

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.services.jobs import job_public
from app.services.models import get_model
from core.db_models import Job, Model
from core.store import Store
from models.card import CardInput, Ingredient, render_card
from models.checkpoint import read_metadata


def _by_sha(session: Session, sha: str, dataset_id: str) -> Model | None:
    return session.scalar(select(Model).where(Model.sha256 == sha, Model.dataset_id == dataset_id)
                          .order_by(Model.created_at))


def _label(row: Model | None, sha: str) -> str:
    return f"{row.name} (`{row.id}`)" if row is not None else f"not stored here (`{sha[:16]}`)"


def _block(lang: str, text: str) -> str:
    return f"```{lang}\n{text.rstrip()}\n```"


def model_card(session: Session, store: Store, model_id: str) -> str:
    m = get_model(session, model_id)
    meta = read_metadata(store.path_for(m.sha256))
    job = session.get(Job, m.source_job_id) if m.source_job_id else None
    metrics = {f"**{m.name}**": m.metrics}
    ingredients, base, notes, reproduce = [], None, [], ""
    merge = meta.merge or {}
    if m.kind == "merged":
        kind = "merged"
        weights = merge.get("weights") or [None] * len(merge.get("ingredients", []))
        for sha, w in zip(merge.get("ingredients", []), weights):
            row = _by_sha(session, sha, m.dataset_id)
            ingredients.append(Ingredient(_label(row, sha), sha, (row.recipe or {}).get("name") if row else None, w))
            if row is not None:
                metrics[row.name] = row.metrics
        if merge.get("base"):
            row = _by_sha(session, merge["base"], m.dataset_id)
            base = Ingredient(_label(row, merge["base"]), merge["base"])
        if "config" in merge:
            reproduce = ("POST this config to `/merge-jobs` (as `application/yaml`) to merge the same models "
                         "again; the file records it in its header:\n\n" + _block("yaml", yaml.safe_dump(
                             merge["config"], sort_keys=False)) + "\n\nWith the ingredients downloaded "
                         "(`GET /models/{id}/file`), `recmerge merge --config` runs the same document with the "
                         "ids replaced by the files' paths.")
    elif job is not None and job.kind == "train":
        kind = "trained"
        request = job_public(job).request  # what was asked, as the job routes show it
        init = request.get("init_model_id")
        if init:
            row = session.get(Model, init)
            if row is not None:
                metrics[f"{row.name} (initialisation)"] = row.metrics
                notes.append(f"Initialised from {_label(row, row.sha256)}.")
        reproduce = ("POST this request to `/train-jobs` (training is seeded: the same request on the same "
                     "data gives the same file):\n\n" + _block("json", json.dumps(request, indent=2)))
    else:
        kind = "uploaded"
        notes.append(f"Uploaded as `{m.name}`; registered as a recipe of dataset `{m.dataset_id}`.")
        train = json.loads(meta.extra["train"]) if "train" in meta.extra else None
        if train and train.get("config"):
            notes.append("Its header says recmerge trained it, with the training configuration under Options.")
    card = CardInput(name=m.name, kind=kind, meta=meta, sha256=m.sha256, size=m.size, metrics=metrics,
                     ingredients=ingredients, base=base, reproduce=reproduce, notes=notes)
    return render_card(card)
