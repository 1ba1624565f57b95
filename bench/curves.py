"""Validation NDCG@10 against training minutes, one line per run, from trainer logs (*.log.json, written
beside every checkpoint) or zoo curves (*.curve.json): a PNG plus the numbers as a Markdown table.

    .venv/bin/python bench/curves.py --out docs/results/curves-ml-1m \
        "sasrec (now)=zoo/ml-1m/sasrec-base.curve.json" "bert4rec (before)=docs/results/curves/old.json"
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def points(path: Path) -> list[tuple[float, float]]:
    raw = json.loads(path.read_text())
    if isinstance(raw, dict):  # a trainer log
        return [(e["minutes"], e["valid_ndcg@10"]) for e in raw["epochs"] if "valid_ndcg@10" in e]
    return [(float(m), float(v)) for m, v in raw]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=PATH")
    ap.add_argument("--out", required=True, help="output stem: writes STEM.png and STEM.md")
    ap.add_argument("--title", default="ml-1m: validation NDCG@10 (full ranking) against training time")
    args = ap.parse_args()
    runs = {}
    for spec in args.runs:
        label, _, path = spec.partition("=")
        runs[label] = points(Path(path))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, pts in runs.items():
        ax.plot([m for m, _ in pts], [v for _, v in pts], marker=".", label=label)
    ax.set_xlabel("training minutes (wall clock, validation included)")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(args.out)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    lines = [f"# {args.title}", "", f"![curves]({out.with_suffix('.png').name})", "",
             f"Command: `.venv/bin/python bench/curves.py --out {args.out} --title {shlex.quote(args.title)} "
             + " ".join(shlex.quote(s) for s in args.runs) + "`", ""]
    for label, pts in runs.items():
        lines += [f"## {label}", "", "| minutes | valid NDCG@10 |", "|---|---|"]
        lines += [f"| {m:.1f} | {v:.4f} |" for m, v in pts]
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
