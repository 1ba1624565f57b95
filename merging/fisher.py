"""Diagonal Fisher of a checkpoint over a dataset's users (SPEC §5): settings, caching and the file.

    F = (1/|U|) Σ_i Σ_j w_ij (∇_θ log p(v_ij | s_i))²
s_i = user i's training sequence without its last item, whose target is that last training item
(validation and test items never enter). Items v_ij and weights w_ij: merging/item_selection.py;
per-example vs batchwise and how they are made fast: merging/fisher_compute.py. The model is put in
eval mode (no dropout) for the whole estimate.

The file is a safetensors file with the checkpoint's tensor names and shapes (float32) and string
metadata: format, checkpoint_sha256, dataset_fingerprint, sampling, n, computation, examples (|U|),
seed, settings (JSON), created_by, and sq_norm (‖F‖², merging/fisher_norm.py; files written before it,
cached ones included, lack it, and a merge then computes it from the file). A Fisher is computed once per
(checkpoint, dataset, settings): with a cache directory, the file is named by the sha256 of those three
and reused while valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import safe_open

from merging.fisher_compute import compute_fisher
from merging.fisher_norm import stored_sq_norm, with_sq_norm
from merging.item_selection import NEEDS_N
from models.checkpoint import (
    CREATED_BY,
    atomic_save,
    check_trained_on,
    file_sha256,
    load_model,
    read_metadata,
    read_raw_metadata,
)
from models.errors import CheckpointError, DataError, RecmergeError

FORMAT = "recmerge-fisher/1"
Progress = Callable[[str, float], None]


class FisherSettings(BaseModel):
    """What to estimate, validated before any work starts (validators raise ValueError, so a bad value
    comes back as a field error; `parse_settings` turns those into one RecmergeError line)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sampling: Literal["exact", "random", "topk", "model", "target"]
    n: int | None = Field(None, ge=1, description="items per sequence for random/topk/model")
    computation: Literal["per-example", "batchwise"] = "per-example"
    batch_size: int = Field(64, ge=1, le=65536)
    seed: int = Field(0, ge=0, description="random/model draws and the max_users subsample")
    max_users: int | None = Field(None, ge=1, description="estimate on a seeded random subset of users")

    @model_validator(mode="after")
    def _n_matches_sampling(self):
        if self.sampling in NEEDS_N and self.n is None:
            raise ValueError(f"n is required with sampling={self.sampling!r}")
        if self.sampling not in NEEDS_N and self.n is not None:
            raise ValueError(f"n applies to sampling random/topk/model only, not {self.sampling!r}")
        return self

    def key_fields(self) -> dict:
        """The fields that decide the result. Per-example gradients do not depend on how sequences are
        batched, so there batch_size is only a speed knob and stays out of the cache key."""
        fields = self.model_dump()
        if self.computation == "per-example":
            fields.pop("batch_size")
        return fields


# What `recmerge merge --method fisher` estimates when not told otherwise. Exact Fishers over every user cost
# about an hour per model at ~30,000 users; top-10 sampling was measured ~9x faster per sequence than exact
# and merged as well as exact or larger n on ml-100k (docs/results/merge_quality.md), and 4,000 users keep
# four ~1 MB models' Fishers within a few minutes on 2 CPU cores (docs/results/fisher_defaults.md).
MERGE_DEFAULTS = {"sampling": "topk", "n": 10, "max_users": 4000}


def merge_settings(given: dict) -> dict:
    """The settings of a Fisher estimated for a merge: MERGE_DEFAULTS overridden by `given`. A sampling
    given without n does not inherit the default n (exact and target take none); max_users "all" (or
    none) means every user."""
    settings = dict(MERGE_DEFAULTS)
    if "sampling" in given:
        settings.pop("n")
    settings.update(given)
    if str(settings.get("max_users")).lower() in ("all", "none"):
        settings["max_users"] = None
    return settings


def parse_settings(values: FisherSettings | dict) -> FisherSettings:
    """FisherSettings from a dict, every invalid field named in one RecmergeError line."""
    if isinstance(values, FisherSettings):
        return values
    try:
        return FisherSettings.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(
            "".join(f"{p}." for p in err["loc"][:-1]) + (f"{err['loc'][-1]}: " if err["loc"] else "")
            + ("unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, "))
            for err in e.errors())
        raise RecmergeError(f"fisher settings: {problems}") from None


