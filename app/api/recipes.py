from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError

from app.api.deps import ReadAccess, SessionDep, SettingsDep, StoreDep, WriteAccess
from app.api.errors import documented
from app.schemas import ModelPublic
from app.services import models, recipes
from app.services.uploads import saved_upload

router = APIRouter(prefix="/recipes", tags=["recipes"])

FORM_FIELDS = ("file", "name", "dataset_id", "recipe")


async def known_form_fields(request: Request) -> None:
    """Unknown form fields are refused as unknown JSON fields are (422, extra_forbidden), not dropped."""
    form = await request.form()  # FastAPI has already parsed it for the route's parameters: cached
    unknown = [key for key in form.keys() if key not in FORM_FIELDS]
    if unknown:
        why = f"Extra inputs are not permitted (the form takes {', '.join(FORM_FIELDS)})"
        raise RequestValidationError([{"type": "extra_forbidden", "loc": ("body", key), "input": None, "msg": why}
                                      for key in unknown])


@router.post("", response_model=ModelPublic, status_code=201, dependencies=[WriteAccess, Depends(known_form_fields)],
             responses={200: {"description": "the same file was already registered", "model": ModelPublic},
                        **documented(400, 401, 404, 413, 422)})
def upload_recipe(
    response: Response,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="a recmerge .safetensors checkpoint")],
    name: Annotated[str, Form(min_length=1, max_length=200)],
    dataset_id: Annotated[str, Form(min_length=1, max_length=36)],
    recipe: Annotated[str | None, Form(max_length=100_000, description="JSON object {name, **options}, validated "
                                       "by the recipe registry; must agree with the file's header")] = None,
):
    """Register a checkpoint trained elsewhere. It is checked completely (format, header bounds against the
    tensors, metadata, dataset fingerprint, tensor names, shapes and dtypes, finite weights) before anything
    is stored."""
    with saved_upload(file.file, file.filename, settings.tmp_dir) as up:
        row, created = recipes.register_upload(session, store, up, name, dataset_id, recipe)
    if not created:
        response.status_code = 200
    return row


@router.get("", dependencies=[ReadAccess], response_model=list[ModelPublic], responses=documented(401))
def list_recipes(session: SessionDep, dataset_id: str | None = None):
    return models.list_models(session, kind="recipe", dataset_id=dataset_id)


@router.get("/{recipe_id}", dependencies=[ReadAccess], response_model=ModelPublic, responses=documented(401, 404))
def get_recipe(recipe_id: str, session: SessionDep):
    return models.get_model(session, recipe_id, kind="recipe")
