"""Jobs as the API sees them: check a request against the database before anything is queued (a request
that cannot work by itself -> 422, ids that do not exist -> 404, things that exist but do not fit
together -> 409), then create the job rows and send them.

A merge job fans out: one Fisher job per ingredient whose Fisher is not cached (method fisher), one
evaluation job per ingredient not yet scored on the requested protocols (evaluate: true). They run in
parallel on as many workers as there are; the merge job waits (stage `waiting`) and is sent when the
last of them ends (core/jobs.py `release`).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.job_schemas import JobPublic, MergeJobPublic, ModelMetrics, Progress
from app.services.errors import Conflict, NotFound, Unprocessable
from core import jobs
from core.db_models import Dataset, Fisher, Job, Model
from core.specs import MergeSpec, TrainSpec
from core.store import Store
from models.errors import RecmergeError

_INTERNAL = ("children", "parent")


def _model(session: Session, model_id: str, field: str) -> Model:
    m = session.get(Model, model_id)
    if m is None:
        raise NotFound(f"{field}: model {model_id!r} not found")
    return m


def _existing(session: Session, key: str | None) -> Job | None:
    return session.scalar(select(Job).where(Job.idempotency_key == key)) if key else None


def submit_train(session: Session, spec: TrainSpec, key: str | None = None) -> tuple[Job, list[tuple[str, str]]]:
    """(job, [(job id, kind) to send after commit]). A repeated idempotency key returns the first job."""
    from models.recipes import recipe_options

    if (job := _existing(session, key)) is not None:
        return job, []
    try:  # the request's own fields before the rows it names, as for merges
        recipe_options(spec.recipe, spec.options)
    except RecmergeError as e:
        raise Unprocessable(str(e)) from None
    if session.get(Dataset, spec.dataset_id) is None:
        raise NotFound(f"dataset_id: dataset {spec.dataset_id!r} not found")
    if spec.init_model_id:
        init = _model(session, spec.init_model_id, "init_model_id")
        if init.dataset_id != spec.dataset_id:
            raise Conflict(f"init_model_id: model {init.id} was trained on dataset {init.dataset_id}, "
                           f"not {spec.dataset_id}")
        for k in ("kind", "hidden", "layers", "heads", "inner", "max_len"):
            if init.backbone.get(k) != getattr(spec, "backbone" if k == "kind" else k):
                raise Conflict(f"init_model_id: model {init.id} has {k}={init.backbone.get(k)}, "
                               f"the request asks for {getattr(spec, 'backbone' if k == 'kind' else k)}")
    job = jobs.create(session, "train", spec.model_dump(), idempotency_key=key)
    return job, [(job.id, "train")]


def _check_merge(session: Session, spec: MergeSpec) -> tuple[list[Model], Model | None]:
    from merging.merge import build_method
    from merging.methods import get_method

    # What the request says by itself first (422, as the OpenAPI schema does), then what it names (404).
    try:
        build_method(spec.method, len(spec.model_ids), spec.options, spec.weights)  # validates options and weights
        cls = get_method(spec.method)
    except RecmergeError as e:
        raise Unprocessable(str(e)) from None
    uses_base = cls.base_use(spec.options)  # weight-search: as its option `combine` says
    if uses_base and spec.base_model_id is None:
        raise Unprocessable(f"base_model_id: method {spec.method!r} works on task vectors and needs a base model")
    if not uses_base and spec.base_model_id is not None:
        raise Unprocessable(f"base_model_id: method {spec.method!r} does not use a base model")
    rows = [_model(session, m, "model_ids") for m in spec.model_ids]
    base = _model(session, spec.base_model_id, "base_model_id") if spec.base_model_id else None
    ref = rows[0]
    ignore = {"dropout"}  # a training choice, not a parameter
    for other in rows[1:] + ([base] if base else []):
        if other.dataset_id != ref.dataset_id:
            raise Conflict(f"model_ids: model {other.id} was trained on dataset {other.dataset_id}, "
                           f"model {ref.id} on {ref.dataset_id}; only models of one dataset merge")
        diff = sorted(k for k in set(ref.backbone) | set(other.backbone)
                      if k not in ignore and ref.backbone.get(k) != other.backbone.get(k))
        if diff:
            k = diff[0]
            raise Conflict(f"model_ids: model {other.id} has backbone {k}={other.backbone.get(k)}, "
                           f"model {ref.id} has {ref.backbone.get(k)}")
    return rows, base


def submit_merge(session: Session, spec: MergeSpec, key: str | None = None, store: Store | None = None,
                 ) -> tuple[Job, list[tuple[str, str]]]:
    """A Fisher counts as cached when its row exists and (given the store) its file is still there."""
    if (job := _existing(session, key)) is not None:
        return job, []
    from merging.fisher import cache_key

    rows, _ = _check_merge(session, spec)
    dataset = session.get(Dataset, rows[0].dataset_id)
    fingerprint = dataset.fingerprint
    if spec.fisher is not None and spec.fisher.n is not None and spec.fisher.n > dataset.n_items:
        raise Conflict(f"fisher.n: {spec.fisher.n} items per sequence, but the dataset has {dataset.n_items}")
    parent_id = jobs.new_id()
    children: list[Job] = []
    if spec.fisher is not None:  # the spec sets it exactly where the method weighs by Fishers
        for m in rows:
            fisher_key = cache_key(m.sha256, fingerprint, spec.fisher)
            cached = session.scalar(select(Fisher.sha256).where(Fisher.cache_key == fisher_key))
            if cached is None or (store is not None and not store.exists(cached)):
                children.append(jobs.create(session, "fisher", {"model_id": m.id, "parent": parent_id,
                                                                "settings": spec.fisher.model_dump()}))
    if spec.evaluate:
        for m in rows:
            scored = m.metrics or {}
            if not all(p in scored.get(s, {}) for s in ("valid", "test") for p in spec.protocols):
                children.append(jobs.create(session, "evaluate", {"model_id": m.id, "parent": parent_id,
                                                                  "protocols": list(spec.protocols)}))
    job = jobs.create(session, "merge", spec.model_dump(), job_id=parent_id,
                      children=[c.id for c in children], idempotency_key=key)
    send = [(c.id, c.kind) for c in children] or [(job.id, "merge")]
    return job, send


def get_job(session: Session, job_id: str, kind: str | None = None) -> Job:
    job = session.get(Job, job_id)
    if job is None or (kind is not None and job.kind != kind):
        raise NotFound(f"{kind + ' job' if kind else 'job'} {job_id!r} not found")
    return job


def cancel(session: Session, job: Job) -> Job:
    if job.status in jobs.TERMINAL:
        raise Conflict(f"job {job.id} already {job.status}; only queued or running jobs can be cancelled")
    jobs.cancel(session, job)
    session.commit()
    session.refresh(job)
    return job


def job_public(job: Job) -> JobPublic:
    return JobPublic(id=job.id, kind=job.kind, status=job.status, error=job.error, attempts=job.attempts,
                     progress=Progress(stage=job.stage, fraction=job.fraction or 0.0),
                     request={k: v for k, v in (job.payload or {}).items() if k not in _INTERNAL},
                     result=job.result, created_at=job.created_at, started_at=job.started_at,
                     finished_at=job.finished_at)


def _metrics(m: Model) -> ModelMetrics:
    return ModelMetrics(model_id=m.id, name=m.name, metrics=m.metrics)


def merge_job_public(session: Session, job: Job) -> MergeJobPublic:
    payload = job.payload or {}
    result_id = (job.result or {}).get("model_id")
    merged = session.get(Model, result_id) if result_id else None
    ingredients = [m for m in (session.get(Model, i) for i in payload.get("model_ids", [])) if m is not None]
    kids = payload.get("children") or []
    children = session.scalars(select(Job).where(Job.id.in_(kids))).all() if kids else []
    return MergeJobPublic(**job_public(job).model_dump(), result_model_id=result_id,
                          merged=_metrics(merged) if merged else None,
                          ingredients=[_metrics(m) for m in ingredients],
                          children=[job_public(c) for c in children])

