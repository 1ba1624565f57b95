"""Checkpoint admission: what a file must be before anything is built or allocated from its header.

A checkpoint's header is untrusted until it agrees with the tensor table in the same file, and the tensor
table is untrusted until it agrees with the file's size. So the order is fixed:

1. the raw header: at most MAX_HEADER_BYTES of JSON, at most MAX_TENSORS entries, each entry well formed,
   its byte range exactly the size its dtype and shape give, the ranges tiling the data section with no
   gap, overlap or overhang (what safetensors itself demands, so a later safe_open cannot disagree);
2. the backbone config: every field of the type the dataclass declares, and every integer no larger than
   what the tensors could hold (the largest dimension of a non-empty tensor, or the tensor count: an
   integer field either sizes a dimension or counts modules, and each module holds a tensor);
3. the layer count against the tensor count, measured on 0- and 1-layer models built on the meta device,
   so the full model below costs no more than the file's own tensor table;
4. the full model built on the meta device (no memory behind any tensor), and its state_dict compared
   name by name with the file: every name and shape exactly what the backbone expects, every dtype too,
   except that float32 parameters may be stored as float16 or bfloat16 (the whole file in one of them).

Only then may a caller read tensor data or build a real model. Nothing here depends on the tensor names
the backbone happens to use today: the expectations come from `SeqRecModel` itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from models.config import BackboneConfig
from models.errors import CheckpointError

# A 2-layer model's header is ~4 KB; 1 MiB holds ~10,000 entries, far beyond MAX_TENSORS.
MAX_HEADER_BYTES = 1 << 20
# A layer of the backbone holds 12 tensors, the rest of the model ~20: 1024 tensors is ~80 layers.
# The bound keeps the meta-device build (about a third of a millisecond per tensor) well under a second.
MAX_TENSORS = 1024
MAX_NDIM = 8
MAX_NAME = 300
# Names as they appear in a safetensors header.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Float dtypes a checkpoint may store its float32 parameters in (one per file): half-precision files are
# merged in their own dtype and converted to float32 explicitly when a model is built (load_model).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # offsets relative to the start of the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"key {k!r} appears twice")
        seen[k] = v
    return seen


def read_header(path: str | os.PathLike, where: str | None = None,
                max_header: int = MAX_HEADER_BYTES) -> tuple[dict, int, int]:
    """(header JSON object, data section start, file size) of a file that looks like safetensors.
    Refuses pickles, directories, truncation and headers over `max_header` bytes before parsing."""
    p = Path(path)
    where = where or str(p)
    if p.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{where}: pickled checkpoints ({p.suffix}) are refused; use .safetensors")
    if not p.exists():
        raise CheckpointError(f"{where}: no such file")
    if p.is_dir():
        raise CheckpointError(f"{where}: is a directory, expected a .safetensors file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{where}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or 8 + n > size:
            raise CheckpointError(f"{where}: not a safetensors file (bad header length)")
        if n > max_header:
            raise CheckpointError(f"{where}: safetensors header of {n} bytes is larger than the {max_header} "
                                  "bytes a checkpoint's header may have")
        blob = f.read(n)
    if blob[:1] != b"{":
        raise CheckpointError(f"{where}: not a safetensors file (header is not JSON)")
    try:
        header = json.loads(blob, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{where}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: not a safetensors file (header is not a JSON object)")
    return header, 8 + n, size


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def tensor_table(header: dict, data_start: int, size: int, where: str,
                 max_tensors: int = MAX_TENSORS) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """(metadata, entries by name) from a parsed header, after every check of step 1."""
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{where}: safetensors metadata must map strings to strings")
    n = len(header) - ("__metadata__" in header)
    if n > max_tensors:
        raise CheckpointError(f"{where}: {n} tensors, more than the {max_tensors} a checkpoint may hold")
    entries = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        label = f"{where}: tensor {name[:MAX_NAME]!r}"
        if len(name) > MAX_NAME:
            raise CheckpointError(f"{label}…: name longer than {MAX_NAME} characters")
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{label}: header entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{label}: unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{label}: shape must be a list of at most {MAX_NDIM} non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{label}: data_offsets must be two integers 0 <= begin <= end")
        entry = TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
        nbytes = entry.numel * DTYPES[dtype].itemsize
        if entry.end - entry.start != nbytes:
            raise CheckpointError(f"{label}: data_offsets span {entry.end - entry.start} bytes, but dtype {dtype} "
                                  f"and shape {list(shape)} need {nbytes}")
        entries.append(entry)
    # The data section must be tiled exactly: in order, no gap, no overlap, nothing past the end.
    at, data_len = 0, size - data_start
    for entry in sorted(entries, key=lambda t: (t.start, t.end)):
        if entry.start != at:
            what = "overlaps the tensor before it" if entry.start < at else f"leaves a gap at byte {at}"
            raise CheckpointError(f"{where}: tensor {entry.name!r}: data at bytes {entry.start}..{entry.end} {what}")
        if entry.end > data_len:
            raise CheckpointError(f"{where}: truncated (tensor {entry.name!r} runs past the end of the file)")
        at = entry.end
    if at != data_len:
        raise CheckpointError(f"{where}: {data_len - at} bytes after the last tensor's data")
    return meta, {t.name: t for t in entries}


def _field_types() -> dict[str, object]:
    return typing.get_type_hints(BackboneConfig)


def backbone_from_header(text: str, tensors: dict[str, TensorEntry], where: str) -> BackboneConfig:
    """The backbone config, with every integer bounded by what the tensors could hold (step 2)."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: backbone metadata is not JSON ({str(e)[:80]})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: backbone metadata must be a JSON object")
    types = _field_types()
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise CheckpointError(f"{where}: backbone metadata has unknown fields: {unknown[:5]}")
    dims = [d for t in tensors.values() if t.numel for d in t.shape]
    bound = max([len(tensors), *dims])
    for key, value in raw.items():
        want = types[key]
        if want is int:
            if not _int(value):
                raise CheckpointError(f"{where}: backbone {key}={json.dumps(value)[:40]} is not an integer")
            if not 0 <= value <= bound:
                raise CheckpointError(f"{where}: backbone {key}={value} cannot fit these tensors (no tensor "
                                      f"shape has a dimension above {bound}, nor are there more tensors)")
        elif want is float:
            if not (_int(value) or isinstance(value, float)) or not math.isfinite(value):
                raise CheckpointError(f"{where}: backbone {key}={json.dumps(value)[:40]} is not a finite number")
        elif want is bool:
            if not isinstance(value, bool):
                raise CheckpointError(f"{where}: backbone {key}={json.dumps(value)[:40]} is not true or false")
        elif want is str:
            if not isinstance(value, str) or len(value) > 100:
                raise CheckpointError(f"{where}: backbone {key} must be a short string")
        elif isinstance(value, (dict, list)):  # the other fields are single values; the dataclass checks them
            raise CheckpointError(f"{where}: backbone {key} must be a single value")
    try:
        return BackboneConfig(**raw)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CheckpointError(f"{where}: backbone metadata is invalid: {e}") from None


