"""Figures drawn from checkpoints rather than logs: the merge plane (thesis fig. 4.5) and the sorted
top-50 next-item probabilities of a few sequences (thesis fig. 4.6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.errors import RecmergeError


def _label(path: str) -> str:
    return Path(path).name.removesuffix(".safetensors")


def fig_merge_plane(models: list[str], merged: str | None, fishers: list[str], out: Path, samples: int = 100,
                    damping: float = 1.0, seed: int = 0) -> Path:
    """The three ingredients span a plane; the merged model and samples of each ingredient's Laplace
    posterior are projected onto it."""
    from app.commands.plot import _pyplot, _save
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
    plt = _pyplot()
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
    return _save(fig, out / "merge_plane.png")


def fig_top_probs(models: list[str], data: str, out: Path, sequences: int = 10, top: int = 50,
                  seed: int = 0) -> Path:
    """Sorted top-`top` next-item probabilities of `sequences` seeded test users, one panel per model."""
    from app.commands.plot import _pyplot, _save
    from models.batching import pad_left
    from models.data import PreparedDataset
    from models.evaluate import load_for_dataset

    ds = PreparedDataset.load(data)
    users = np.sort(np.random.default_rng(seed).choice(ds.n_users, size=min(sequences, ds.n_users),
                                                       replace=False))
    hist = pad_left([ds.split(int(u), "test")[0] for u in users])
    plt = _pyplot()
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
    return _save(fig, out / "top_probs.png")
