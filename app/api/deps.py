"""Dependencies shared by the routes, as `Annotated` aliases so a route's signature says what it needs."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.serving import Recommender
from app.settings import Settings
from app.store import Store


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

_bearer = HTTPBearer(auto_error=False, description="RECMERGE_API_TOKEN, required on write calls when set")


def require_token(settings: SettingsDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> None:
    """Write calls carry `Authorization: Bearer <RECMERGE_API_TOKEN>` when the server has a token."""
    if settings.API_TOKEN is None:
        return
    if credentials is None:
        raise HTTPException(401, "this call writes: send 'Authorization: Bearer <token>' (RECMERGE_API_TOKEN)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(credentials.credentials.encode(), settings.API_TOKEN.encode()):
        raise HTTPException(401, "wrong API token", headers={"WWW-Authenticate": "Bearer"})


WriteAccess = Depends(require_token)
