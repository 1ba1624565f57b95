"""Side by side: the same Fisher merge by this checkout's engine and another checkout's, alternating.

On a shared machine whose speed drifts by 20-30% within an hour, two merge_memory.py runs minutes
apart cannot show a 10% change. Here the inputs are written once, both engines merge them in turn
(a fresh process each time, the inputs' page cache set the same way before each: `--cache warm` reads
them first, `cold` evicts them), and the medians are compared. Make the other checkout with
`git worktree add /tmp/old <commit>`.

    .venv/bin/python bench/merge_ab.py --other /tmp/old --rounds 5 [--cache warm|cold|both]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_memory  # noqa: E402  (the input writer and the page-cache warmer)

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
from merging.merge import merge_checkpoints
spec = json.load(open(sys.argv[1]))
t, c = time.perf_counter(), time.process_time()
merge_checkpoints("fisher", spec["ckpts"], sys.argv[2], fishers=spec["fishers"], options={"normalize": True})
print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c}))
"""


def merge_once(repo: Path, spec_path: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(spec_path), str(out)], cwd=repo, check=True,
                         env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True)
    out.unlink(missing_ok=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", type=Path, required=True, help="another checkout of recmerge (e.g. a git worktree)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--workdir", help="where the inputs go (default: the system temp dir)")
    ap.add_argument("--cache", choices=["warm", "cold", "both"], default="warm",
                    help="page cache of the inputs before each merge (both: a warm and a cold merge per round)")
    args = ap.parse_args()
    if not (args.other / "merging" / "merge.py").is_file():
        raise SystemExit(f"{args.other}: not a recmerge checkout (no merging/merge.py)")
    work = Path(tempfile.mkdtemp(prefix="merge_ab.", dir=args.workdir))
    try:
        spec = merge_memory.write_inputs(work, args.items, args.hidden, True)
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        inputs = spec["ckpts"] + spec["fishers"]
        gb = sum(os.path.getsize(p) for p in inputs) / 1e9
        caches = ["warm", "cold"] if args.cache == "both" else [args.cache]
        runs: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.rounds):
            for cache in caches:
                for name, repo in (("other", args.other), ("this", REPO)):
                    (merge_memory.warm if cache == "warm" else merge_memory.evict)(inputs)
                    d = merge_once(repo, spec_path, work / "out.safetensors")
                    runs.setdefault((cache, name), []).append(d)
                    print(f"round {r + 1} {cache} {name}: {d['wall']:.2f} s wall, {d['cpu']:.2f} s CPU, "
                          f"{gb / d['wall']:.2f} GB/s", flush=True)
        med = {k: (statistics.median(x["wall"] for x in v), statistics.median(x["cpu"] for x in v))
               for k, v in runs.items()}
        for cache in caches:
            print(f"\n{gb:.2f} GB of input, {args.rounds} rounds, {cache} page cache, medians:")
            for k in ("other", "this"):
                w, c = med[(cache, k)]
                print(f"  {k:5} {w:.2f} s wall ({gb / w:.2f} GB/s), {c:.2f} s CPU")
            (wo, co), (wt, ct) = med[(cache, "other")], med[(cache, "this")]
            print(f"  this / other: {wo / wt:.2f}x faster by wall time, {co / ct:.2f}x by CPU time")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