def fisher_from_sequences(model, sequences: Sequence[Sequence[int]], targets: Sequence[int] | None,
                          settings: FisherSettings | dict, keys: Sequence[int] | None = None,
                          progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The Fisher averaged over the given histories (targets: the item that followed each; needed for
    sampling='target'). max_users is ignored here: subsampling is a dataset-level choice."""
    settings = parse_settings(settings)
    if settings.n is not None and settings.n > model.cfg.n_items:
        raise RecmergeError(f"n={settings.n} exceeds the model's {model.cfg.n_items} items")
    if not sequences:
        raise DataError("no sequences to estimate a Fisher on")
    sums = compute_fisher(model, sequences, targets, sampling=settings.sampling, n=settings.n,
                          computation=settings.computation, batch_size=settings.batch_size,
                          seed=settings.seed, keys=keys, progress=progress)
    return {k: v / len(sequences) for k, v in sums.items()}


def fisher_users(ds, settings: FisherSettings) -> np.ndarray:
    """Internal indices of the users that enter the estimate: those with at least 2 training items (a
    history and a target), optionally a seeded random subset of max_users of them, in index order."""
    lengths = np.array([len(s) for s in ds.train_sequences()])
    users = np.flatnonzero(lengths >= 2)
    if settings.max_users is not None and settings.max_users < len(users):
        rng = np.random.default_rng(settings.seed)
        users = np.sort(rng.choice(users, size=settings.max_users, replace=False))
    return users


@dataclass
class FisherResult:
    path: Path
    metadata: dict[str, str]
    cached: bool  # reused from the cache, nothing computed
    seconds: float


def cache_key(checkpoint_sha256: str, fingerprint: str, settings: FisherSettings) -> str:
    blob = json.dumps({"checkpoint_sha256": checkpoint_sha256, "dataset_fingerprint": fingerprint,
                       "settings": settings.key_fields()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def estimate_fisher(ckpt_path: str | os.PathLike, ds, settings: FisherSettings | dict,
                    out: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                    progress: Progress | None = None, device: str | torch.device | None = None) -> FisherResult:
    """Estimate (or reuse from cache_dir) the Fisher of a checkpoint on a prepared dataset and write it
    to `out` and/or the cache. Refuses a checkpoint trained on another dataset."""
    start = time.perf_counter()
    settings = parse_settings(settings)
    if out is None and cache_dir is None:
        raise RecmergeError("estimate_fisher needs an output path or a cache directory")
    check_trained_on(read_metadata(ckpt_path), ds, str(ckpt_path))
    if settings.n is not None and settings.n > ds.n_items:
        raise RecmergeError(f"n={settings.n} exceeds the dataset's {ds.n_items} items")
    ckpt_sha = file_sha256(ckpt_path)

    cached_path = None
    if cache_dir is not None:
        cached_path = Path(cache_dir) / f"{cache_key(ckpt_sha, ds.fingerprint, settings)}.fisher.safetensors"
        head = _valid_cached(cached_path, ckpt_path, ckpt_sha, ds.fingerprint)
        if head is not None:
            if out is not None and Path(out).resolve() != cached_path.resolve():
                _copy_atomic(cached_path, Path(out))
            if progress is not None:
                progress("fisher", 1.0)
            return FisherResult(Path(out) if out is not None else cached_path, head, True,
                                time.perf_counter() - start)

    users = fisher_users(ds, settings)
    if len(users) == 0:
        raise DataError(f"dataset {ds.fingerprint[:12]}: no user has 2 training items (a history and a target)")
    train = ds.train_sequences()
    seqs = [train[u][:-1] for u in users]
    targets = [int(train[u][-1]) for u in users]
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(ckpt_path, device=dev)
    tensors = fisher_from_sequences(model, seqs, targets, settings, keys=users, progress=progress)
    head = {
        "format": FORMAT,
        "checkpoint_sha256": ckpt_sha,
        "dataset_fingerprint": ds.fingerprint,
        "sampling": settings.sampling,
        "n": "none" if settings.n is None else str(settings.n),
        "computation": settings.computation,
        "examples": str(len(users)),
        "seed": str(settings.seed),
        "settings": json.dumps(settings.model_dump(), sort_keys=True),
        "model_mode": "eval",
        "created_by": CREATED_BY,
    }
    tensors = {k: v.detach().to("cpu", torch.float32) for k, v in tensors.items()}
    head = with_sq_norm(head, tensors)
    targets_out = [p for p in (cached_path, None if out is None else Path(out)) if p is not None]
    for path in targets_out:
        atomic_save(tensors, path, head)
    return FisherResult(targets_out[-1], head, False, time.perf_counter() - start)


def read_fisher_metadata(path: str | os.PathLike) -> dict[str, str]:
    head = read_raw_metadata(path)
    if head.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a recmerge Fisher file (metadata format={head.get('format')!r})")
    for key in ("checkpoint_sha256", "dataset_fingerprint", "sampling", "computation", "examples"):
        if key not in head:
            raise CheckpointError(f"{path}: Fisher metadata field {key!r} is missing")
    stored_sq_norm(head, path)
    return head


def load_fisher(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    head = read_fisher_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, t in tensors.items():
        if not torch.isfinite(t).all() or (t < 0).any():
            raise CheckpointError(f"{path}: Fisher tensor {name!r} has NaN, Inf or negative entries")
    return tensors, head


def _shapes(path) -> dict[str, tuple]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _valid_cached(path: Path, ckpt_path, ckpt_sha: str, fingerprint: str) -> dict[str, str] | None:
    """The cached file's metadata if it is a complete Fisher of this checkpoint and dataset, else None
    (then it is recomputed and overwritten)."""
    if not path.exists():
        return None
    try:
        head = read_fisher_metadata(path)
        if head["checkpoint_sha256"] != ckpt_sha or head["dataset_fingerprint"] != fingerprint:
            return None
        if _shapes(path) != _shapes(ckpt_path):
            return None
    except Exception:  # unreadable in any way: recompute rather than trust it
        return None
    return head


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
