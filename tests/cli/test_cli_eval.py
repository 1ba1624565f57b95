"""`recmerge evaluate | recommend | compare` on a tiny random-weight checkpoint and a synthetic dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.cli import main
from models.backbone import SeqRecModel
from models.checkpoint import CheckpointMeta, save_checkpoint
from models.config import BackboneConfig
from tests.synthetic import make_planted_dataset

ROOT = Path(__file__).resolve().parents[2]
PROTOCOLS = ["full", "random100", "popular100", "top-popular100"]
METRICS = ["ndcg@10", "hr@10", "ndcg@20", "hr@20", "mrr"]


def write_checkpoint(path, n_items, fingerprint, seed):
    torch.manual_seed(seed)
    cfg = BackboneConfig(n_items=n_items, hidden=16, layers=1, heads=2, inner=32, max_len=12)
    model = SeqRecModel(cfg)
    save_checkpoint(path, model.state_dict(), CheckpointMeta(cfg, {"name": "bert4rec"}, fingerprint, n_items))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_eval")
    ds = make_planted_dataset(tmp, n_users=60, n_items=30, seed=2)
    a = write_checkpoint(tmp / "a.safetensors", ds.n_items, ds.fingerprint, seed=0)
    b = write_checkpoint(tmp / "b.safetensors", ds.n_items, ds.fingerprint, seed=1)
    return ds, a, b, tmp


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_evaluate_json_has_every_protocol_and_metric(setup, capsys):
    from models.evaluate import evaluate

    ds, a, _, _ = setup
    rc, out, _ = run_cli(capsys, "evaluate", a, "--data", ds.path, "--json", "--representation")
    assert rc == 0
    result = json.loads(out)  # exactly one JSON object on stdout
    assert list(result) == PROTOCOLS + ["representation"]
    for p in PROTOCOLS:
        assert list(result[p]) == METRICS
        assert all(0.0 <= v <= 1.0 for v in result[p].values())
    assert set(result["representation"]) == {"item_uniformity", "seq_uniformity", "seq_alignment"}
    from models.checkpoint import load_model

    model, _ = load_model(a)
    assert {p: result[p] for p in PROTOCOLS} == evaluate(model, ds)  # the CLI is the library


def test_evaluate_options_and_table(setup, capsys):
    ds, a, _, _ = setup
    rc, out, _ = run_cli(capsys, "evaluate", a, "--data", ds.path, "--json", "--split", "valid",
                         "--protocols", "full,random100", "--seed", "3")
    assert rc == 0 and list(json.loads(out)) == ["full", "random100"]
    rc, out, _ = run_cli(capsys, "evaluate", a, "--data", ds.path, "--protocols", "full", "popular100")
    assert rc == 0
    lines = out.splitlines()
    assert lines[1].split() == ["protocol"] + METRICS
    assert lines[2].startswith("full") and lines[3].startswith("popular100")
    rc, _, err = run_cli(capsys, "evaluate", a, "--data", ds.path, "--protocols", "fulll")
    assert rc == 2 and "unknown protocol fulll" in err


def test_non_safetensors_checkpoint_is_a_one_line_error(setup):
    ds, _, _, tmp = setup
    bogus = tmp / "model.safetensors"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a safetensors file")
    proc = subprocess.run([sys.executable, "-m", "app.cli", "evaluate", str(bogus), "--data", str(ds.path),
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "not a safetensors file" in err[0] and str(bogus) in err[0]


def test_checkpoint_of_another_dataset_is_refused(setup, capsys):
    ds, _, _, tmp = setup
    other = write_checkpoint(tmp / "other.safetensors", ds.n_items, "0" * 64, seed=0)
    for argv in (["evaluate", other, "--data", ds.path],
                 ["recommend", other, "--data", ds.path, "--user", ds.user_ids[0]],
                 ["compare", setup[1], other, "--data", ds.path]):
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2 and out == ""
        assert "fingerprint" in err and str(other) in err


def test_recommend_prints_original_ids_outside_the_history(setup, capsys):
    ds, a, _, _ = setup
    user = ds.user_ids[3]
    rc, out, _ = run_cli(capsys, "recommend", a, "--data", ds.path, "--user", user, "--k", "5", "--json")
    assert rc == 0
    rec = json.loads(out)
    items = [r["item"] for r in rec["items"]]
    assert len(items) == 5 and all(i in ds.item_ids for i in items)
    history = {ds.item_ids[i - 1] for i in ds.sequence(3)}
    assert not set(items) & history
    scores = [r["score"] for r in rec["items"]]
    assert scores == sorted(scores, reverse=True)
    rc, out, _ = run_cli(capsys, "recommend", a, "--data", ds.path, "--user", user, "--k", "3")
    assert rc == 0 and len(out.strip().splitlines()) == 2 + 3  # header lines + 3 rows


@pytest.mark.parametrize("argv, message", [
    (["--user", "nobody"], "unknown user"),
    (["--user", "1", "--k", "0"], "k must be"),
    (["--user", "1", "--k", "31"], "k must be"),
])
def test_recommend_bad_input(setup, capsys, argv, message):
    ds, a, _, _ = setup
    rc, out, err = run_cli(capsys, "recommend", a, "--data", ds.path, *argv)
    assert rc == 2 and out == "" and message in err and "Traceback" not in err


def test_compare_reports_error_inconsistency(setup, capsys):
    from models.checkpoint import load_model
    from models.evaluate import per_user_ndcg
    from models.metrics import error_inconsistency

    ds, a, b, _ = setup
    rc, out, _ = run_cli(capsys, "compare", a, a, "--data", ds.path, "--json")
    same = json.loads(out)
    assert rc == 0 and same["error_inconsistency"] == 0.0 and same["ndcg@10"]["a"] == same["ndcg@10"]["b"]
    rc, out, _ = run_cli(capsys, "compare", a, b, "--data", ds.path, "--json")
    res = json.loads(out)
    na, nb = (per_user_ndcg(load_model(p)[0], ds) for p in (a, b))
    assert res["error_inconsistency"] == pytest.approx(error_inconsistency(na, nb))
    assert res["ndcg@10"] == pytest.approx({"a": na.mean(), "b": nb.mean()})
    assert res["users"] == ds.n_users
    rc, out, _ = run_cli(capsys, "compare", a, b, "--data", ds.path)
    assert rc == 0 and "error inconsistency" in out
