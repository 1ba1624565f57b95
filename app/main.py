"""The FastAPI application. `create_app()` builds it from Settings; uvicorn calls it as a factory.

Embedded mode (no broker): the schema is migrated when the app is built, and the job runner runs in
this process. With a broker, `recmerge db upgrade` migrates and Celery workers run the jobs.
"""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api import aliases, datasets, document, events, health, models, recipes, recommend
from app.api import errors as api_errors
from app.api import jobs as jobs_api
from app.api.access import AuthFirst
from app.api.deps import DOORS
from app.api.errors import error_response
from app.metrics import Metrics, MetricsMiddleware
from app.migrate import upgrade
from app.services.uploads import sweep_uploads
from app.serving import Recommender
from app.ui import routes as ui
from core.db import make_engine, make_sessionmaker
from core.settings import Settings, get_settings
from core.store import store_from_settings


class BodyLimit:
    """413 for any request body over the limit — before reading it when Content-Length says so, else
    as soon as the streamed bytes pass it — so an oversized upload is never spooled whole."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"request body larger than the upload limit of {self.limit} bytes "
                                  "(RECMERGE_MAX_UPLOAD_BYTES)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            err = self._too_large()
            await error_response(413, err.detail, headers={"Connection": "close"})(scope, receive, send)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large()  # FastAPI passes HTTPExceptions from body reading through
            return message

        await self.app(scope, limited_receive, send)


def _start_jobs(settings: Settings):
    """The sweeper, plus the in-process job runner when embedded (workers/runner.py)."""
    from workers.runner import start_background

    return start_background(settings)


def create_app(settings: Settings | None = None, *, jobs: bool = True) -> FastAPI:
    """`jobs=False` builds the API without the job runner and sweeper (API-only tests)."""
    settings = settings or get_settings()
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    sweep_uploads(settings.tmp_dir)  # scratch of uploads whose process died mid-request
    if settings.embedded:
        upgrade(settings.DATABASE_URL)
    engine = make_engine(settings.DATABASE_URL)
    sessions = make_sessionmaker(engine)
    store = store_from_settings(settings)
    metrics = Metrics()
    recommender = Recommender(engine, sessions, store, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.background = _start_jobs(settings) if jobs else None
        gc.freeze()  # the app's long-lived objects (modules, routes, schemas) need no collector visits
        try:
            yield
        finally:
            if app.state.background is not None:
                app.state.background.stop()
            recommender.close()
            engine.dispose()

    app = FastAPI(title="recmerge", version="0.1.0", lifespan=lifespan,
                  description="Train, merge and serve sequential recommenders.")
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.store = store
    app.state.metrics = metrics
    app.state.recommender = recommender
    app.state.background = None

    for module in (datasets, recipes, models, aliases, recommend, events, jobs_api, health):
        app.include_router(module.router)
    ui.mount(app)  # the dashboard: pages, their parts (behind the read door) and static files

    api_errors.install(app)
    document.install(app)  # after every route: it corrects the document they make

    app.add_middleware(BodyLimit, limit=settings.MAX_UPLOAD_BYTES)
    app.add_middleware(AuthFirst, settings=settings, routes=app.router.routes, doors_by_dependency=DOORS)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
