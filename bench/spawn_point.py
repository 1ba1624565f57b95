"""Write a checkpoint from a training run's resumable state, e.g. a copy taken after epoch 100 of 140:
the point several later runs ("children") start from, so that they share the first part of one run and
merge as fine-tunes of one base.

    .venv/bin/python bench/spawn_point.py --state trunk/e100.state.safetensors \
        --like zoo/ml-1m-sas/sasrec-base.safetensors --out spawn-e100.safetensors

`--like` names a checkpoint of the same model shape, recipe and dataset, whose metadata the new file takes
(plus `spawn`: the state's epoch and step); the weights must fit its model exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.backbone import SeqRecModel  # noqa: E402
from models.checkpoint import CheckpointMeta, read_metadata, save_checkpoint  # noqa: E402
from models.errors import CheckpointError  # noqa: E402
from models.train_state import weights_of  # noqa: E402


def spawn_point(state: Path, like: Path, out: Path) -> dict:
    weights, info = weights_of(state)
    meta = read_metadata(like)
    try:
        SeqRecModel(meta.backbone).load_state_dict(weights)  # strict: every name and shape
    except RuntimeError as e:
        raise CheckpointError(f"{state}: its weights do not fit {like}'s model ({e})") from None
    spawn = {"state": state.name, "epoch": info["epoch"], "step": info["step"],
             "valid_ndcg@10": info["history"][-1].get("valid_ndcg@10") if info["history"] else None}
    save_checkpoint(out, weights, CheckpointMeta(
        backbone=meta.backbone, recipe=meta.recipe, dataset_fingerprint=meta.dataset_fingerprint,
        n_items=meta.n_items, extra={"spawn": json.dumps(spawn, sort_keys=True)}))
    return spawn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--state", type=Path, required=True, help="a run's .state.safetensors (or a copy of one)")
    ap.add_argument("--like", type=Path, required=True, help="a checkpoint of the same model, recipe and dataset")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    try:
        print(json.dumps(spawn_point(args.state, args.like, args.out)))
    except CheckpointError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
