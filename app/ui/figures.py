"""The thesis figures of one stored model as PNG files, drawn by the same functions as `recmerge plot`
(app/plots.py) and kept in a cache under DATA_DIR keyed by every input's
sha256, so a figure is drawn once per set of inputs."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from app.services.errors import NotFound
from app.services.uploads import safe_filename
from core.db_models import Dataset, Model
from core.store import Store

TITLES = {"top-probs": "Top-50 next-item probabilities of ten test sequences",
          "merge-plane": "The merged model on the plane of its three ingredients",
          "k-stat": "SimThres k_stat per epoch", "k-learn": "Learned thresholds k_learn per epoch",
          "similarity": "In-batch similarity histograms"}
LOG_FIGURES = ("k-stat", "k-learn", "similarity")
# pyplot keeps global state: one figure at a time per process.
_DRAWING = threading.Lock()


@dataclass
class Inputs:
    """What a figure is drawn from, or why it cannot be drawn for this model."""

    shas: list[str]
    draw: object = None  # (work_dir: Path) -> Path, given the inputs exist
    reason: str | None = None


def _training_log(session: Session, store: Store, lin: dict) -> str | None:
    """The store sha256 of the model's training log, when the job that trained it kept one."""
    job = lin["job"]
    sha = ((job.result or {}).get("log_sha256") if job is not None and job.kind == "train" else None)
    return sha if sha and store.exists(sha) else None


def _named(store: Store, work: Path, row: Model, suffix: str = ".safetensors") -> str:
    """The stored file under the model's name: the figure functions label lines by file name."""
    link = work / f"{safe_filename(row.name, 'model')}-{row.id[:8]}{suffix}"
    link.symlink_to(store.path_for(row.sha256))
    return str(link)


def inputs(session: Session, store: Store, m: Model, lin: dict, name: str) -> Inputs:
    from app.ui.views import fishers_for

    ds = session.get(Dataset, m.dataset_id)
    if name == "top-probs":
        def draw(work: Path) -> Path:
            from app.plots import fig_top_probs

            return fig_top_probs([_named(store, work, m)], str(store.get_dir(ds.fingerprint)), work)

        return Inputs([m.sha256, ds.fingerprint], draw)
    if name == "merge-plane":
        rows = [i["row"] for i in lin["ingredients"]]
        if len(rows) != 3 or None in rows:
            return Inputs([], reason="drawn for merges of exactly three stored ingredients")
        fishers = [next(iter(fishers_for(session, r.sha256, ds.fingerprint)), None) for r in rows]
        fishers = fishers if None not in fishers else []  # posterior clouds only when all three have one

        def draw(work: Path) -> Path:
            from app.plots import fig_merge_plane

            paths = [_named(store, work, r) for r in rows]
            fisher_paths = [str(store.path_for(f.sha256)) for f in fishers]
            return fig_merge_plane(paths, _named(store, work, m), fisher_paths, work)

        return Inputs([m.sha256, *(r.sha256 for r in rows), *(f.sha256 for f in fishers)], draw)
    if name in LOG_FIGURES:
        log_sha = _training_log(session, store, lin)
        if log_sha is None:
            return Inputs([], reason="drawn from a training log; none is stored for this model "
                                     "(recmerge plot draws it from the log beside a checkpoint trained by the CLI)")

        def draw(work: Path) -> Path:
            from app.plots import FIGURES, Log, NoData

            log = work / f"{safe_filename(m.name, 'model')}.log.json"
            log.symlink_to(store.path_for(log_sha))
            try:
                return FIGURES[name]([Log(log)], work)
            except NoData as e:
                raise NotFound(f"figure {name}: {e}") from None

        return Inputs([log_sha], draw)
    raise NotFound(f"figure {name!r}: known figures are {', '.join(TITLES)}")


def available(session: Session, store: Store, m: Model, lin: dict) -> list[dict]:
    return [{"name": n, "title": t, "reason": inputs(session, store, m, lin, n).reason} for n, t in TITLES.items()]


def figure_png(session: Session, store: Store, cache_dir: Path, m: Model, lin: dict, name: str) -> Path:
    spec = inputs(session, store, m, lin, name)
    if spec.reason is not None:
        raise NotFound(f"figure {name}: {spec.reason}")
    key = hashlib.sha256(json.dumps([name, spec.shas]).encode()).hexdigest()
    path = cache_dir / f"{key}.png"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _DRAWING, tempfile.TemporaryDirectory(dir=cache_dir) as work:
        drawn = spec.draw(Path(work))
        os.replace(drawn, path)  # complete or absent: another request never reads half a PNG
    return path
