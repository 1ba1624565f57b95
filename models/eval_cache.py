"""Evaluations remembered by what decides them: (checkpoint sha256, dataset fingerprint, split, protocol),
plus the cutoffs and the negative-sampling seed. Scoring an ingredient on a large dataset takes minutes,
and the same ingredients are scored again by every merge that uses them.

One small JSON file per key in the cache directory, written atomically; a file that cannot be read or
does not hold its own key is ignored and overwritten."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

FORMAT = "recmerge-evaluation/1"


def default_dir() -> Path:
    from models.download import cache_dir

    return cache_dir() / "evaluations"


class EvaluationCache:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.hits = self.misses = 0

    @staticmethod
    def key(checkpoint_sha256: str, fingerprint: str, split: str, protocol: str, ks: Sequence[int],
            seed: int) -> dict:
        return {"format": FORMAT, "checkpoint_sha256": checkpoint_sha256, "dataset_fingerprint": fingerprint,
                "split": split, "protocol": protocol, "ks": [int(k) for k in ks], "seed": int(seed)}

    def _path(self, key: dict) -> Path:
        return self.dir / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest() + ".json")

    def get(self, key: dict) -> dict[str, float] | None:
        try:
            doc = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("key") != key or not isinstance(doc.get("metrics"), dict):
            return None
        return doc["metrics"]

    def put(self, key: dict, metrics: dict[str, float]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "metrics": metrics}, sort_keys=True))
        os.replace(tmp, path)

    def evaluate(self, checkpoint_sha256: str, fingerprint: str, split: str, protocols: Sequence[str],
                 compute: Callable[[Sequence[str]], dict[str, dict[str, float]]], ks: Sequence[int] = (10, 20),
                 seed: int = 0) -> dict[str, dict[str, float]]:
        """{protocol: metrics}: cached protocols are read, the others computed together by
        `compute(missing_protocols)` and stored."""
        keys = {p: self.key(checkpoint_sha256, fingerprint, split, p, ks, seed) for p in protocols}
        out = {p: m for p, k in keys.items() if (m := self.get(k)) is not None}
        missing = [p for p in protocols if p not in out]
        self.hits += len(out)
        if missing:
            self.misses += len(missing)
            fresh = compute(missing)
            for p in missing:
                self.put(keys[p], fresh[p])
                out[p] = fresh[p]
        return {p: out[p] for p in protocols}
