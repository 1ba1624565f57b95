"""A training run's resumable state: one safetensors file beside the output, rewritten after every epoch.

It holds everything the next epoch depends on — the weights, the optimiser's moments and step counts,
the recipe's own parameters and carried statistics, the torch and numpy random states, the best epoch so
far and the history — so a resumed run continues exactly where the interrupted one stopped (on CPU, bit
for bit). Tensors only, plus JSON metadata: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.errors import CheckpointError

FORMAT = "recmerge-train-state-1"


def state_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".state.safetensors")


def save_state(path: Path, *, model: torch.nn.Module, extra_params: list[torch.Tensor],
               opt: torch.optim.Optimizer, best_state: dict[str, torch.Tensor] | None, info: dict,
               rng: np.random.Generator) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model/{k}"] = v.detach().cpu().contiguous()
    for i, p in enumerate(extra_params):
        tensors[f"recipe/{i}"] = p.detach().cpu().contiguous()
    for k, v in (best_state or {}).items():
        tensors[f"best/{k}"] = v.contiguous()
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"opt/{i}/{k}"] = v.detach().cpu().reshape(-1).contiguous() if k == "step" else \
                v.detach().cpu().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {"format": FORMAT, "info": json.dumps(info), "numpy_rng": json.dumps(rng.bit_generator.state),
            "lrs": json.dumps([g["lr"] for g in opt.param_groups])}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # an interruption mid-write leaves the previous epoch's state intact


def _read(path: Path, wanted) -> tuple[dict, dict[str, torch.Tensor]]:
    """A training state's metadata and those of its tensors whose name `wanted` accepts, after checking that
    the file is one: a single reader so both entry points refuse the same files with the same words."""
    try:
        with safe_open(str(path), framework="pt") as f:  # one open for the tensors and the metadata
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a recmerge training state (format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys() if wanted(k)}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable training state ({e})") from None
    return meta, tensors


def _under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors named `prefix`…, by the rest of their names."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_state(path: Path, *, model: torch.nn.Module, extra_params: list[torch.Tensor],
               opt: torch.optim.Optimizer, rng: np.random.Generator) -> tuple[dict, dict | None]:
    """Restore into the given objects; returns (info, best_state)."""
    meta, tensors = _read(path, lambda k: True)
    own = _under(tensors, "model/")
    try:
        model.load_state_dict(own)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the saved weights do not fit this run's model ({e})") from None
    with torch.no_grad():
        for i, p in enumerate(extra_params):
            p.copy_(tensors[f"recipe/{i}"])
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = _under(tensors, f"opt/{i}/")
        if st:
            if "step" in st:
                st["step"] = st["step"].reshape(())
            opt.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in st.items()}
    for g, lr in zip(opt.param_groups, json.loads(meta["lrs"])):
        g["lr"] = lr
    torch.set_rng_state(tensors["rng/torch"])
    rng.bit_generator.state = json.loads(meta["numpy_rng"])
    best = _under(tensors, "best/") or None
    return json.loads(meta["info"]), best


def weights_of(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The model weights a training state holds after its last finished epoch, and its info (epoch, step,
    history ...): a point of a run that later runs can start from. The optimiser's moments are not read."""
    meta, tensors = _read(path, lambda k: k.startswith("model/"))  # the rest is never read off disk
    weights = _under(tensors, "model/")
    if not weights:
        raise CheckpointError(f"{path}: the training state holds no model weights")
    return weights, json.loads(meta["info"])
