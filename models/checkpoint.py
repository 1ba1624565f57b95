"""Checkpoints: one .safetensors file whose header metadata carries everything needed to rebuild
and to check compatibility (SPEC §7). Pickled formats are refused everywhere."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from models.config import BackboneConfig
from models.errors import CheckpointError, IncompatibleError

FORMAT = "recmerge/1"
CREATED_BY = "recmerge 0.1.0"
# A safetensors file opens with an 8-byte little-endian header length; anything huge is not one.
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class CheckpointMeta:
    backbone: BackboneConfig
    recipe: dict
    dataset_fingerprint: str
    n_items: int
    created_by: str = CREATED_BY
    merge: dict | None = None
    extra: dict = field(default_factory=dict)  # any other string metadata, kept verbatim

    def to_header(self) -> dict[str, str]:
        head = dict(self.extra)
        head.update(
            format=FORMAT,
            backbone=self.backbone.to_json(),
            recipe=json.dumps(self.recipe, sort_keys=True),
            dataset_fingerprint=self.dataset_fingerprint,
            n_items=str(self.n_items),
            created_by=self.created_by,
        )
        if self.merge is not None:
            head["merge"] = json.dumps(self.merge, sort_keys=True)
        return head


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Refuse anything that is not a well-formed safetensors file, before any parser sees it."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory, expected a .safetensors file")
    if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"):
        raise CheckpointError(f"{p}: pickled checkpoints ({p.suffix}) are refused; use .safetensors")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{p}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{p}: not a safetensors file (bad header length)")
        first = f.read(1)
        if first != b"{":
            raise CheckpointError(f"{p}: not a safetensors file (header is not JSON)")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{p}: not a safetensors file (header is not JSON)") from None
    end = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{p}: tensor {name!r} has no data offsets") from None
        if end + hi > size:
            raise CheckpointError(f"{p}: truncated (tensor {name!r} runs past the end of the file)")


def read_raw_metadata(path: str | os.PathLike) -> dict[str, str]:
    check_safetensors_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from None


def parse_metadata(head: dict[str, str], where: str = "checkpoint") -> CheckpointMeta:
    if head.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a recmerge checkpoint (metadata format={head.get('format')!r})")
    for key in ("backbone", "recipe", "dataset_fingerprint", "n_items"):
        if key not in head:
            raise CheckpointError(f"{where}: metadata field {key!r} is missing")
    backbone = BackboneConfig.from_json(head["backbone"])
    try:
        recipe = json.loads(head["recipe"])
        merge = json.loads(head["merge"]) if "merge" in head else None
        n_items = int(head["n_items"])
    except (json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed metadata: {e}") from None
    if n_items != backbone.n_items:
        raise CheckpointError(f"{where}: n_items={n_items} disagrees with backbone n_items={backbone.n_items}")
    reserved = {"format", "backbone", "recipe", "dataset_fingerprint", "n_items", "created_by", "merge"}
    return CheckpointMeta(
        backbone=backbone,
        recipe=recipe,
        dataset_fingerprint=head["dataset_fingerprint"],
        n_items=n_items,
        created_by=head.get("created_by", ""),
        merge=merge,
        extra={k: v for k, v in head.items() if k not in reserved},
    )


def read_metadata(path: str | os.PathLike) -> CheckpointMeta:
    return parse_metadata(read_raw_metadata(path), where=str(path))


def check_trained_on(meta: CheckpointMeta, ds, where: str) -> None:
    """Refuse to use a checkpoint with a dataset it was not trained on (SPEC §2: fingerprints must match)."""
    if meta.dataset_fingerprint != ds.fingerprint:
        raise IncompatibleError(f"{where}: trained on dataset fingerprint {meta.dataset_fingerprint[:16]}, "
                                f"but the dataset has fingerprint {ds.fingerprint[:16]}")
    if meta.n_items != ds.n_items:
        raise IncompatibleError(f"{where}: checkpoint has {meta.n_items} items, the dataset has {ds.n_items}")


DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header for tensors laid out in `entries` order.

    We write headers ourselves because the safetensors library serialises metadata from a hash map, in an
    order that changes between processes: the same model would get a different sha256 on every save.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    off = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-aligned, as the format recommends
    return struct.pack("<Q", len(blob)) + blob


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write to a temporary file in the target directory, fsync, rename: readers never see half a file.
    Tensors go in name order, so equal content always gives equal bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    entries = [(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(safetensors_header(entries, metadata))
            for n in names:
                f.write(memoryview(tensors[n].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: tensor {name!r} contains NaN or Inf")


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: CheckpointMeta) -> str:
    tensors = {k: v.detach().to("cpu") for k, v in state_dict.items()}
    check_finite(tensors, str(path))
    atomic_save(tensors, path, meta.to_header())
    return file_sha256(path)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    meta = read_metadata(path)
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    check_finite(tensors, str(path))
    return tensors, meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint describes; shapes and names must match exactly."""
    from models.backbone import SeqRecModel

    state, meta = load_checkpoint(path)
    model = SeqRecModel(meta.backbone)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensor names do not match the backbone (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: tensor {k!r} has shape {tuple(state[k].shape)}, "
                                  f"the backbone expects {tuple(v.shape)}")
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
