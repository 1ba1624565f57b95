"""Request and response bodies of the job routes. The requests are the workers' own payload specs
(core/specs.py), so what the API accepts is exactly what a task can run. Worker names, broker
message ids and scratch paths stay internal."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from app.schemas import JSON_BODY
from core.specs import MergeSpec, TrainSpec

# The rules between fields (one weight per model, heads dividing hidden, ...) are checked by the specs
# and answered with 422 before any id is looked up; app/api/document.py writes them into the request
# schemas of the OpenAPI document.
MergeJobCreate = MergeSpec  # read with strict=True by app/api/jobs.py (it also takes a merge config)


class TrainJobCreate(TrainSpec):
    model_config = JSON_BODY


class Progress(BaseModel):
    stage: str | None
    fraction: float


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    kind: Literal["prepare", "train", "fisher", "merge", "evaluate"]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: Progress
    error: str | None
    attempts: int
    request: dict  # what was asked, as validated
    result: dict | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ModelMetrics(BaseModel):
    model_id: str
    name: str
    metrics: dict | None  # {split: {protocol: {metric: value}}}


class MergeJobPublic(JobPublic):
    result_model_id: str | None
    merged: ModelMetrics | None  # the merged model's metrics, once it exists...
    ingredients: list[ModelMetrics]  # ...beside those of the models it was merged from
    children: list[JobPublic]  # the Fisher and evaluation jobs it waits for
