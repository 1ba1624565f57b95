"""What each dashboard page shows, gathered from the database (and the store for cards): plain dicts and
rows for the templates, so the templates hold no queries."""

from __future__ import annotations

from typing import Literal, get_args, get_origin

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.services import cards, jobs
from app.services.models import get_model
from app.ui import markdown
from core.db_models import Alias, Dataset, Fisher, Job, Model
from core.store import Store
from models.card import COLUMNS

# The metric the bar chart compares: the one model cards lead with.
CHART_METRIC = ("test", "full", "ndcg@10")
ACTIVE = ("queued", "running")


def datasets(session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(Dataset.created_at)))


def all_models(session: Session) -> list[Model]:
    return list(session.scalars(select(Model).order_by(Model.created_at)))


def recent_jobs(session: Session, limit: int = 100) -> list[Job]:
    return list(session.scalars(select(Job).order_by(Job.created_at.desc()).limit(limit)))


def aliases(session: Session) -> list[Alias]:
    return list(session.scalars(select(Alias).order_by(Alias.name)))


def by_sha(session: Session, sha: str, dataset_id: str) -> Model | None:
    return session.scalar(select(Model).where(Model.sha256 == sha, Model.dataset_id == dataset_id)
                          .order_by(Model.created_at))


def metric(metrics: dict | None, split: str, protocol: str, name: str) -> float | None:
    value = (((metrics or {}).get(split) or {}).get(protocol) or {}).get(name)
    return float(value) if isinstance(value, int | float) else None


def lineage(session: Session, m: Model) -> dict:
    """Where a model came from: its ingredients and merge, a fine-tune after it, or the model training
    started from."""
    out: dict = {"kind": m.kind, "ingredients": [], "base": None, "merge": None, "finetune": None, "init": None,
                 "job": session.get(Job, m.source_job_id) if m.source_job_id else None}
    merge = m.merge or {}
    if merge:
        weights = merge.get("weights") or [None] * len(merge.get("ingredients", []))
        out["ingredients"] = [{"sha256": sha, "row": by_sha(session, sha, m.dataset_id), "weight": w}
                              for sha, w in zip(merge.get("ingredients", []), weights)]
        if merge.get("base"):
            out["base"] = {"sha256": merge["base"], "row": by_sha(session, merge["base"], m.dataset_id)}
        out["merge"] = {"method": merge.get("method"), "options": merge.get("options") or {}}
        out["finetune"] = merge.get("finetune")
    job = out["job"]
    if job is not None and job.kind == "train" and (job.payload or {}).get("init_model_id"):
        out["init"] = session.get(Model, job.payload["init_model_id"])
    return out


def metric_rows(m: Model, lin: dict) -> list[dict]:
    """The model first, then the models it was made from, each with the card's columns."""
    rows = [{"label": m.name, "model": m, "own": True}]
    rows += [{"label": i["row"].name, "model": i["row"], "own": False} for i in lin["ingredients"] if i["row"]]
    if lin["init"] is not None:
        rows.append({"label": f"{lin['init'].name} (initialisation)", "model": lin["init"], "own": False})
    for r in rows:
        r["values"] = [metric(r["model"].metrics, split, "full", name) for split, name in COLUMNS]
        r["chart"] = metric(r["model"].metrics, *CHART_METRIC)
    return rows


def chart(rows: list[dict], width: int = 420) -> dict:
    """Horizontal bars of CHART_METRIC, scaled to the largest value shown."""
    bars = [r for r in rows if r["chart"] is not None]
    top = max((r["chart"] for r in bars), default=0.0) or 1.0
    return {"metric": " ".join(CHART_METRIC), "width": width,
            "bars": [{"label": r["label"], "value": r["chart"], "own": r["own"],
                      "length": round(width * r["chart"] / top, 1)} for r in bars]}


def fishers_for(session: Session, sha: str, fingerprint: str) -> list[Fisher]:
    return list(session.scalars(select(Fisher).where(Fisher.checkpoint_sha256 == sha,
                                                     Fisher.dataset_fingerprint == fingerprint)
                                .order_by(Fisher.created_at.desc())))


def model_page(session: Session, store: Store, model_id: str) -> dict:
    from app.ui.figures import available

    m = get_model(session, model_id)
    lin = lineage(session, m)
    rows = metric_rows(m, lin)
    return {"model": m, "dataset": session.get(Dataset, m.dataset_id), "lineage": lin, "rows": rows,
            "columns": [f"{s} {n}" for s, n in COLUMNS], "chart": chart(rows),
            "figures": available(session, store, m, lin),
            "card": markdown.render(cards.model_card(session, store, model_id), shift=2)}


def job_page(session: Session, job_id: str) -> dict:
    job = jobs.get_job(session, job_id)
    public = jobs.merge_job_public(session, job) if job.kind == "merge" else jobs.job_public(job)
    children = getattr(public, "children", [])
    live = job.status in ACTIVE or any(c.status in ACTIVE for c in children)
    return {"job": public, "live": live, "cancellable": job.kind == "merge" and job.status in ACTIVE}


def _choices(schema) -> list[dict]:
    """Every single-option setting that could change what a method needs: each value of each Literal
    option (e.g. weight-search's combine), plus the defaults ({})."""
    out = [{}]
    for name, f in schema.model_fields.items():
        if get_origin(f.annotation) is Literal:
            out += [{name: v} for v in get_args(f.annotation)]
    return out


def merge_methods() -> list[dict]:
    """The merge form's view of the method registry: each method's options with their defaults and
    descriptions, and when it needs a base model or Fishers (always, never, or under one option value),
    all read from the methods themselves so the form cannot fall behind the registry."""
    from merging.methods import METHODS

    rows = []
    for name, cls in METHODS.items():
        choices = _choices(cls.Options)
        base = [c for c in choices if cls.base_use(c)]
        fisher = [c for c in choices if cls.fisher_use(c)]
        options = [f"{k} (default {f.default!r}): {f.description or ''}".rstrip(": ")
                   for k, f in cls.Options.model_fields.items()]
        if "weight" in cls.ModelOptions.model_fields:
            options.append("per-model weights: the Weights field")
        rows.append({"name": name, "options": options,
                     "base": "always" if {} in base else (base[0] if base else "never"),
                     "fisher": "always" if {} in fisher else (fisher[0] if fisher else "never")})
    return rows


def needs_text(rows: list[dict], key: str) -> str:
    """'a, b; c with combine task-vectors': the methods that use a base model (or Fishers)."""
    always = [r["name"] for r in rows if r[key] == "always"]
    sometimes = [f"{r['name']} with " + ", ".join(f"{k} {v}" for k, v in r[key].items())
                 for r in rows if isinstance(r[key], dict)]
    return ", ".join(always) + ("; " + "; ".join(sometimes) if sometimes else "")
