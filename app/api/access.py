"""Who may call what: bearer tokens for three doors, checked from the request's headers alone.

    write      RECMERGE_API_TOKEN                          (open when unset)
    read       RECMERGE_READ_TOKEN or the API token        (open when READ_TOKEN is unset)
    recommend  RECMERGE_RECOMMEND_TOKEN, READ or API token (open when RECOMMEND_TOKEN is unset)

A route says which door it is behind with one of the dependencies in app/api/deps.py. FastAPI reads a
request's body before it runs dependencies, so `AuthFirst` checks the same token as soon as the headers
are in: a caller without the token never gets a byte of its body read.
"""

from __future__ import annotations

import secrets

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from core.settings import Settings

WRITE, READ, RECOMMEND = "write", "read", "recommend"
_VARIABLE = {WRITE: "RECMERGE_API_TOKEN", READ: "RECMERGE_READ_TOKEN", RECOMMEND: "RECMERGE_RECOMMEND_TOKEN"}


def accepted_tokens(settings: Settings, door: str) -> list[str] | None:
    """The tokens that open a door, or None when it is open."""
    own = {WRITE: settings.API_TOKEN, READ: settings.READ_TOKEN, RECOMMEND: settings.RECOMMEND_TOKEN}[door]
    if own is None:
        return None
    stronger = {WRITE: [], READ: [settings.API_TOKEN], RECOMMEND: [settings.READ_TOKEN, settings.API_TOKEN]}[door]
    return [own, *(t for t in stronger if t is not None)]


def refusal(settings: Settings, door: str, authorization: str | None) -> str | None:
    """Why a request with this Authorization header may not pass the door (None: it may)."""
    tokens = accepted_tokens(settings, door)
    if tokens is None:
        return None
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        verb = "writes" if door == WRITE else "is protected"
        return f"this call {verb}: send 'Authorization: Bearer <token>' ({_VARIABLE[door]})"
    given = credentials.strip().encode()
    # Compare with every accepted token, so the time taken does not tell which one nearly matched.
    if not any([secrets.compare_digest(given, t.encode()) for t in tokens]):
        return "wrong API token"
    return None


def unauthorized(message: str) -> JSONResponse:
    from app.api.errors import error_response

    return error_response(401, message, headers={"WWW-Authenticate": "Bearer"})


def route_door(route, doors_by_dependency: dict) -> str | None:
    """The door of a route: the first door dependency found among its dependencies, at any depth."""
    if not isinstance(route, APIRoute):
        return None
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if dep.call in doors_by_dependency:
            return doors_by_dependency[dep.call]
        stack.extend(dep.dependencies)
    return None


def flat_routes(routes) -> list:
    """The routes in routing order, with included routers opened up (newer FastAPI keeps an included
    router as one entry). An include prefix would make its routes' own patterns wrong here: refused."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is None:
            out.append(route)
            continue
        if getattr(getattr(route, "include_context", None), "prefix", ""):
            raise RuntimeError("AuthFirst: routers are included without a prefix (give it to the APIRouter)")
        out.extend(flat_routes(inner.routes))
    return out


class AuthFirst:
    """Refuses a request that lacks its route's token with 401 before the body is read. Routes are matched
    in the router's own order, so the route checked is the route that would run."""

    def __init__(self, app: ASGIApp, settings: Settings, routes: list, doors_by_dependency: dict):
        self.app = app
        self.settings = settings
        self.routes = [(r, route_door(r, doors_by_dependency)) for r in flat_routes(routes)]
        self.active = any(door and accepted_tokens(settings, door) is not None for _, door in self.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.active:
            for route, door in self.routes:
                match, _ = route.matches(scope)
                if match is Match.FULL:
                    why = door and refusal(self.settings, door, Request(scope).headers.get("authorization"))
                    if why:
                        await unauthorized(why)(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)
