from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.deps import ReadAccess, SessionDep, StoreDep
from app.api.errors import documented
from app.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz():
    """Liveness: the process answers HTTP. Touches nothing else, so it also measures the HTTP stack."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready)
def readyz(session: SessionDep, store: StoreDep):
    """Readiness: the database answers and the store is reachable."""
    session.execute(text("SELECT 1"))
    store.exists("0" * 64)
    return Ready(status="ok", database="ok", store="ok")


@router.get("/metrics", dependencies=[ReadAccess], response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
                       **documented(401, json_route=False)})
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
