from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.deps import ReadAccess, SessionDep, SettingsDep, StoreDep, WriteAccess
from app.api.errors import documented
from app.schemas import DatasetCreate, DatasetPublic, DatasetUpload
from app.services import datasets
from app.services.errors import Unprocessable
from app.services.uploads import saved_upload

router = APIRouter(prefix="/datasets", tags=["datasets"])

# One endpoint, two bodies: JSON names a built-in source, multipart carries the interactions file.
_UPLOAD_FORM = {
    "type": "object",
    "required": ["name", "file"],
    "properties": {"file": {"type": "string", "format": "binary"}, **DatasetUpload.model_json_schema()["properties"]},
}
_BODIES = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": DatasetCreate.model_json_schema()},
    "multipart/form-data": {"schema": _UPLOAD_FORM},
}}}


def _validated(model: type[BaseModel], data):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from None


@router.post("", response_model=DatasetPublic, status_code=201, dependencies=[WriteAccess], openapi_extra=_BODIES,
             responses={200: {"description": "the same dataset was already registered", "model": DatasetPublic},
                        **documented(401, 413, 415, 422, 503)})
async def create_dataset(request: Request, response: Response, session: SessionDep, store: StoreDep,
                         settings: SettingsDep):
    """Prepare and register a dataset: `{"name", "source": "ml-100k"}` as JSON, or a multipart upload of
    an interactions file with `name` and optional `format`, `min_user`, `min_item`, column names."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=20) as form:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise Unprocessable("file: a multipart upload needs the interactions file in a 'file' part")
            unknown = [k for k in form.keys() if k != "file" and k not in DatasetUpload.model_fields]
            if unknown:  # refused as an unknown JSON field is, rather than silently dropped
                raise RequestValidationError([{"type": "extra_forbidden", "loc": ("body", k), "input": None,
                                               "msg": "Extra inputs are not permitted"} for k in unknown])
            fields = _validated(DatasetUpload, {k: v for k, v in form.multi_items() if isinstance(v, str)})

            def prepare():
                with saved_upload(file.file, file.filename, settings.tmp_dir) as up:
                    return datasets.create_from_upload(session, store, settings.tmp_dir, up, fields)

            row, created = await run_in_threadpool(prepare)
    elif ctype.startswith("application/json"):
        try:
            data = await request.json()
        except ValueError:
            raise Unprocessable("body: not valid JSON") from None
        body = _validated(DatasetCreate, data)
        row, created = await run_in_threadpool(datasets.create_builtin, session, store, settings.tmp_dir, body)
    else:
        raise HTTPException(415, "send application/json (a built-in source) or multipart/form-data (a file)")
    if not created:
        response.status_code = 200
    return row


@router.get("", dependencies=[ReadAccess], response_model=list[DatasetPublic], responses=documented(401))
def list_datasets(session: SessionDep):
    return datasets.list_datasets(session)


@router.get("/{dataset_id}", dependencies=[ReadAccess], response_model=DatasetPublic,
            responses=documented(401, 404))
def get_dataset(dataset_id: str, session: SessionDep):
    return datasets.get_dataset(session, dataset_id)
