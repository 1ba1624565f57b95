"""/ui: the dashboard. A page is two requests. The page itself (open to anyone: it holds no data, so a
browser can navigate to it without a header) is a shell that names its part; the part (/ui/part/...) is
behind the read door like every other read, and the page's script fetches it with the token the user
typed, as it does for writes. Writes go straight to the REST API."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from app.api.deps import ReadAccess, SessionDep, SettingsDep, StoreDep
from app.services.models import get_model
from app.ui import figures, views

HERE = Path(__file__).parent
STATIC = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")
# Files change between releases but keep their names: the digest in the URL makes browsers refetch.
templates.env.globals["static_version"] = hashlib.sha256(
    b"".join(p.read_bytes() for p in sorted(STATIC.iterdir()))).hexdigest()[:12]

router = APIRouter(prefix="/ui", include_in_schema=False)
NAV = [("", "Overview"), ("datasets", "Datasets"), ("models", "Models"), ("jobs", "Jobs"), ("merge", "New merge"),
       ("recommend", "Recommend")]


def _shell(request: Request, part: str, section: str, title: str) -> HTMLResponse:
    return templates.TemplateResponse(request, "shell.html", {"part": part, "section": section, "title": title,
                                                              "nav": NAV})


def _shell_route(path: str, part: str, section: str, title: str) -> None:
    async def page(request: Request) -> HTMLResponse:
        return _shell(request, "/ui/part" + part.format(**request.path_params), section, title)

    router.add_api_route(path, page, methods=["GET"], response_class=HTMLResponse, name=f"ui-page{path}")


for _path, _part, _section, _title in [
    ("", "/overview", "", "Overview"), ("/datasets", "/datasets", "datasets", "Datasets"),
    ("/models", "/models", "models", "Models"), ("/models/{model_id}", "/models/{model_id}", "models", "Model"),
    ("/jobs", "/jobs", "jobs", "Jobs"), ("/jobs/{job_id}", "/jobs/{job_id}", "jobs", "Job"),
    ("/merge", "/merge", "merge", "New merge"), ("/recommend", "/recommend", "recommend", "Recommend"),
]:
    _shell_route(_path, _part, _section, _title)


def _part(request: Request, name: str, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, f"{name}.html", context)


@router.get("/part/overview", dependencies=[ReadAccess], response_class=HTMLResponse)
def part_overview(request: Request, session: SessionDep):
    jobs = views.recent_jobs(session, limit=10)
    return _part(request, "overview", datasets=views.datasets(session), models=views.all_models(session),
                 jobs=jobs, live=any(j.status in views.ACTIVE for j in jobs))


@router.get("/part/datasets", dependencies=[ReadAccess], response_class=HTMLResponse)
def part_datasets(request: Request, session: SessionDep):
    return _part(request, "datasets", datasets=views.datasets(session))


@router.get("/part/models", dependencies=[ReadAccess], response_class=HTMLResponse)
def part_models(request: Request, session: SessionDep):
    return _part(request, "models", models=views.all_models(session), datasets=views.datasets(session),
                 aliases=views.aliases(session))


@router.get("/part/models/{model_id}", dependencies=[ReadAccess], response_class=HTMLResponse)
def part_model(request: Request, model_id: str, session: SessionDep, store: StoreDep):
    return _part(request, "model", **views.model_page(session, store, model_id))


@router.get("/part/models/{model_id}/figures/{name}.png", dependencies=[ReadAccess], response_class=FileResponse)
def part_figure(model_id: str, name: str, session: SessionDep, store: StoreDep, settings: SettingsDep):
    m = get_model(session, model_id)
    path = figures.figure_png(session, store, settings.DATA_DIR / "figures", m, views.lineage(session, m), name)
    return FileResponse(path, media_type="image/png")


@router.get("/part/jobs", dependencies=[ReadAccess], response_class=HTMLResponse)
def part_jobs(request: Request, session: SessionDep):
    jobs = views.recent_jobs(session)
    return _part(request, "jobs", jobs=jobs, live=any(j.status in views.ACTIVE for j in jobs))


@router.get("/part/jobs/{job_id}", dependencies=[ReadAccess], response_class=HTMLResponse)
def part_job(request: Request, job_id: str, session: SessionDep):
    return _part(request, "job", **views.job_page(session, job_id))


@router.get("/part/merge", dependencies=[ReadAccess], response_class=HTMLResponse)
def part_merge(request: Request, session: SessionDep):
    from core.specs import DEFAULT_FISHER
    from merging.fisher import FisherSettings
    sampling = FisherSettings.model_fields["sampling"].annotation.__args__
    methods = views.merge_methods()
    return _part(request, "merge", models=views.all_models(session), datasets=views.datasets(session),
                 methods=methods, base_text=views.needs_text(methods, "base"),
                 fisher_text=views.needs_text(methods, "fisher"), sampling=sampling, default_fisher=DEFAULT_FISHER)


@router.get("/part/recommend", dependencies=[ReadAccess], response_class=HTMLResponse)
def part_recommend(request: Request, session: SessionDep):
    return _part(request, "recommend", models=views.all_models(session), aliases=views.aliases(session))


def mount(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
