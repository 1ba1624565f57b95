"""`recmerge plot` draws the thesis's threshold figures from real training logs, and refuses bad input."""

import json

import pytest

from app.cli import main
from models.train import TrainConfig, train
from tests.synthetic import make_planted_dataset

TINY = dict(hidden=16, layers=1, heads=1, inner=32, max_len=12, batch_size=64, epochs=3, patience=0)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plot")
    ds = make_planted_dataset(tmp, n_users=60, n_items=20, max_len=12)
    learn = train(ds, TrainConfig(recipe="ehrec-learn", **TINY), tmp / "learn.safetensors").log_path
    cl = train(ds, TrainConfig(recipe="cl4srec", **TINY), tmp / "cl.safetensors").log_path
    return learn, cl


def test_all_figures_from_two_logs(logs, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["plot", str(logs[0]), str(logs[1]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(p.rsplit("/", 1)[-1] for p in printed) == ["k_learn.png", "k_stat.png", "similarity.png"]
    for name in ("k_stat.png", "k_learn.png", "similarity.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000


def test_one_figure_and_missing_data(logs, tmp_path, capsys):
    assert main(["plot", str(logs[1]), "--out", str(tmp_path), "--figure", "k-stat"]) == 0
    assert (tmp_path / "k_stat.png").exists() and not (tmp_path / "similarity.png").exists()
    # A cl4srec log has no learned thresholds: asking for that figure is an error, not an empty plot.
    assert main(["plot", str(logs[1]), "--out", str(tmp_path), "--figure", "k-learn"]) == 2
    err = capsys.readouterr().err
    assert "no k_learn_mean in these logs" in err and "Traceback" not in err


def test_bad_logs_are_refused_with_the_file_named(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"summary": {}}))
    assert main(["plot", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}: not a training log" in capsys.readouterr().err
    bad.write_text("{not json")
    assert main(["plot", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}: not JSON" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")]) == 2
    assert "none.json: no such file" in capsys.readouterr().err
    plain = tmp_path / "plain.log.json"  # a bert4rec log: epochs but nothing contrastive to draw
    plain.write_text(json.dumps({"epochs": [{"epoch": 1, "loss": 3.0}]}))
    assert main(["plot", str(plain), "--out", str(tmp_path / "o")]) == 2
    assert "nothing to draw" in capsys.readouterr().err