class _SkipInit(TorchFunctionMode):
    """On the meta device an in-place initialiser has nothing to fill; skipping it (rather than running it
    as a no-op) avoids torch's Python decompositions, which cost more than the rest of the build."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")
        if name.endswith("_") and not name.endswith("__") and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def expected_tensors(cfg: BackboneConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of the model `cfg` describes, from a model built on the meta device."""
    from models.backbone import SeqRecModel

    with torch.device("meta"), _SkipInit():
        model = SeqRecModel(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _check_layer_count(cfg: BackboneConfig, n_tensors: int, where: str) -> None:
    """Step 3: a layer count the file's tensors cannot hold is refused before a model of that depth is built.
    The tensors per layer are measured on 1- and 2-layer models (a config may refuse 0 layers)."""
    layers = getattr(cfg, "layers", None)
    if not layers or layers <= 2:
        return
    n1 = len(expected_tensors(dataclasses.replace(cfg, layers=1)))
    per_layer = len(expected_tensors(dataclasses.replace(cfg, layers=2))) - n1
    needed = n1 + (layers - 1) * per_layer
    if per_layer > 0 and needed > n_tensors:
        raise CheckpointError(f"{where}: backbone layers={layers} needs {needed} tensors, the file has {n_tensors}")


def check_against_backbone(cfg: BackboneConfig, tensors: dict[str, TensorEntry], where: str) -> None:
    """Steps 3 and 4: every tensor name, shape and dtype exactly as the backbone has them."""
    try:
        _check_layer_count(cfg, len(tensors), where)
        expected = expected_tensors(cfg)
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
        raise CheckpointError(f"{where}: the backbone metadata describes no buildable model: {e}") from None
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensor names do not match the backbone (missing {missing[:3]}, "
                              f"unexpected {[u[:60] for u in unexpected[:3]]})")
    stored = set()
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if t.shape != shape:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {t.shape}, the backbone expects {shape}")
        have = DTYPES[t.dtype]
        if dtype == torch.float32 and have in FLOAT_DTYPES:
            stored.add(t.dtype)
        elif have != dtype:
            accepted = "F32, F16 or BF16" if dtype == torch.float32 else DTYPE_NAMES.get(dtype, str(dtype))
            raise CheckpointError(f"{where}: tensor {name!r} has dtype {t.dtype}, the backbone expects {accepted}")
    if len(stored) > 1:
        raise CheckpointError(f"{where}: tensors mix the dtypes {sorted(stored)}; a checkpoint stores one float dtype")
