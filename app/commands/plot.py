"""`recmerge plot [LOG.json ...] --out DIR [--figure NAME] [--models CKPT ...]`: figures as PNG.

One function per figure, listed in FIGURES; each takes the loaded logs and the output directory and
returns the file it wrote, or raises NoData when none of the logs holds what it draws.
- k-stat:     SimThres k_stat per epoch, one line per log (thesis fig. 4.1)
- k-learn:    mean ± std of the learned thresholds k_learn per epoch, beside the k_stat in use
- similarity: histograms of in-batch view similarities at a few epochs, k_stat marked (thesis fig. 4.2)
Figures from checkpoints (app/model_figures.py):
- merge-plane: three --models, the --merged model and samples of N(θ, F⁻¹) from --fishers (thesis fig. 4.5)
- top-probs:   sorted top-50 next-item probabilities of ten test sequences per --models (thesis fig. 4.6)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from models.errors import RecmergeError


class NoData(RecmergeError):
    pass


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.label = path.name.removesuffix(".json").removesuffix(".log")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise RecmergeError(f"{path}: no such file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RecmergeError(f"{path}: not JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("epochs"), list):
            raise RecmergeError(f"{path}: not a training log (no 'epochs' list)")
        self.epochs: list[dict] = [e for e in data["epochs"] if isinstance(e, dict)]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        rows = [e for e in self.epochs if isinstance(e.get(key), int | float)]
        return [e.get("epoch", i + 1) for i, e in enumerate(rows)], [float(e[key]) for e in rows]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def fig_k_stat(logs: list[Log], out: Path) -> Path:
    drawn = [(log, *log.series("k_stat")) for log in logs]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        raise NoData("no k_stat in these logs (only contrastive recipes log it)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for log, x, y in drawn:
        ax.plot(x, y, marker="o", label=log.label)
    ax.set(xlabel="epoch", ylabel="k_stat (q-quantile of in-batch similarity)", title="SimThres k_stat per epoch")
    ax.legend()
    return _save(fig, out / "k_stat.png")


def fig_k_learn(logs: list[Log], out: Path) -> Path:
    drawn = [log for log in logs if log.series("k_learn_mean")[0]]
    if not drawn:
        raise NoData("no k_learn_mean in these logs (only ehrec-learn logs it)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for log in drawn:
        x, mean = log.series("k_learn_mean")
        _, std = log.series("k_learn_std")  # logged together with the mean
        (line,) = ax.plot(x, mean, marker="o", label=f"{log.label} k_learn")
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.25)
        # g is regularised towards the threshold in use during the epoch (the previous epoch's k_stat).
        kx, ky = log.series("k_threshold")
        if kx:
            ax.plot(kx, ky, linestyle="--", color=line.get_color(), label=f"{log.label} k_stat in use")
    ax.set(xlabel="epoch", ylabel="threshold", title="learned threshold k_learn (mean ± std) per epoch")
    ax.legend()
    return _save(fig, out / "k_learn.png")


def fig_similarity(logs: list[Log], out: Path, per_log: int = 4) -> Path:
    drawn = [(log, [e for e in log.epochs if isinstance(e.get("similarity_histogram"), dict)]) for log in logs]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        raise NoData("no similarity_histogram in these logs (only contrastive recipes log it)")
    plt = _pyplot()
    fig, axes = plt.subplots(len(drawn), 1, figsize=(6, 3.2 * len(drawn)), squeeze=False)
    for ax, (log, rows) in zip(axes[:, 0], drawn):
        # A few epochs spread over the run: the first, the last and evenly spaced ones between.
        picks = sorted({round(i * (len(rows) - 1) / max(per_log - 1, 1)) for i in range(per_log)})
        for i in picks:
            e = rows[i]
            hist = e["similarity_histogram"]
            edges, counts = hist["edges"], hist["counts"]
            total = sum(counts) or 1
            patch = ax.stairs([c / total for c in counts], edges, label=f"epoch {e.get('epoch', i + 1)}")
            if isinstance(e.get("k_stat"), float):
                ax.axvline(e["k_stat"], color=patch.get_edgecolor(), linestyle=":", linewidth=1)
        ax.set(xlabel="similarity of in-batch negative pairs (dotted: k_stat)", ylabel="share of pairs",
               title=log.label)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, out / "similarity.png")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


FIGURES: dict[str, Callable[[list[Log], Path], Path]] = {
    "k-stat": fig_k_stat,
    "k-learn": fig_k_learn,
    "similarity": fig_similarity,
}


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
    from app.model_figures import fig_merge_plane, fig_top_probs

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
