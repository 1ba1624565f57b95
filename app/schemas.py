"""Request and response bodies. Create schemas say what a client may send; Public schemas say what it
gets back. Nothing here names a server-side path."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.readers import FORMATS

BUILTIN_SOURCES = ("ml-100k",)
Name = Field(min_length=1, max_length=200)
ItemId = str | int  # original ids; compared as strings, as the prepared dataset stores them
Format = Literal[FORMATS]  # type: ignore[valid-type]


# JSON request bodies are read strictly: JSON has its own numbers and booleans, so `false` or "5" where
# the document says integer is refused, not converted. (Form fields arrive as text and are converted.)
JSON_BODY = ConfigDict(extra="forbid", strict=True)


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# --- datasets -------------------------------------------------------------------------------------
class DatasetCreate(BaseModel):
    """Prepare a built-in dataset by name (the server fetches it; a client never names a path)."""

    model_config = JSON_BODY
    name: str = Name
    source: Literal[BUILTIN_SOURCES]  # type: ignore[valid-type]
    min_user: int = Field(5, ge=3, le=1_000_000)
    min_item: int = Field(0, ge=0, le=1_000_000)


class DatasetUpload(BaseModel):
    """The form fields that come with an uploaded interactions file."""

    name: str = Name
    format: Format | None = None
    min_user: int = Field(5, ge=3, le=1_000_000)
    min_item: int = Field(0, ge=0, le=1_000_000)
    user_col: str | None = Field(None, max_length=100)
    item_col: str | None = Field(None, max_length=100)
    order_col: str | None = Field(None, max_length=100)


class DatasetPublic(_Public):
    id: str
    name: str
    fingerprint: str
    source: str
    n_users: int
    n_items: int
    n_interactions: int
    created_at: datetime


# --- models (uploaded recipes and merged models) --------------------------------------------------
class ModelPublic(_Public):
    id: str
    kind: Literal["recipe", "merged"]
    name: str
    dataset_id: str
    sha256: str  # identifies the file GET /models/{id}/file serves, and the ingredients of a merge
    size: int
    backbone: dict
    recipe: dict
    merge: dict | None
    metrics: dict | None
    source_job_id: str | None
    created_at: datetime


# --- aliases --------------------------------------------------------------------------------------
ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class AliasSet(BaseModel):
    model_config = JSON_BODY
    model_id: str = Field(min_length=1, max_length=36)


class AliasPublic(_Public):
    name: str
    model_id: str
    updated_at: datetime


# --- recommendations and events -------------------------------------------------------------------
class VisitorRecommend(BaseModel):
    """Top-k for a visitor with no account: the history comes with the request."""

    model_config = JSON_BODY
    model: str = Field(min_length=1, max_length=100, description="model id or alias")
    items: list[ItemId] = Field(max_length=10_000, description="original item ids, oldest first")
    k: int = Field(10, ge=1, description="how many items; a k past the catalogue's size lists all of it")


class RecommendedItem(BaseModel):
    item: str
    title: str | None
    score: float


class Recommendation(BaseModel):
    model_id: str
    user: str | None
    items: list[RecommendedItem]


class EventsCreate(BaseModel):
    """Interactions to append to a user's history, oldest first. The dataset is named directly or
    through a model (id or alias) trained on it."""

    model_config = JSON_BODY
    items: list[ItemId] = Field(min_length=1, max_length=1000)
    dataset_id: str | None = Field(None, max_length=36)
    model: str | None = Field(None, max_length=100)


class EventsPublic(BaseModel):
    dataset_id: str
    user: str
    added: int
    events: int  # the user's events so far (beyond the dataset's own sequence)


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]
    store: Literal["ok"]
