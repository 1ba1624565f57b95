"""`recmerge merge` on tiny checkpoints: results equal the library's, options and files are passed
through, errors are one line with no traceback and no output, and the dataset-backed paths (greedy-soup,
--evaluate, --finetune-epochs) run against a small planted dataset."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from app.cli import main
from merging.merge import build_method, merge_state_dicts
from models.checkpoint import file_sha256, load_checkpoint, read_metadata
from models.config import BackboneConfig
from tests.merging.factory import make_checkpoint, make_merge_inputs
from tests.synthetic import make_planted_dataset


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def files(tmp_path):
    ckpts, fishers, base = make_merge_inputs(tmp_path, 2, base_seed=9)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return ckpts, fishers, base, out_dir


def test_weighted_merge_from_the_command_line_equals_the_library(files, capsys):
    ckpts, _, _, out_dir = files
    out = out_dir / "m.safetensors"
    rc, stdout, err = run_cli(capsys, "merge", "--method", "weighted", *ckpts, "--weights", "1", "3", "--out", out)
    assert rc == 0, err
    assert f"{out}: weighted merge of 2 checkpoints, sha256 {file_sha256(out)}" in stdout
    got, meta = load_checkpoint(out)
    expected = merge_state_dicts(build_method("weighted", 2, None, [1, 3]), [load_checkpoint(c)[0] for c in ckpts])
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert meta.merge["weights"] == [1.0, 3.0]


def test_fisher_and_ties_options_reach_the_method(files, capsys):
    ckpts, fishers, base, out_dir = files
    out = out_dir / "f.safetensors"
    rc, stdout, err = run_cli(capsys, "merge", "--method", "fisher", *ckpts, "--fisher", *fishers,
                              "--option", "normalize=true", "--option", "epsilon=1e-9", "--out", out)
    assert rc == 0, err
    assert "read back" not in stdout  # each Fisher names its checkpoint's digest: the header was final at once
    assert read_metadata(out).merge["options"] == {"normalize": True, "epsilon": 1e-9}
    out = out_dir / "t.safetensors"
    rc, stdout, err = run_cli(capsys, "merge", "--method", "ties", *ckpts, "--base", base, "--option",
                              "density=0.5", "--option", "alpha=0.5", "--out", out)
    assert rc == 0, err
    size = os.path.getsize(out)
    assert f"output read back once to hash it ({size / 1e6:.1f} MB)" in stdout  # the digests were not known
    m = read_metadata(out).merge
    assert m["options"] == {"alpha": 0.5, "density": 0.5} and m["base"] == file_sha256(base)


@pytest.mark.parametrize("extra, message", [
    (["--method", "soup"], "unknown merge method 'soup'; known: uniform, weighted, fisher, greedy-soup, "
                           "task-arithmetic, ties, dare"),
    (["--method", "ties", "--option", "density"], "--option 'density': expected KEY=VALUE"),
    (["--method", "ties", "--option", "density=2"], "option 'density': Input should be less than or equal to 1"),
    (["--method", "uniform", "--weights", "1", "2"], "uniform: takes no per-model weights"),
    (["--method", "weighted", "--weights", "-1", "2"], "model 1 option 'weight'"),
    (["--method", "uniform", "--evaluate"], "--evaluate needs --data"),
    (["--method", "task-arithmetic"], "needs a base checkpoint"),
])
def test_errors_are_one_line_without_traceback_or_output(files, capsys, extra, message):
    ckpts, _, _, out_dir = files
    rc, _, err = run_cli(capsys, "merge", *ckpts, *extra, "--out", out_dir / "m.safetensors")
    assert rc == 2
    assert err.startswith("recmerge merge: error: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert os.listdir(out_dir) == []


def test_incompatible_checkpoints_are_refused(files, capsys, tmp_path):
    ckpts, _, _, out_dir = files
    other = tmp_path / "other.safetensors"
    make_checkpoint(other, 3, fingerprint="ee" * 32)
    rc, _, err = run_cli(capsys, "merge", "--method", "uniform", ckpts[0], other, "--out", out_dir / "m.safetensors")
    assert rc == 2 and "dataset_fingerprint eeee" in err
    assert os.listdir(out_dir) == []


# ---- with a dataset -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_merge")
    ds = make_planted_dataset(tmp, n_users=60, n_items=30, seed=3)
    cfg = BackboneConfig(n_items=ds.n_items, hidden=16, layers=1, heads=2, inner=32, max_len=12)
    ckpts = [tmp / f"p{i}.safetensors" for i in range(3)]
    for i, c in enumerate(ckpts):
        make_checkpoint(c, seed=i, cfg=cfg, fingerprint=ds.fingerprint)
    return ds, ckpts, tmp


def test_greedy_soup_with_evaluation_prints_the_merge_beside_its_ingredients(planted, capsys, tmp_path):
    from models.evaluate import evaluate, load_for_dataset

    ds, ckpts, _ = planted
    out = tmp_path / "soup.safetensors"
    rc, stdout, err = run_cli(capsys, "merge", "--method", "greedy-soup", *ckpts, "--data", ds.path, "--evaluate",
                              "--out", out)
    assert rc == 0, err
    sel = read_metadata(out).merge["selection"]
    for i, c in enumerate(ckpts):  # the ranking score is each ingredient's validation NDCG@10
        model, _ = load_for_dataset(c, ds)
        assert sel["individual"][i] == pytest.approx(evaluate(model, ds, "valid", ("full",))["full"]["ndcg@10"])
    assert "greedy-soup kept" in stdout
    table = stdout[stdout.index("model "):].splitlines()
    assert [line.split()[0] for line in table[1:5]] == [c.name for c in ckpts] + ["merged"]
    assert table[5].startswith("(0 of 8 evaluations reused from ")
    assert table[6] == f"{tmp_path / 'soup.md'}: model card"
    assert len(table[1].split()) == 6  # name + valid ndcg/hr + test ndcg/hr/mrr


def test_merge_then_finetune_keeps_the_raw_merge_and_its_provenance(planted, capsys, tmp_path):
    ds, ckpts, _ = planted
    out = tmp_path / "ft.safetensors"
    rc, _, err = run_cli(capsys, "merge", "--method", "uniform", *ckpts[:2], "--data", ds.path,
                         "--finetune-epochs", "1", "--out", out)
    assert rc == 0, err
    raw = tmp_path / "ft.raw.safetensors"
    meta = read_metadata(out)
    assert meta.merge["method"] == "uniform"
    assert meta.merge["finetune"] == {"recipe": "bert4rec", "epochs": 1, "from_sha256": file_sha256(raw)}
    with safe_open(str(out), "pt") as f, safe_open(str(raw), "pt") as g:
        assert not torch.equal(f.get_tensor("head.weight"), g.get_tensor("head.weight"))  # it trained
    assert json.loads(meta.extra["train"])["epochs_run"] == 1


def test_fisher_merge_estimates_missing_fishers_and_keeps_them(planted, capsys, tmp_path):
    from merging.merge import merge_checkpoints

    ds, ckpts, _ = planted
    out = tmp_path / "fm.safetensors"
    rc, stdout, err = run_cli(capsys, "merge", "--method", "fisher", *ckpts[:2], "--data", ds.path,
                              "--fisher-setting", "sampling=target", "--option", "normalize=true", "--out", out)
    assert rc == 0, err
    assert f"sha256 {file_sha256(out)}" in stdout and "read back" not in stdout
    fishers = [tmp_path / "fm.fisher1.safetensors", tmp_path / "fm.fisher2.safetensors"]
    merge = read_metadata(out).merge
    assert [f["sampling"] for f in merge["fishers"]] == ["target", "target"]
    assert [f["checkpoint_sha256"] for f in merge["fishers"]] == [file_sha256(c) for c in ckpts[:2]]
    again = merge_checkpoints("fisher", ckpts[:2], tmp_path / "again.safetensors", fishers=fishers,
                              options={"normalize": True}, config=merge["config"])
    assert again.sha256 == file_sha256(out)


def test_incompatible_checkpoints_are_refused_before_fishers_are_estimated(planted, capsys, tmp_path):
    ds, ckpts, _ = planted
    wide = tmp_path / "wide.safetensors"
    make_checkpoint(wide, 5, cfg=BackboneConfig(n_items=ds.n_items, hidden=32, layers=1, heads=2, inner=32,
                                                max_len=12), fingerprint=ds.fingerprint)
    rc, _, err = run_cli(capsys, "merge", "--method", "fisher", ckpts[0], wide, "--data", ds.path,
                         "--fisher-setting", "sampling=target", "--out", tmp_path / "fm.safetensors")
    assert rc == 2 and "backbone hidden=32" in err
    assert sorted(os.listdir(tmp_path)) == ["wide.safetensors"]  # no Fisher was estimated


def test_a_dataset_the_checkpoints_were_not_trained_on_is_refused(planted, capsys, files):
    ds, _, _ = planted
    ckpts, _, _, out_dir = files  # these carry another fingerprint
    rc, _, err = run_cli(capsys, "merge", "--method", "uniform", *ckpts, "--data", ds.path, "--evaluate",
                         "--out", out_dir / "m.safetensors")
    assert rc == 2 and "trained on dataset fingerprint" in err
    assert os.listdir(out_dir) == []


def test_fisher_fallback_is_explained(planted, capsys, tmp_path):
    ds, ckpts, _ = planted
    rc, stdout, err = run_cli(capsys, "merge", "--method", "fisher", *ckpts[:2], "--data", ds.path,
                              "--fisher-setting", "sampling=target", "--out", tmp_path / "fm.safetensors")
    assert rc == 0, err
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if "fell back to the weighted average" in line)
    assert "no ingredient's Fisher says anything about them" in lines[head]
    # The padding row of the item table can never get a gradient, so it always falls back (16 = hidden).
    assert "  item_emb.weight row 0: 16 entries: the padding token, which never receives a gradient" in lines


def test_default_fisher_settings_are_sampled_on_a_subsample_and_said(planted, capsys, tmp_path, monkeypatch):
    import merging.fisher

    ds, ckpts, _ = planted
    monkeypatch.setitem(merging.fisher.MERGE_DEFAULTS, "max_users", 40)  # the planted dataset has 60 users
    rc, stdout, err = run_cli(capsys, "merge", "--method", "fisher", *ckpts[:2], "--data", ds.path,
                              "--out", tmp_path / "fm.safetensors")
    assert rc == 0, err
    assert ("fisher: estimating 2 Fishers with sampling=topk, n=10, computation=per-example, max_users=40 "
            "(defaults): 40 of 60 users (a seeded subsample, seed 0; --fisher-setting max_users=all for every "
            "user)") in stdout
    fishers = read_metadata(tmp_path / "fm.safetensors").merge["fishers"]
    assert [(f["sampling"], f["n"], f["examples"]) for f in fishers] == [("topk", "10", "40")] * 2
    # Each estimate drew a bar on stderr, even though stderr is not a terminal here.
    assert "fisher 1/2" in err and "fisher 2/2" in err and "40/40" in err


def test_a_given_sampling_drops_the_default_n_and_all_users_can_be_asked_for(planted, capsys, tmp_path):
    ds, ckpts, _ = planted
    rc, stdout, err = run_cli(capsys, "merge", "--method", "fisher", *ckpts[:2], "--data", ds.path,
                              "--fisher-setting", "sampling=exact", "--fisher-setting", "max_users=all",
                              "--out", tmp_path / "fm.safetensors")
    assert rc == 0, err
    assert "with sampling=exact, computation=per-example (defaults, overridden by --fisher-setting): 60 of 60 " \
           "users\n" in stdout


def test_evaluations_are_cached_by_checkpoint_dataset_split_and_protocol(planted, capsys, tmp_path, monkeypatch):
    import models.evaluate

    ds, ckpts, _ = planted
    calls = []
    real = models.evaluate.evaluate
    monkeypatch.setattr(models.evaluate, "evaluate", lambda *a, **k: calls.append(k["split"]) or real(*a, **k))
    args = ["merge", "--method", "uniform", *ckpts[:2], "--data", ds.path, "--evaluate"]
    rc, first, err = run_cli(capsys, *args, "--out", tmp_path / "a.safetensors")
    assert rc == 0, err
    assert len(calls) == 6 and "(0 of 6 evaluations reused from " in first
    # The same merge again (same bytes under another name): nothing is scored again, the table is the same.
    rc, second, err = run_cli(capsys, *args, "--out", tmp_path / "b.safetensors")
    assert rc == 0, err
    assert len(calls) == 6 and "(6 of 6 evaluations reused from " in second
    table = [line for line in first.splitlines() if line.startswith(("model", "p0", "p1", "merged"))]
    assert table and table == [line for line in second.splitlines() if line.startswith(("model", "p0", "p1", "merged"))]
    # Another merge: only its own two scores are new; --no-eval-cache scores everything.
    rc, third, _ = run_cli(capsys, *args[:3], ckpts[0], ckpts[2], *args[5:], "--out", tmp_path / "c.safetensors")
    assert len(calls) == 10 and "(2 of 6 evaluations reused" in third
    run_cli(capsys, *args, "--no-eval-cache", "--out", tmp_path / "d.safetensors")
    assert len(calls) == 16


def test_recmerge_fisher_draws_a_progress_bar_also_into_a_log(planted, capsys, tmp_path):
    ds, ckpts, _ = planted
    rc, stdout, err = run_cli(capsys, "fisher", ckpts[0], "--data", ds.path, "--sampling", "topk", "--n", "5",
                              "--batch-size", "16", "--out", tmp_path / "f.safetensors")
    assert rc == 0, err
    assert "fisher topk: 100%" in err and "60/60" in err and "seq/s" in err
    assert "Fisher over 60 sequences" in stdout
