"""The five job bodies. Each: validate the payload -> one library call -> artifact into the store ->
return `record(session)`, which registers the result when the job is marked succeeded (workers/attempt.py).

Bodies run the same under a Celery worker and under the in-process runner; they know nothing of either.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import jobs
from core.db_models import Dataset, Fisher, Model
from core.specs import EvaluateSpec, FisherSpec, MergeSpec, PrepareSpec, TrainSpec
from models.checkpoint import read_metadata
from models.config import SHAPE_FIELDS as BACKBONE_SHAPE
from models.errors import DataError, RecmergeError
from workers.attempt import Attempt, Record


def _spec(cls, payload: dict):
    clean = {k: v for k, v in payload.items() if k != "children"}
    try:
        return cls(**clean)
    except ValueError as e:
        raise RecmergeError(f"invalid {cls.__name__} payload: {e}") from None


def _evaluate(model, ds, splits, protocols, device, progress) -> dict:
    """{split: {protocol: {metric: value}}} — the shape of `models.metrics` everywhere in the service."""
    from models.evaluate import evaluate

    out = {}
    for i, split in enumerate(splits):
        out[split] = evaluate(model, ds, split=split, protocols=tuple(protocols), device=device)
        progress("evaluate", (i + 1) / len(splits))
    return out


def _merge_metrics(old: dict | None, new: dict) -> dict:
    merged = json.loads(json.dumps(old or {}))
    for split, by_protocol in new.items():
        merged.setdefault(split, {}).update(by_protocol)
    return merged


def _model_fields(a: Attempt, path, sha: str, kind: str, name: str, dataset_id: str, metrics: dict | None):
    meta = read_metadata(path)
    return {"kind": kind, "name": name, "dataset_id": dataset_id, "sha256": sha, "size": path.stat().st_size,
            "backbone": asdict(meta.backbone), "recipe": meta.recipe, "merge": meta.merge, "metrics": metrics,
            "source_job_id": a.claim.id}


def _result_for(model: Model) -> dict:
    return {"model_id": model.id, "sha256": model.sha256}


# prepare ---------------------------------------------------------------------------------------------
def prepare(a: Attempt) -> Record:
    from models.data import prepare_dataset

    spec = _spec(PrepareSpec, a.payload)
    if spec.source.startswith("upload:"):
        sha = spec.source.removeprefix("upload:")
        try:
            raw = a.res.store.path_for(sha)
        except (KeyError, ValueError):
            raise DataError(f"source {spec.source}: no such upload in the store") from None
        # Format detection reads the file name (u.data, ratings.dat, *.inter): give it its own.
        source = a.workdir / "raw" / (spec.filename or "interactions.csv").replace("/", "_")
        source.parent.mkdir()
        source.symlink_to(raw)
    elif spec.source == "ml-100k":
        source = "ml-100k"
    else:
        raise DataError(f"source {spec.source!r}: expected 'ml-100k' or 'upload:<sha256>'")
    ds = prepare_dataset(source, a.workdir / "prepared", spec.fmt, spec.min_user, spec.min_item,
                         progress=a.progress)
    a.res.store.put_dir(ds.fingerprint, a.workdir / "prepared")

    def record(s: Session) -> dict:
        row = s.scalar(select(Dataset).where(Dataset.fingerprint == ds.fingerprint))
        if row is None:
            row = Dataset(id=jobs.new_id(), name=spec.name, fingerprint=ds.fingerprint, source=spec.source,
                          params={"fmt": spec.fmt, "min_user": spec.min_user, "min_item": spec.min_item},
                          n_users=ds.n_users, n_items=ds.n_items, n_interactions=ds.n_interactions)
            s.add(row)
            s.flush()
        return {"dataset_id": row.id, "fingerprint": ds.fingerprint}

    return record


# train -----------------------------------------------------------------------------------------------
SHAPE_FIELDS = ("backbone", *BACKBONE_SHAPE)


def train(a: Attempt) -> Record:
    from models.checkpoint import load_model
    from models.train import TrainConfig
    from models.train import train as run_training

    spec = _spec(TrainSpec, a.payload)
    ds_row, ds = a.res.dataset(spec.dataset_id)
    init = None
    if spec.init_model_id:
        init_row, init = a.res.model(spec.init_model_id)
        if init_row.dataset_id != ds_row.id:
            raise RecmergeError(f"init_model_id {spec.init_model_id}: trained on another dataset")
    shape = {k: getattr(spec, k) for k in SHAPE_FIELDS}
    if init:  # as in the CLI: the starting model's shape, unless the request names a field
        bb = read_metadata(init).backbone
        shape |= {k: getattr(bb, "kind" if k == "backbone" else k) for k in SHAPE_FIELDS
                  if k not in spec.model_fields_set}
    cfg = TrainConfig(recipe=spec.recipe, options=spec.options, **shape, epochs=spec.run_epochs,
                      batch_size=spec.batch_size, lr=spec.lr, patience=spec.patience, seed=spec.seed,
                      init=str(init) if init else None,
                      device=a.res.device, max_minutes=spec.max_minutes, precision=spec.precision)
    last = 0.9 if spec.evaluate_test else 1.0
    out = run_training(ds, cfg, a.workdir / "model.safetensors", progress=a.scaled(0.0, last))
    metrics = {"valid": {"full": out.valid}}
    if spec.evaluate_test:
        model, _ = load_model(out.checkpoint, device=a.res.device or "cpu")
        metrics = _merge_metrics(metrics, _evaluate(model, ds, ["test"], ["full"], a.res.device,
                                                    a.scaled(last, 1.0)))
    sha = a.res.store.put_file(out.checkpoint, out.sha256)
    name = spec.name or spec.recipe
    fields = _model_fields(a, out.checkpoint, sha, "recipe", name, ds_row.id, metrics)

    def record(s: Session) -> dict:
        return {**_result_for(jobs.register_model(s, **fields)), "best_epoch": out.best_epoch}

    return record


# fisher ----------------------------------------------------------------------------------------------
def fisher(a: Attempt) -> Record:
    from merging.fisher import cache_key, estimate_fisher

    spec = _spec(FisherSpec, a.payload)
    row, ckpt = a.res.model(spec.model_id)
    _, ds = a.res.dataset(row.dataset_id)
    key = cache_key(row.sha256, ds.fingerprint, spec.settings)
    with a.res.session() as s:
        cached = s.scalar(select(Fisher).where(Fisher.cache_key == key))
    if cached is not None and a.res.store.exists(cached.sha256):
        return lambda s: {"fisher_id": cached.id, "sha256": cached.sha256, "cached": True}
    out = a.workdir / "fisher.safetensors"
    estimate_fisher(ckpt, ds, spec.settings, out=out, progress=a.progress, device=a.res.device)
    sha = a.res.store.put_file(out)

    def record(s: Session) -> dict:
        found = s.scalar(select(Fisher).where(Fisher.cache_key == key))
        if found is None:
            try:
                with s.begin_nested():
                    found = Fisher(id=jobs.new_id(), cache_key=key, checkpoint_sha256=row.sha256,
                                   dataset_fingerprint=ds.fingerprint, settings=spec.settings.model_dump(),
                                   sha256=sha)
                    s.add(found)
            except IntegrityError:  # a twin job cached the same Fisher first
                found = s.scalar(select(Fisher).where(Fisher.cache_key == key))
        elif not a.res.store.exists(found.sha256):  # the cached file was removed: this one replaces it
            found.sha256 = sha
        return {"fisher_id": found.id, "sha256": found.sha256, "cached": False}

    return record


# evaluate --------------------------------------------------------------------------------------------
def evaluate(a: Attempt) -> Record:
    from models.checkpoint import load_model

    spec = _spec(EvaluateSpec, a.payload)
    row, path = a.res.model(spec.model_id)
    _, ds = a.res.dataset(row.dataset_id)
    model, _ = load_model(path, device=a.res.device or "cpu")
    metrics = _evaluate(model, ds, spec.splits, spec.protocols, a.res.device, a.progress)

    def record(s: Session) -> dict:
        # Evaluation is deterministic (fixed negatives), so a re-run writes the same numbers again.
        m = s.get(Model, spec.model_id, with_for_update=True)
        m.metrics = _merge_metrics(m.metrics, metrics)
        return {"model_id": m.id, "metrics": metrics}

    return record


# merge -----------------------------------------------------------------------------------------------
def merge(a: Attempt) -> Record:
    from merging.config import record_of
    from merging.fisher import cache_key
    from merging.merge import merge_checkpoints
    from models.checkpoint import load_model

    spec = _spec(MergeSpec, a.payload)
    rows, paths = zip(*(a.res.model(m) for m in spec.model_ids))
    base_row, base = a.res.model(spec.base_model_id) if spec.base_model_id else (None, None)
    ds_row, ds = a.res.dataset(rows[0].dataset_id)
    fishers = None
    if spec.fisher is not None:  # set by the spec exactly where the method weighs by Fishers
        fishers = []
        with a.res.session() as s:
            for row in rows:
                key = cache_key(row.sha256, ds.fingerprint, spec.fisher)
                f = s.scalar(select(Fisher).where(Fisher.cache_key == key))
                if f is None or not a.res.store.exists(f.sha256):
                    raise RecmergeError(f"model {row.id}: its Fisher is not in the cache (not computed, or its "
                                        f"file was removed from the store); submit the merge again")
                fishers.append(a.res.store.path_for(f.sha256))
    steps = 1 + bool(spec.finetune_epochs) + spec.evaluate
    out = a.workdir / "merged.safetensors"
    from core.merge_inputs import merge_inputs

    # greedy-soup and weight-search get a validation score, regmean Gram matrices, adamerging an objective
    data_fns = merge_inputs(spec.method, spec.options, ds, read_metadata(paths[0]).backbone, a.res.device)
    config = record_of(spec.method, spec.model_ids, spec.weights, spec.options, spec.base_model_id,
                       spec.fisher.model_dump() if spec.fisher is not None else None)
    merged = merge_checkpoints(spec.method, list(paths), out, weights=spec.weights, options=spec.options,
                               base=base, fishers=fishers, progress=a.scaled(0.0, 1 / steps), **data_fns,
                               # the store names files by their sha256: the merge checks them as it reads
                               sha256s=[r.sha256 for r in rows] + ([base_row.sha256] if base_row else []),
                               config=config)
    if spec.finetune_epochs:
        out = finetune(a, ds, merged, spec.finetune_epochs, progress=a.scaled(1 / steps, 2 / steps, "finetune "))
    metrics = None
    if spec.evaluate:
        model, _ = load_model(out, device=a.res.device or "cpu")
        metrics = _evaluate(model, ds, ["valid", "test"], spec.protocols, a.res.device,
                            a.scaled((steps - 1) / steps, 1.0))
    sha = a.res.store.put_file(out, sha256=None if spec.finetune_epochs else merged.sha256)
    name = spec.name or f"{spec.method}({', '.join(r.name for r in rows)})"
    fields = _model_fields(a, out, sha, "merged", name, ds_row.id, metrics)

    def record(s: Session) -> dict:
        # What a method chose on data (every candidate's validation score, the learned coefficients).
        return _result_for(jobs.register_model(s, **fields)) | merged.fitted

    return record


def finetune(a: Attempt, ds, merged, epochs: int, progress):
    """The thesis's best setting: a short cloze training from the merged parameters. The result keeps
    the merge's description, plus how it was fine-tuned."""
    from models.checkpoint import load_checkpoint, save_checkpoint
    from models.train import TrainConfig
    from models.train import train as run_training

    bb = read_metadata(merged.path).backbone
    cfg = TrainConfig.continuing(bb, str(merged.path), recipe="bert4rec", epochs=epochs, patience=0,
                                 device=a.res.device)
    out = run_training(ds, cfg, a.workdir / "finetuned.safetensors", progress=progress).checkpoint
    state, meta = load_checkpoint(out)
    meta.merge = read_metadata(merged.path).merge | {
        "finetune": {"recipe": "bert4rec", "epochs": epochs, "from_sha256": merged.sha256}}
    save_checkpoint(out, state, meta)
    return out


BODIES = {"prepare": prepare, "train": train, "fisher": fisher, "evaluate": evaluate, "merge": merge}
