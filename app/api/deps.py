"""Dependencies shared by the routes, as `Annotated` aliases so a route's signature says what it needs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.api import access
from app.serving import Recommender
from core.settings import Settings
from core.store import Store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_recommender(request: Request) -> Recommender:
    return request.app.state.recommender


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[Store, Depends(get_store)]
RecommenderDep = Annotated[Recommender, Depends(get_recommender)]

_bearer = HTTPBearer(auto_error=False, description="RECMERGE_API_TOKEN on write calls; RECMERGE_READ_TOKEN "
                     "(or the API token) on reads and RECMERGE_RECOMMEND_TOKEN (or either other) on "
                     "recommendations, each only when set")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def _door(settings: Settings, credentials: HTTPAuthorizationCredentials | None, door: str) -> None:
    header = None if credentials is None else f"{credentials.scheme} {credentials.credentials}"
    why = access.refusal(settings, door, header)
    if why is not None:
        raise HTTPException(401, why, headers={"WWW-Authenticate": "Bearer"})


async def require_token(settings: SettingsDep, credentials: Credentials) -> None:
    """Write calls carry `Authorization: Bearer <RECMERGE_API_TOKEN>` when the server has a token."""
    _door(settings, credentials, access.WRITE)


async def require_read_token(settings: SettingsDep, credentials: Credentials) -> None:
    _door(settings, credentials, access.READ)


async def require_recommend_token(settings: SettingsDep, credentials: Credentials) -> None:
    _door(settings, credentials, access.RECOMMEND)


WriteAccess = Depends(require_token)
ReadAccess = Depends(require_read_token)
RecommendAccess = Depends(require_recommend_token)
# For app.api.access.AuthFirst, which checks the same doors before a body is read.
DOORS = {require_token: access.WRITE, require_read_token: access.READ, require_recommend_token: access.RECOMMEND}
