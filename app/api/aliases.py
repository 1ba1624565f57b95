from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from app.api.deps import ReadAccess, RecommenderDep, SessionDep, WriteAccess
from app.api.errors import documented
from app.schemas import ALIAS_PATTERN, AliasPublic, AliasSet
from app.services import models

router = APIRouter(prefix="/aliases", tags=["aliases"])
NamePath = Annotated[str, Path(pattern=ALIAS_PATTERN)]


@router.put("/{name}", response_model=AliasPublic, dependencies=[WriteAccess],
            responses=documented(401, 404, 413, 422))
def set_alias(name: NamePath, body: AliasSet, session: SessionDep, recommender: RecommenderDep):
    """Point an alias (e.g. `production`) at a model; recommendations follow without a restart."""
    alias = models.set_alias(session, name, body.model_id)
    recommender.forget(name)
    return alias


@router.get("", dependencies=[ReadAccess], response_model=list[AliasPublic], responses=documented(401))
def list_aliases(session: SessionDep):
    return models.list_aliases(session)


@router.get("/{name}", dependencies=[ReadAccess], response_model=AliasPublic, responses=documented(401, 404, 422))
def get_alias(name: NamePath, session: SessionDep):
    return models.get_alias(session, name)
