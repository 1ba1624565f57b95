"""Training and merge jobs: POST queues (202), GET polls, DELETE cancels. Jobs run on Celery workers or,
embedded, on the API process's own runner; either way their state is read back from the database."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from app.api.deps import ReadAccess, SessionDep, StoreDep, WriteAccess
from app.api.errors import documented
from app.job_schemas import JobPublic, MergeJobCreate, MergeJobPublic, TrainJobCreate
from app.services import jobs, merge_configs
from merging.config import ConfigError, MergeConfig
from workers.runner import Background

router = APIRouter(tags=["jobs"])


def get_background(request: Request) -> Background | None:
    return request.app.state.background


BackgroundDep = Annotated[Background | None, Depends(get_background)]
IdempotencyKey = Annotated[str | None, Header(max_length=200, description="repeat a POST safely: the same key "
                                                                          "returns the job the first one made")]


def _queue(session, bg: Background, submit, spec, key):
    try:
        job, send = submit(session, spec, key)
        session.commit()
    except IntegrityError:  # a concurrent request with the same idempotency key won
        session.rollback()
        job, send = submit(session, spec, key)
    # Sent only after the commit: a worker must find the row it is told about. Without a background
    # (an API built with jobs=False) the jobs stay queued for another process's sweeper to send.
    for job_id, kind in send if bg is not None else ():
        bg.res.dispatch(job_id, kind)
    return job


def _inline(schema: dict) -> dict:
    """A pydantic JSON schema with its $defs substituted in place, to stand alone in the OpenAPI document."""
    defs = schema.pop("$defs", {})

    def sub(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return sub(defs[ref.removeprefix("#/$defs/")])
            return {k: sub(v) for k, v in node.items()}
        return [sub(v) for v in node] if isinstance(node, list) else node

    return sub(schema)


_CONFIG_SCHEMA = _inline(MergeConfig.model_json_schema())
MERGE_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"anyOf": [_inline(MergeJobCreate.model_json_schema()), _CONFIG_SCHEMA]}},
    "application/yaml": {"schema": _CONFIG_SCHEMA}}}}


async def merge_request(request: Request) -> MergeJobCreate:
    """The body as the job's own JSON, or a merge config (JSON or YAML) turned into the same job; problems
    answer 422 with one entry per field, as FastAPI's own validation does."""
    try:
        doc = merge_configs.read_document(await request.body(), request.headers.get("content-type", ""))
        if merge_configs.is_config(doc):
            return merge_configs.spec_from_config(doc)
        return MergeJobCreate.model_validate(doc, strict=True)
    except ConfigError as e:
        raise RequestValidationError([{"type": "value_error", "loc": ("body", *[p for p in x["loc"].split(".") if p]),
                                       "msg": x["msg"]} for x in e.errors]) from None
    except ValidationError as e:
        raise RequestValidationError([{"type": x["type"], "loc": ("body", *x["loc"]), "msg": x["msg"]}
                                      for x in e.errors()]) from None


MergeRequest = Annotated[MergeJobCreate, Depends(merge_request)]


@router.post("/train-jobs", response_model=JobPublic, status_code=202, dependencies=[WriteAccess],
             responses=documented(401, 404, 409, 413, 422))
def create_train_job(body: TrainJobCreate, session: SessionDep, bg: BackgroundDep,
                     idempotency_key: IdempotencyKey = None):
    """Train a recipe on a dataset (optionally from `init_model_id`); the model is registered when it ends."""
    return jobs.job_public(_queue(session, bg, jobs.submit_train, body, idempotency_key))


@router.get("/jobs/{job_id}", dependencies=[ReadAccess], response_model=JobPublic, responses=documented(401, 404))
def get_job(job_id: str, session: SessionDep):
    return jobs.job_public(jobs.get_job(session, job_id))


@router.post("/merge-jobs", response_model=MergeJobPublic, status_code=202, dependencies=[WriteAccess],
             openapi_extra=MERGE_BODY_DOC, responses=documented(401, 404, 409, 413, 422))
def create_merge_job(body: MergeRequest, session: SessionDep, store: StoreDep, bg: BackgroundDep,
                     idempotency_key: IdempotencyKey = None):
    """Merge registered models. With method `fisher` each ingredient's Fisher is estimated (in parallel,
    cached); with `evaluate` the merged model is scored beside its ingredients. The body is the job's JSON,
    or a merge config (`merge_method`, `models`, ...: docs/examples/) as JSON or `application/yaml`."""
    job = _queue(session, bg, partial(jobs.submit_merge, store=store), body, idempotency_key)
    return jobs.merge_job_public(session, job)


@router.get("/merge-jobs/{job_id}", dependencies=[ReadAccess], response_model=MergeJobPublic,
            responses=documented(401, 404))
def get_merge_job(job_id: str, session: SessionDep):
    return jobs.merge_job_public(session, jobs.get_job(session, job_id, "merge"))


@router.delete("/merge-jobs/{job_id}", response_model=MergeJobPublic, dependencies=[WriteAccess],
               responses=documented(401, 404, 409))
def cancel_merge_job(job_id: str, session: SessionDep):
    """Cancel a queued or running merge job and the jobs it waits for; a running step stops at its next
    progress report and registers nothing."""
    job = jobs.cancel(session, jobs.get_job(session, job_id, "merge"))
    return jobs.merge_job_public(session, job)
