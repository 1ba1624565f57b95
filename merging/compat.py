"""What must hold before checkpoints (and their base and Fishers) may be merged. Header checks run
before any output is opened; the value checks (NaN/Inf, negative Fisher entries) run on each block as it
streams, and a Fisher's checkpoint sha256 is compared once the merge has read (and so hashed) that
checkpoint, which is why the engine writes to a temporary file that it deletes on failure."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from merging.fisher_norm import stored_sq_norm
from merging.io import SafetensorsReader
from models.checkpoint import CheckpointMeta, admit
from models.errors import CheckpointError, IncompatibleError


@dataclass
class Ingredient:
    """One checkpoint of a merge, opened for streaming."""

    path: Path
    reader: SafetensorsReader
    meta: CheckpointMeta

    @classmethod
    def open(cls, path) -> Ingredient:
        meta = admit(path)  # bounded header checks against the tensors, before the reader trusts any of it
        return cls(Path(path), SafetensorsReader(path), meta)

    def __enter__(self) -> Ingredient:
        return self

    def __exit__(self, *exc):
        self.reader.close()


def check_same_model(ref: Ingredient, other: Ingredient) -> None:
    """Identical backbone config, n_items, dataset fingerprint, tensor names, shapes and dtypes."""
    a, b = ref.meta.backbone, other.meta.backbone
    for f in fields(a):
        if getattr(a, f.name) != getattr(b, f.name):
            raise IncompatibleError(f"{other.path}: backbone {f.name}={getattr(b, f.name)!r}, "
                                    f"but {ref.path} has {getattr(a, f.name)!r}")
    if other.meta.n_items != ref.meta.n_items:
        raise IncompatibleError(f"{other.path}: n_items={other.meta.n_items}, but {ref.path} has {ref.meta.n_items}")
    if other.meta.dataset_fingerprint != ref.meta.dataset_fingerprint:
        raise IncompatibleError(f"{other.path}: dataset_fingerprint {other.meta.dataset_fingerprint[:12]}… differs "
                                f"from {ref.path}'s {ref.meta.dataset_fingerprint[:12]}…")
    check_same_tensors(ref.reader, other.reader, dtypes=True)


def check_compatible(paths, base=None) -> None:
    """The header-level checks of a merge, on their own: cheap, so a caller can run them before slow
    preparation (estimating Fishers, say)."""
    with ExitStack() as stack:
        ings = [stack.enter_context(Ingredient.open(p)) for p in [*paths, *([base] if base else [])]]
        for other in ings[1:]:
            check_same_model(ings[0], other)


def check_same_tensors(ref: SafetensorsReader, other: SafetensorsReader, dtypes: bool) -> None:
    missing = [n for n in ref.tensors if n not in other.tensors]
    if missing:
        raise IncompatibleError(f"{other.path}: tensor {missing[0]!r} is missing (present in {ref.path})")
    extra = [n for n in other.tensors if n not in ref.tensors]
    if extra:
        raise IncompatibleError(f"{other.path}: tensor {extra[0]!r} is not in {ref.path}")
    for name, a in ref.tensors.items():
        b = other.tensors[name]
        if a.shape != b.shape:
            raise IncompatibleError(f"{other.path}: tensor {name!r} has shape {list(b.shape)}, "
                                    f"{ref.path} has {list(a.shape)}")
        if dtypes and a.dtype != b.dtype:
            raise IncompatibleError(f"{other.path}: tensor {name!r} has dtype {b.dtype}, {ref.path} has {a.dtype}")
        if not b.dtype.is_floating_point:
            raise IncompatibleError(f"{other.path}: tensor {name!r} has non-floating dtype {b.dtype}; "
                                    "it cannot be averaged")


def check_fisher(fisher: SafetensorsReader, ckpt: Ingredient, ckpt_sha256: str | None) -> None:
    """A Fisher belongs to exactly one checkpoint (by sha256) and one dataset, with its tensor layout, and
    its `sq_norm`, if it has one, is a number a norm can be. With `ckpt_sha256=None` (not known yet) everything
    but the sha256 is checked; `check_fisher_checkpoint` does the rest once it is."""
    md = fisher.metadata
    for key in ("checkpoint_sha256", "dataset_fingerprint"):
        if key not in md:
            raise IncompatibleError(f"{fisher.path}: Fisher metadata field {key!r} is missing")
    stored_sq_norm(md, fisher.path)
    if ckpt_sha256 is not None:
        check_fisher_checkpoint(fisher, ckpt, ckpt_sha256)
    if md["dataset_fingerprint"] != ckpt.meta.dataset_fingerprint:
        raise IncompatibleError(f"{fisher.path}: Fisher dataset_fingerprint {md['dataset_fingerprint'][:12]}… "
                                f"differs from {ckpt.path}'s {ckpt.meta.dataset_fingerprint[:12]}…")
    check_same_tensors(ckpt.reader, fisher, dtypes=False)


def check_fisher_checkpoint(fisher: SafetensorsReader, ckpt: Ingredient, ckpt_sha256: str) -> None:
    md = fisher.metadata
    if md["checkpoint_sha256"] != ckpt_sha256:
        raise IncompatibleError(f"{fisher.path}: Fisher was computed for checkpoint sha256 "
                                f"{md['checkpoint_sha256'][:12]}…, but {ckpt.path} has {ckpt_sha256[:12]}…")


def check_values(block: torch.Tensor, name: str, path, fisher: bool = False) -> None:
    """No NaN/Inf (and, for a Fisher, no negative entry) in a block, with one cheap reduction each:
    NaN and ±Inf always make the sum non-finite; only then is the exact (slower) test run."""
    if not block.numel():
        return
    if fisher:
        lo, hi = torch.aminmax(block)
        bad = not (torch.isfinite(lo) and torch.isfinite(hi))
    else:
        bad = not torch.isfinite(block.sum()) and not torch.isfinite(block).all()  # the sum may overflow
    if bad:
        raise CheckpointError(f"{path}: tensor {name!r} contains NaN or Inf")
    if fisher and lo < 0:
        raise CheckpointError(f"{path}: Fisher tensor {name!r} has negative entries")
