"""`recmerge train`: with --init the backbone comes from the checkpoint unless a flag says otherwise;
--resume continues a run; the shipped design is what a plain call trains."""

import json

import pytest

from app.cli import main
from models.checkpoint import read_metadata
from tests.synthetic import make_planted_dataset


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_planted_dataset(tmp_path_factory.mktemp("cli_train"), n_users=60, n_items=30, seed=3)


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_init_takes_the_checkpoints_shape_unless_a_flag_is_given(ds, tmp_path, capsys):
    base = tmp_path / "base.safetensors"
    rc, _, err = run(capsys, "train", "--data", ds.path, "--backbone", "sasrec", "--max-len", 9, "--hidden", 16,
                     "--norm", "post", "--head", "true", "--epochs", 1, "--out", base)
    assert rc == 0, err
    tuned = tmp_path / "tuned.safetensors"
    rc, _, err = run(capsys, "train", "--data", ds.path, "--init", base, "--epochs", 1, "--dropout", 0.3,
                     "--out", tuned)
    assert rc == 0, err
    got, want = read_metadata(tuned).backbone, read_metadata(base).backbone
    assert (got.kind, got.max_len, got.hidden, got.norm, got.head) == ("sasrec", 9, 16, "post", True)
    assert got.dropout == 0.3 and want.dropout == 0.2  # the one flag given explicitly wins
    rc, _, err = run(capsys, "train", "--data", ds.path, "--init", base, "--epochs", 1, "--hidden", 32,
                     "--out", tmp_path / "x.safetensors")
    assert rc == 2 and "hidden: checkpoint 16 vs requested 32" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_plain_train_ships_the_pre_ln_design_and_resume_finishes_a_run(ds, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    argv = ["train", "--data", ds.path, "--backbone", "sasrec", "--max-len", 9, "--hidden", 16, "--epochs", 2,
            "--out", out]
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    bb = read_metadata(out).backbone
    # sasrec's shipped design (models/train.py DESIGN): the original SASRec block, positions from the start
    assert (bb.norm, bb.positions, bb.head, bb.activation, bb.inner, bb.heads) == ("sasrec", "start", False, "relu",
                                                                                  64, 1)
    first = json.loads(stdout.strip().splitlines()[-1])
    state = out.with_name("m.state.safetensors")
    assert state.exists()
    rc, stdout, err = run(capsys, *argv, "--resume")  # the state says finished: same model, no training
    assert rc == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["sha256"] == first["sha256"]
    rc, _, err = run(capsys, *argv[:-2], "--lr", 0.01, "--out", out, "--resume")
    assert rc == 2 and "belongs to another run" in err


def test_positions_from_the_start_are_recorded_inherited_and_checked(ds, tmp_path, capsys):
    base = tmp_path / "start.safetensors"
    rc, _, err = run(capsys, "train", "--data", ds.path, "--backbone", "sasrec", "--max-len", 9, "--hidden", 16,
                     "--positions", "start", "--epochs", 1, "--out", base)
    assert rc == 0, err
    assert read_metadata(base).backbone.positions == "start"
    tuned = tmp_path / "tuned.safetensors"
    rc, _, err = run(capsys, "train", "--data", ds.path, "--init", base, "--epochs", 1, "--out", tuned)
    assert rc == 0, err
    assert read_metadata(tuned).backbone.positions == "start"  # a fine-tune keeps its base's positions
    bad = tmp_path / "bad.safetensors"
    rc, _, err = run(capsys, "train", "--data", ds.path, "--backbone", "sasrec", "--positions", "sideways",
                     "--epochs", 1, "--out", bad)
    assert rc == 2 and "positions" in err and "sideways" in err
    assert not bad.exists()
