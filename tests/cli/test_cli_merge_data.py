"""`recmerge merge` with the methods that choose their coefficients on the dataset (weight-search, regmean,
adamerging): the CLI builds their score / Gram / objective functions from --data (core/merge_inputs.py),
as flags or as a config, and refuses bad options before anything is written."""

import os

import pytest
import yaml

from core.merge_inputs import merge_inputs
from merging.merge import merge_checkpoints
from models.checkpoint import load_checkpoint, read_metadata
from models.config import BackboneConfig
from tests.cli.test_cli_merge import run_cli
from tests.merging.factory import make_checkpoint
from tests.synthetic import make_planted_dataset


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_merge_data")
    ds = make_planted_dataset(tmp, n_users=40, n_items=30, seed=3)
    cfg = BackboneConfig(n_items=ds.n_items, hidden=16, layers=1, heads=2, inner=32, max_len=12)
    ckpts = [tmp / f"p{i}.safetensors" for i in range(3)]
    for i, c in enumerate(ckpts):
        make_checkpoint(c, seed=i, cfg=cfg, fingerprint=ds.fingerprint)
    return ds, cfg, ckpts


def test_weight_search_from_flags_scores_every_candidate_on_validation(planted, capsys, tmp_path):
    ds, cfg, ckpts = planted
    out = tmp_path / "ws.safetensors"
    rc, stdout, err = run_cli(capsys, "merge", "--method", "weight-search", *ckpts[:2], "--data", ds.path,
                              "--option", "grid=5", "--out", out)
    assert rc == 0, err
    search = read_metadata(out).merge["search"]
    assert [c["coefficients"][0] for c in search["candidates"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # The scores are the library's own run with the dataset's validation score: the same candidates, values.
    lib = merge_checkpoints("weight-search", ckpts[:2], tmp_path / "lib.safetensors", options={"grid": 5},
                            **merge_inputs("weight-search", {"grid": 5}, ds, cfg))
    assert search["candidates"] == lib.fitted["candidates"]
    assert max(c["score"] for c in search["candidates"]) == search["score"]
    assert "weight-search: 5 candidates scored" in stdout
    assert read_metadata(out).merge["config"]["dataset"] == str(ds.path)
    a, _ = load_checkpoint(out)
    b, _ = load_checkpoint(lib.path)
    assert all((a[k] == b[k]).all() for k in a)


def test_weight_search_from_a_config_with_a_base(planted, capsys, tmp_path):
    ds, _, ckpts = planted
    config = tmp_path / "ws.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": "weight-search", "models": [{"model": str(c)} for c in ckpts[:2]],
        "base_model": str(ckpts[2]), "dataset": str(ds.path),
        "parameters": {"combine": "task-vectors", "grid": 3, "low": -0.5, "high": 1.0, "rounds": 1}}))
    out = tmp_path / "cfg.safetensors"
    rc, _, err = run_cli(capsys, "merge", "--config", config, "--out", out)
    assert rc == 0, err
    merge = read_metadata(out).merge
    assert merge["options"] == {"combine": "task-vectors", "grid": 3, "low": -0.5, "high": 1.0, "rounds": 1}
    assert {v for c in merge["search"]["candidates"] for v in c["coefficients"]} <= {-0.5, 0.25, 1.0, 0.5}


def test_weight_search_over_fisher_weights_estimates_the_fishers_it_needs(planted, capsys, tmp_path):
    ds, _, ckpts = planted
    out = tmp_path / "wf.safetensors"
    rc, stdout, err = run_cli(capsys, "merge", "--method", "weight-search", *ckpts[:2], "--data", ds.path,
                              "--option", "combine=fisher", "--option", "grid=3", "--fisher-setting", "sampling=topk",
                              "--fisher-setting", "n=3", "--out", out)
    assert rc == 0, err
    assert "fisher: estimating 2 Fishers with sampling=topk, n=3" in stdout
    merge = read_metadata(out).merge
    assert [f["sampling"] for f in merge["fishers"]] == ["topk", "topk"]
    assert merge["config"]["fisher"]["n"] == 3 and merge["options"]["combine"] == "fisher"
    assert [c["coefficients"][0] for c in merge["search"]["candidates"]] == [0.0, 0.5, 1.0]
    # The same search over the Fisher files just written, given as files: the same scores.
    fishers = [tmp_path / f"wf.fisher{i}.safetensors" for i in (1, 2)]
    again = tmp_path / "again.safetensors"
    rc, _, err = run_cli(capsys, "merge", "--method", "weight-search", *ckpts[:2], "--data", ds.path, "--fisher",
                         *fishers, "--option", "combine=fisher", "--option", "grid=3", "--out", again)
    assert rc == 0, err
    assert read_metadata(again).merge["search"] == merge["search"]


