from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import FileResponse, PlainTextResponse

from app.api.deps import ReadAccess, SessionDep, StoreDep
from app.api.errors import documented
from app.schemas import ModelPublic
from app.services import cards, models
from app.services.uploads import safe_filename

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", dependencies=[ReadAccess], response_model=list[ModelPublic], responses=documented(401, 422))
def list_models(session: SessionDep, kind: Literal["recipe", "merged"] | None = None, dataset_id: str | None = None):
    return models.list_models(session, kind=kind, dataset_id=dataset_id)


@router.get("/{model_id}", dependencies=[ReadAccess], response_model=ModelPublic, responses=documented(401, 404))
def get_model(model_id: str, session: SessionDep):
    return models.get_model(session, model_id)


@router.get("/{model_id}/file", dependencies=[ReadAccess], response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "the safetensors file"},
                       **documented(401, 404, json_route=False)})
def get_model_file(model_id: str, session: SessionDep, store: StoreDep):
    m = models.get_model(session, model_id)
    return FileResponse(store.path_for(m.sha256), media_type="application/octet-stream",
                        filename=f"{safe_filename(m.name, 'model')}.safetensors")


@router.get("/{model_id}/card", dependencies=[ReadAccess], response_class=PlainTextResponse,
            responses={200: {"content": {"text/markdown": {}}, "description": "the model card (Markdown)"},
                       **documented(401, 404, json_route=False)})
def get_model_card(model_id: str, session: SessionDep, store: StoreDep):
    """What the model is, its lineage, options, metrics beside its ingredients', and how to make it again."""
    return PlainTextResponse(cards.model_card(session, store, model_id), media_type="text/markdown; charset=utf-8")
