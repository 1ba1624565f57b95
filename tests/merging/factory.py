"""Tiny checkpoints and Fisher files for merge tests, written the way the project writes them."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save_file

from merging.fisher_norm import FIELD as SQ_NORM
from merging.fisher_norm import with_sq_norm
from models.backbone import SeqRecModel
from models.checkpoint import CheckpointMeta, file_sha256, save_checkpoint
from models.config import BackboneConfig

CFG = BackboneConfig(n_items=30, hidden=8, layers=1, heads=2, inner=16, max_len=10)
FINGERPRINT = "ab" * 32


def tiny_state(seed: int, cfg: BackboneConfig = CFG) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = SeqRecModel(cfg).state_dict()
    # Fresh LayerNorms and biases are identical across seeds; perturb so every tensor differs.
    return {k: v + 0.05 * torch.randn(v.shape) for k, v in state.items()}


def meta(cfg: BackboneConfig = CFG, fingerprint: str = FINGERPRINT, recipe: dict | None = None,
         extra: dict | None = None) -> CheckpointMeta:
    return CheckpointMeta(backbone=cfg, recipe=recipe or {"name": "bert4rec"}, dataset_fingerprint=fingerprint,
                          n_items=cfg.n_items, extra=extra or {})


def make_checkpoint(path, seed: int, cfg: BackboneConfig = CFG, fingerprint: str = FINGERPRINT,
                    recipe: dict | None = None, state: dict | None = None, extra: dict | None = None) -> str:
    state = tiny_state(seed, cfg) if state is None else state
    return save_checkpoint(path, state, meta(cfg, fingerprint, recipe, extra))


def write_raw(path, state: dict[str, torch.Tensor], m: CheckpointMeta | None = None) -> None:
    """Bypasses save_checkpoint's own checks, for inputs the merge must refuse (NaN, odd tensors)."""
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=(m or meta()).to_header())


def write_scrambled(path, state: dict[str, torch.Tensor], m: CheckpointMeta | None = None) -> None:
    """A valid safetensors file of float32 tensors laid out unlike ours (reverse name order), so reading it in
    our tensor order does not go front to back."""
    header, data = {"__metadata__": (m or meta()).to_header()}, b""
    for name in sorted(state, reverse=True):
        raw = state[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        shape, at = list(state[name].shape), len(data)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + len(raw)]}
        data += raw
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def make_fisher(path, checkpoint, seed: int, fisher: dict | None = None, fingerprint: str = FINGERPRINT,
                sha256: str | None = None, sq_norm: str | bool = True) -> dict[str, torch.Tensor]:
    """`sq_norm`: True writes the field as estimate_fisher does, False leaves it out (a Fisher written before
    the field existed), a string is written as it is (a tampered file)."""
    from safetensors import safe_open

    if fisher is None:
        g = torch.Generator().manual_seed(1000 + seed)
        with safe_open(str(checkpoint), "pt") as f:
            fisher = {k: torch.rand(f.get_slice(k).get_shape(), generator=g) for k in f.keys()}
    head = {"checkpoint_sha256": sha256 or file_sha256(checkpoint), "dataset_fingerprint": fingerprint,
            "sampling": "exact"}
    if sq_norm is True:
        head = with_sq_norm(head, fisher)
    elif sq_norm is not False:
        head[SQ_NORM] = sq_norm
    save_file(fisher, str(path), metadata=head)
    return fisher


def make_merge_inputs(directory, n: int, base_seed: int, extra: dict | None = None, sq_norm: bool = True):
    """n checkpoints (seeds 0..n-1) with their Fishers and a base checkpoint, written into `directory`."""
    ckpts = [directory / f"c{i}.safetensors" for i in range(n)]
    for i, p in enumerate(ckpts):
        make_checkpoint(p, seed=i, extra={k: v.format(i=i) for k, v in (extra or {}).items()})
    fishers = [directory / f"f{i}.safetensors" for i in range(n)]
    for i, (f, c) in enumerate(zip(fishers, ckpts)):
        make_fisher(f, c, seed=i, sq_norm=sq_norm)
    base = directory / "base.safetensors"
    make_checkpoint(base, seed=base_seed)
    return ckpts, fishers, base


def merge_world(tmp_path, n: int, base_seed: int | None = None) -> dict:
    """n checkpoints (seeds 0..n-1) in tmp_path/in, an empty tmp_path/out, their state dicts, and a base
    checkpoint (and its state) when base_seed is given: what a method's oracle tests start from."""
    from models.checkpoint import load_checkpoint

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    ckpts = [src / f"c{i}.safetensors" for i in range(n)]
    for i, p in enumerate(ckpts):
        make_checkpoint(p, seed=i)
    world = {"ckpts": ckpts, "out": out, "states": [load_checkpoint(p)[0] for p in ckpts]}
    if base_seed is not None:
        world["base"] = src / "base.safetensors"
        make_checkpoint(world["base"], seed=base_seed)
        world["base_state"] = load_checkpoint(world["base"])[0]
    return world
