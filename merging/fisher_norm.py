"""The squared global L2 norm of a Fisher, ‖F‖² = Σ over all its tensors and entries of F², defined once.

`normalize` in the `fisher` merge divides each Fisher by ‖F‖, and the streamed merge must equal the in-memory
one bit for bit, so every way of getting ‖F‖² has to give the same float64: from the tensors in memory when
a Fisher is written (stored in its metadata as `sq_norm`, so a merge need not read the file twice), in the
in-memory merge, and from the file block by block for Fishers written before the field existed.

The definition: each tensor, flattened, is cut into blocks of NORM_BLOCK entries (its last block padded with
zeros). A block's partial sum is its entries squared in float64 (exact for float32 and narrower) and added
up by one fixed pairwise tree, entry i + entry i + w for w = NORM_BLOCK/2, ..., 1. That tree is made of
elementwise float64 adds only, so a partial depends on nothing but the block: not on how many blocks are
computed at once, how a file was cut into reads, SIMD width or thread count (torch's own sum reductions
order their adds by vector width). ‖F‖² is math.fsum of all partials, which is correctly rounded and so the
same in any order: sorted names for a dict, the file's layout order for a file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from models.errors import CheckpointError

FIELD = "sq_norm"  # Fisher metadata: repr(float) of ‖F‖², read back with float()
NORM_BLOCK = 1 << 14  # entries per partial sum; part of the definition, never a tuning knob
_STEP = 64 * NORM_BLOCK  # entries converted to float64 at once (8 MB): bounds the temporaries, not the result


def _block_sums(x: torch.Tensor) -> list[float]:
    """Partial sums of squares of a float64 buffer of whole blocks, which this overwrites."""
    x = x.view(-1, NORM_BLOCK)
    x.mul_(x)
    w = NORM_BLOCK
    while w > 1:
        w //= 2
        x[:, :w].add_(x[:, w:2 * w])
    return x[:, 0].tolist()


class SquaredNorm:
    """‖F‖² accumulated tensor by tensor: `add` each tensor's entries in their flattened order (in pieces of
    any size), `end_tensor` after each tensor, `value` at the end."""

    def __init__(self):
        self._partials: list[float] = []
        self._buf = torch.empty(_STEP + NORM_BLOCK, dtype=torch.float64)  # reused: fresh 8 MB buffers page-fault
        self._carry = 0  # entries of the current tensor's unfinished block, at the start of _buf

    def add(self, values: torch.Tensor) -> None:
        flat = values.detach().reshape(-1)
        for s in range(0, flat.numel(), _STEP):
            piece = flat[s:s + _STEP]
            n = self._carry + piece.numel()
            self._buf[self._carry:n].copy_(piece)
            full = n - n % NORM_BLOCK
            if full:
                self._partials += _block_sums(self._buf[:full])
                self._buf[:n - full].copy_(self._buf[full:n])
            self._carry = n - full

    def end_tensor(self) -> None:
        if self._carry:
            self._buf[self._carry:NORM_BLOCK].zero_()
            self._partials += _block_sums(self._buf[:NORM_BLOCK])
            self._carry = 0

    @property
    def value(self) -> float:
        if self._carry:
            raise RuntimeError("SquaredNorm: value asked for in the middle of a tensor (end_tensor first)")
        try:
            return math.fsum(self._partials)
        except OverflowError:  # finite partials whose sum exceeds float64
            return math.inf


def sq_norm_of_tensors(tensors: Mapping[str, torch.Tensor]) -> float:
    acc = SquaredNorm()
    for name in sorted(tensors):
        acc.add(tensors[name])
        acc.end_tensor()
    return acc.value


def with_sq_norm(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """A Fisher's metadata with its `sq_norm`. A Fisher with NaN or Inf entries gets none: the merge then reads
    the file for its norm, as for a file written before the field, and refuses it naming the bad tensor."""
    value = sq_norm_of_tensors(tensors)
    return dict(metadata) | ({FIELD: repr(value)} if math.isfinite(value) else {})


def stored_sq_norm(metadata: Mapping[str, str], path) -> float | None:
    """The `sq_norm` a Fisher file carries, validated; None when it has none (written before the field)."""
    raw = metadata.get(FIELD)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise CheckpointError(f"{path}: Fisher metadata {FIELD}={raw!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise CheckpointError(f"{path}: Fisher metadata {FIELD}={raw!r} must be a finite number >= 0")
    return value