def test_regmean_from_flags_equals_the_library_with_the_datasets_grams(planted, capsys, tmp_path):
    ds, cfg, ckpts = planted
    out = tmp_path / "rm.safetensors"
    rc, _, err = run_cli(capsys, "merge", "--method", "regmean", *ckpts, "--data", ds.path, "--option", "users=15",
                         "--option", "alpha=0.8", "--out", out)
    assert rc == 0, err
    opts = {"users": 15, "alpha": 0.8}
    lib = merge_checkpoints("regmean", ckpts, tmp_path / "lib.safetensors", options=opts,
                            **merge_inputs("regmean", opts, ds, cfg))
    a, _ = load_checkpoint(out)
    b, _ = load_checkpoint(lib.path)
    assert all((a[k] == b[k]).all() for k in a)
    merge = read_metadata(out).merge
    assert merge["options"] == {"alpha": 0.8, "ridge": 1e-6, "users": 15, "seed": 0}
    assert "blocks.0.ffn.fc1.weight" in merge["solved"]
    uniform = merge_checkpoints("uniform", ckpts, tmp_path / "u.safetensors")
    u, _ = load_checkpoint(uniform.path)
    assert not (a["blocks.0.ffn.fc1.weight"] == u["blocks.0.ffn.fc1.weight"]).all()
    assert (a["out_bias"] == u["out_bias"]).all()  # not a linear weight: the plain average


@pytest.mark.parametrize("objective", ["cross-entropy", "entropy"])
def test_adamerging_from_flags_equals_the_library_with_the_datasets_objective(planted, capsys, tmp_path, objective):
    ds, cfg, ckpts = planted
    out = tmp_path / "ada.safetensors"
    rc, _, err = run_cli(capsys, "merge", "--method", "adamerging", *ckpts[:2], "--base", ckpts[2], "--data",
                         ds.path, "--option", "steps=3", "--option", "users=12", "--option", f"objective={objective}",
                         "--option", "granularity=block", "--out", out)
    assert rc == 0, err
    opts = {"steps": 3, "users": 12, "objective": objective, "granularity": "block"}
    lib = merge_checkpoints("adamerging", ckpts[:2], tmp_path / "lib.safetensors", base=ckpts[2], options=opts,
                            **merge_inputs("adamerging", opts, ds, cfg))
    learned = read_metadata(out).merge["learned"]
    assert learned == lib.fitted
    a, _ = load_checkpoint(out)
    # One coefficient per model for the one block, and for each top-level module outside it.
    assert len(learned["losses"]) == 3 and set(learned["coefficients"]) == {
        "blocks.0" if k.startswith("blocks.0.") else k.split(".")[0] for k in a}
    assert "blocks.0" in learned["coefficients"] and "item_emb" in learned["coefficients"]
    # Three Adam steps from 0.3 at lr 0.01: every coefficient has moved, each step about lr at most.
    moved = [abs(v - 0.3) for c in learned["coefficients"].values() for v in c]
    assert 0 < min(moved) and max(moved) <= 3 * 0.01 * 1.1
    b, _ = load_checkpoint(lib.path)
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("argv, message", [
    (["--method", "adamerging", "--option", "objective=mse"], "adamerging: option 'objective'"),
    (["--method", "adamerging", "--option", "steps=2"], "needs a base checkpoint"),
    (["--method", "regmean", "--option", "alpha=0"], "regmean: option 'alpha'"),
    (["--method", "regmean", "--option", "users=-3"], "regmean: option 'users'"),
    (["--option", "grid=1"], "weight-search: option 'grid'"),
    (["--fisher-setting", "n=3"], "fisher: weight-search uses no Fisher"),
    (["--option", "combine=median"], "weight-search: option 'combine'"),
    (["--option", "combine=task-vectors"], "needs a base checkpoint"),
    (["--weights", "1", "2"], "takes no per-model weights"),
])
def test_bad_options_are_refused_and_nothing_is_written(planted, capsys, tmp_path, argv, message):
    ds, _, ckpts = planted
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    method = [] if "--method" in argv else ["--method", "weight-search"]
    rc, stdout, err = run_cli(capsys, "merge", *method, *ckpts[:2], "--data", ds.path, *argv,
                              "--out", out_dir / "m.safetensors")
    assert rc == 2 and message in err, err
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("method, argv", [
    ("weight-search", ["--option", "grid=3"]),
    ("regmean", ["--option", "users=10"]),
    ("adamerging", ["--base", "BASE", "--option", "steps=2", "--option", "users=10"]),
])
def test_the_recorded_config_makes_the_same_file_again(planted, capsys, tmp_path, method, argv):
    from models.checkpoint import file_sha256

    ds, _, ckpts = planted
    argv = [str(ckpts[2]) if a == "BASE" else a for a in argv]
    out = tmp_path / "m.safetensors"
    rc, _, err = run_cli(capsys, "merge", "--method", method, *ckpts[:2], "--data", ds.path, *argv, "--out", out)
    assert rc == 0, err
    again = tmp_path / "again.safetensors"
    rc, _, err = run_cli(capsys, "merge", "--config", out, "--out", again)
    assert rc == 0, err
    assert file_sha256(again) == file_sha256(out)
