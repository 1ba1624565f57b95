"""The thesis figures as PNG files, for `recmerge plot` and the dashboard.

From training logs, one function per figure listed in FIGURES; each takes the loaded logs and the output
directory and returns the file it wrote, or raises NoData when none of the logs holds what it draws:
- k-stat:     SimThres k_stat per epoch, one line per log (thesis fig. 4.1)
- k-learn:    mean ± std of the learned thresholds k_learn per epoch, beside the k_stat in use
- similarity: histograms of in-batch view similarities at a few epochs, k_stat marked (thesis fig. 4.2)
From checkpoints: the merge plane (thesis fig. 4.5) and the sorted top-50 next-item probabilities of a
few sequences (thesis fig. 4.6).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

# torch and numpy are imported where a figure needs them: the CLI imports this module at every start.
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


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def fig_k_stat(logs: list[Log], out: Path) -> Path:
    drawn = [(log, *log.series("k_stat")) for log in logs]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        raise NoData("no k_stat in these logs (only contrastive recipes log it)")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for log, x, y in drawn:
        ax.plot(x, y, marker="o", label=log.label)
    ax.set(xlabel="epoch", ylabel="k_stat (q-quantile of in-batch similarity)", title="SimThres k_stat per epoch")
    ax.legend()
    return save(fig, out / "k_stat.png")


def fig_k_learn(logs: list[Log], out: Path) -> Path:
    drawn = [log for log in logs if log.series("k_learn_mean")[0]]
    if not drawn:
        raise NoData("no k_learn_mean in these logs (only ehrec-learn logs it)")
    plt = pyplot()
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
    return save(fig, out / "k_learn.png")


def fig_similarity(logs: list[Log], out: Path, per_log: int = 4) -> Path:
    drawn = [(log, [e for e in log.epochs if isinstance(e.get("similarity_histogram"), dict)]) for log in logs]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        raise NoData("no similarity_histogram in these logs (only contrastive recipes log it)")
    plt = pyplot()
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
    return save(fig, out / "similarity.png")


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


FIGURES: dict[str, Callable[[list[Log], Path], Path]] = {
    "k-stat": fig_k_stat,
    "k-learn": fig_k_learn,
    "similarity": fig_similarity,
}


def _label(path: str) -> str:
    return Path(path).name.removesuffix(".safetensors")


def fig_merge_plane(models: list[str], merged: str | None, fishers: list[str], out: Path, samples: int = 100,
                    damping: float = 1.0, seed: int = 0) -> Path:
    """The three ingredients span a plane; the merged model and samples of each ingredient's Laplace
    posterior are projected onto it."""
    import numpy as np
    import torch

    from merging.fisher import load_fisher
    from merging.geometry import Plane, flatten, laplace_samples
    from models.checkpoint import load_checkpoint

    if len(models) != 3:
        raise RecmergeError(f"merge-plane needs exactly 3 --models (got {len(models)})")
    if fishers and len(fishers) != 3:
        raise RecmergeError(f"merge-plane needs one --fishers file per model (got {len(fishers)} for 3)")
    states = [load_checkpoint(p)[0] for p in models]
    names = sorted(states[0])
    for p, s in zip(models[1:], states[1:]):
        if sorted(s) != names or any(s[n].shape != states[0][n].shape for n in names):
            raise RecmergeError(f"{p}: tensor names or shapes differ from {models[0]}")
    thetas = [flatten(s, names) for s in states]
    try:
        plane = Plane(*thetas)
    except ValueError as e:
        raise RecmergeError(f"merge-plane: {e}") from None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    gen = torch.Generator().manual_seed(seed)
    for k, (path, theta) in enumerate(zip(models, thetas)):
        color = f"C{k}"
        if fishers:
            tensors, head = load_fisher(fishers[k])
            if sorted(tensors) != names:
                raise RecmergeError(f"{fishers[k]}: tensor names differ from {path}")
            f = flatten(tensors, names)
            pts = np.array([plane.coords(x) for x in laplace_samples(theta, f, samples, float(head["examples"]),
                                                                      damping, gen)])
            ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.3, color=color)
        x, y = plane.coords(theta)
        ax.scatter([x], [y], s=80, marker="o", color=color, edgecolor="black", label=_label(path), zorder=3)
    if merged:
        m = flatten(load_checkpoint(merged)[0], names)
        x, y = plane.coords(m)
        ax.scatter([x], [y], s=160, marker="*", color="black", label=f"merged: {_label(merged)}", zorder=4)
    ax.set(xlabel="along model 2 − model 1", ylabel="orthogonal, towards model 3",
           title="Models on the plane of three ingredients" + (" with N(θ, F⁻¹) samples" if fishers else ""))
    ax.legend(fontsize=8)
    return save(fig, out / "merge_plane.png")


def fig_top_probs(models: list[str], data: str, out: Path, sequences: int = 10, top: int = 50,
                  seed: int = 0) -> Path:
    """Sorted top-`top` next-item probabilities of `sequences` seeded test users, one panel per model."""
    import numpy as np
    import torch

    from models.batching import pad_left
    from models.data import PreparedDataset
    from models.evaluate import load_for_dataset

    ds = PreparedDataset.load(data)
    users = np.sort(np.random.default_rng(seed).choice(ds.n_users, size=min(sequences, ds.n_users),
                                                       replace=False))
    hist = pad_left([ds.split(int(u), "test")[0] for u in users])
    plt = pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False, sharey=True)
    for ax, path in zip(axes[0], models):
        model, _ = load_for_dataset(path, ds)
        with torch.inference_mode():
            p = torch.softmax(model.eval().next_item_scores(hist), dim=-1)
        k = min(top, p.shape[1])
        for row in p.topk(k, dim=-1).values:
            ax.plot(np.arange(1, k + 1), row.numpy(), alpha=0.7)
        ax.set(title=_label(path), xlabel="rank", yscale="log")
    axes[0][0].set_ylabel("p(next item)")
    fig.suptitle(f"Top-{top} next-item probabilities of {len(users)} test sequences")
    return save(fig, out / "top_probs.png")
