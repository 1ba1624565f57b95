"""recmerge plot's checkpoint figures: the merge plane (fig. 4.5) and top-50 probabilities (fig. 4.6)."""

import pytest

from app.cli import main
from merging.fisher import estimate_fisher
from merging.merge import merge_checkpoints
from models.train import TrainConfig, train
from tests.synthetic import make_planted_dataset

TINY = dict(hidden=16, layers=1, heads=2, inner=32, max_len=12, batch_size=32, epochs=1, patience=0)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    d = tmp_path_factory.mktemp("fig")
    ds = make_planted_dataset(d / "data", n_users=60, n_items=20)
    paths = [train(ds, TrainConfig(seed=s, **TINY), d / f"m{s}.safetensors").checkpoint for s in range(3)]
    fishers = [estimate_fisher(p, ds, {"sampling": "target"}, out=d / f"f{i}.safetensors").path
               for i, p in enumerate(paths)]
    merged = merge_checkpoints("uniform", paths, d / "merged.safetensors").path
    return ds, [str(p) for p in paths], [str(f) for f in fishers], str(merged)


def test_merge_plane_and_top_probs_are_drawn(three, tmp_path, capsys):
    ds, models, fishers, merged = three
    out = tmp_path / "figs"
    rc = main(["plot", "--out", str(out), "--models", *models, "--merged", merged, "--fishers", *fishers,
               "--data", str(ds.path), "--samples", "20"])
    assert rc == 0
    for name in ("merge_plane.png", "top_probs.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert capsys.readouterr().out.split() == [str(out / "merge_plane.png"), str(out / "top_probs.png")]


def test_merge_plane_needs_three_models_and_matching_fishers(three, tmp_path, capsys):
    ds, models, fishers, merged = three
    assert main(["plot", "--out", str(tmp_path), "--figure", "merge-plane", "--models", *models[:2]]) == 2
    assert "exactly 3 --models" in capsys.readouterr().err
    assert main(["plot", "--out", str(tmp_path), "--figure", "merge-plane", "--models", *models,
                 "--fishers", fishers[0]]) == 2
    assert "one --fishers file per model" in capsys.readouterr().err
    assert main(["plot", "--out", str(tmp_path), "--figure", "top-probs", "--models", models[0]]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
