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

from models.admission import TensorEntry, backbone_from_header, check_against_backbone, read_header, tensor_table
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


def check_safetensors_file(path: str | os.PathLike, where: str | None = None, max_header: int = _MAX_HEADER) -> None:
    """Refuse anything that is not a well-formed safetensors file, before any parser sees it."""
    where = where or str(path)
    header, data_start, size = read_header(path, where, max_header)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
            hi = int(hi)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: tensor {name[:100]!r} has no data offsets") from None
        if data_start + hi > size:
            raise CheckpointError(f"{where}: truncated (tensor {name[:100]!r} runs past the end of the file)")


def read_raw_metadata(path: str | os.PathLike, where: str | None = None) -> dict[str, str]:
    where = where or str(path)
    check_safetensors_file(path, where)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{where}: cannot read safetensors header: {e}") from None


def parse_metadata(head: dict[str, str], where: str = "checkpoint",
                   tensors: dict[str, TensorEntry] | None = None) -> CheckpointMeta:
    """With `tensors` (the file's tensor table), every backbone integer is bounded by what they can hold."""
    if head.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a recmerge checkpoint (metadata format={str(head.get('format'))[:40]!r})")
    for key in ("backbone", "recipe", "dataset_fingerprint", "n_items"):
        if key not in head:
            raise CheckpointError(f"{where}: metadata field {key!r} is missing")
    if tensors is not None:
        backbone = backbone_from_header(head["backbone"], tensors, where)
    else:
        try:
            backbone = BackboneConfig.from_json(head["backbone"])
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
    try:
        recipe = json.loads(head["recipe"])
        merge = json.loads(head["merge"]) if "merge" in head else None
        n_items = int(head["n_items"])
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: malformed metadata: {str(e)[:80]}") from None
    if not isinstance(recipe, dict) or not (merge is None or isinstance(merge, dict)):
        raise CheckpointError(f"{where}: metadata fields 'recipe' and 'merge' must be JSON objects")
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


def admit(path: str | os.PathLike, where: str | None = None) -> CheckpointMeta:
    """Every check of models/admission.py, in its order; nothing is allocated from header values before
    they agree with the tensors. `where` names the file in messages (default: its path)."""
    where = where or str(path)
    header, data_start, size = read_header(path, where)
    raw, tensors = tensor_table(header, data_start, size, where)
    meta = parse_metadata(raw, where, tensors)
    check_against_backbone(meta.backbone, tensors, where)
    return meta


def read_metadata(path: str | os.PathLike, where: str | None = None) -> CheckpointMeta:
    """The metadata of an admitted checkpoint (see `admit`)."""
    return admit(path, where)


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


def load_checkpoint(path: str | os.PathLike,
                    where: str | None = None) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    where = where or str(path)
    meta = admit(path, where)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types; admission should have caught it
        raise CheckpointError(f"{where}: cannot read tensors: {e}") from None
    check_finite(tensors, where)
    return tensors, meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", where: str | None = None):
    """Rebuild the model a checkpoint describes; `admit` has proved names, shapes and dtypes match. A
    half-precision file is converted to the model's float32 here, explicitly."""
    from models.backbone import SeqRecModel

    state, meta = load_checkpoint(path, where)
    model = SeqRecModel(meta.backbone)
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model.to(device).eval(), meta


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
