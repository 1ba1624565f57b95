"""`recmerge plot [LOG.json ...] --out DIR [--figure NAME] [--models CKPT ...]`: figures as PNG.

The figures are drawn by app/plots.py (shared with the dashboard):
- k-stat:     SimThres k_stat per epoch, one line per log (thesis fig. 4.1)
- k-learn:    mean ± std of the learned thresholds k_learn per epoch, beside the k_stat in use
- similarity: histograms of in-batch view similarities at a few epochs, k_stat marked (thesis fig. 4.2)
Figures from checkpoints:
- merge-plane: three --models, the --merged model and samples of N(θ, F⁻¹) from --fishers (thesis fig. 4.5)
- top-probs:   sorted top-50 next-item probabilities of ten test sequences per --models (thesis fig. 4.6)
"""

from __future__ import annotations

from pathlib import Path

from app.plots import FIGURES, Log, NoData
from models.errors import RecmergeError

MODEL_FIGURES = ("merge-plane", "top-probs")


def register(sub) -> None:
    p = sub.add_parser("plot", help="draw figures from training logs (<checkpoint>.log.json) or checkpoints as PNG")
    p.add_argument("logs", nargs="*", metavar="LOG.json", help="training logs written beside checkpoints")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--figure", choices=[*FIGURES, *MODEL_FIGURES, "all"], default="all",
                   help="which figure; 'all' draws every figure the inputs have data for")
    p.add_argument("--models", nargs="+", default=[], metavar="CKPT",
                   help="checkpoints: the 3 ingredients for merge-plane, any for top-probs")
    p.add_argument("--merged", metavar="CKPT", help="merge-plane: the merged model to place on the plane")
    p.add_argument("--fishers", nargs="+", default=[], metavar="F", help="merge-plane: one Fisher per model")
    p.add_argument("--data", help="top-probs: the prepared dataset the models were trained on")
    p.add_argument("--samples", type=int, default=100, help="merge-plane: posterior samples per model")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _model_figure(name: str, args, out: Path) -> Path:
    from app.plots import fig_merge_plane, fig_top_probs

    if not args.models:
        raise NoData("needs --models")
    if name == "merge-plane":
        if len(args.models) != 3 and args.figure == "all":
            raise NoData("needs exactly 3 --models")
        return fig_merge_plane(args.models, args.merged, args.fishers, out, samples=args.samples, seed=args.seed)
    if not args.data:
        raise NoData("needs --data")
    return fig_top_probs(args.models, args.data, out, seed=args.seed)


def run(args) -> int:
    logs = [Log(Path(p)) for p in args.logs]
    if not logs and not args.models:
        raise RecmergeError("give training logs (LOG.json) and/or --models checkpoints to draw from")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RecmergeError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    names = [*FIGURES, *MODEL_FIGURES] if args.figure == "all" else [args.figure]
    written, missing = [], []
    for name in names:
        try:
            if name in FIGURES:
                if not logs:
                    raise NoData("needs training logs")
                written.append(FIGURES[name](logs, out))
            else:
                written.append(_model_figure(name, args, out))
        except NoData as e:
            if args.figure != "all":
                raise
            missing.append(f"{name}: {e}")
    if not written:
        raise RecmergeError("nothing to draw: " + "; ".join(missing))
    for path in written:
        print(path)
    return 0
