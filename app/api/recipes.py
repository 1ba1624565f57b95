from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile

from app.api.deps import SessionDep, SettingsDep, StoreDep, WriteAccess
from app.schemas import ModelPublic
from app.services import models, recipes
from app.services.uploads import saved_upload

router = APIRouter(prefix="/recipes", tags=["recipes"])


@router.post("", response_model=ModelPublic, status_code=201, dependencies=[WriteAccess],
             responses={200: {"description": "the same file was already registered", "model": ModelPublic}})
def upload_recipe(
    response: Response,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="a recmerge .safetensors checkpoint")],
    name: Annotated[str, Form(min_length=1, max_length=200)],
    dataset_id: Annotated[str, Form(min_length=1, max_length=36)],
    recipe: Annotated[str | None, Form(max_length=100_000, description="JSON object; default: the file's")] = None,
):
    """Register a checkpoint trained elsewhere. It is checked completely (format, metadata, dataset
    fingerprint, tensor names and shapes, finite weights) before anything is stored."""
    with saved_upload(file.file, file.filename, settings.tmp_dir) as up:
        row, created = recipes.register_upload(session, store, up, name, dataset_id, recipe)
    if not created:
        response.status_code = 200
    return row


@router.get("", response_model=list[ModelPublic])
def list_recipes(session: SessionDep, dataset_id: str | None = None):
    return models.list_models(session, kind="recipe", dataset_id=dataset_id)


@router.get("/{recipe_id}", response_model=ModelPublic)
def get_recipe(recipe_id: str, session: SessionDep):
    return models.get_model(session, recipe_id, kind="recipe")
