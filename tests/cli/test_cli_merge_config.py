"""`recmerge merge --config`: a mergekit-style document (YAML or JSON) does what the flags do, every merged
file records the config that made it, running that record again gives the same bytes, and an invalid
config is refused field by field before anything is written."""

import json
import os
from pathlib import Path

import pytest
import yaml

from app.cli import main
from merging.config import parse_config
from models.checkpoint import read_metadata
from models.config import BackboneConfig
from tests.merging.factory import make_checkpoint
from tests.synthetic import make_planted_dataset

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_config")
    ds = make_planted_dataset(tmp, n_users=50, n_items=25, seed=4)
    cfg = BackboneConfig(n_items=ds.n_items, hidden=16, layers=1, heads=2, inner=32, max_len=12)
    ckpts = [tmp / f"m{i}.safetensors" for i in range(3)]
    for i, c in enumerate(ckpts):
        make_checkpoint(c, seed=10 + i, cfg=cfg, fingerprint=ds.fingerprint)
    return ds, ckpts


def test_a_yaml_config_merges_and_the_recorded_config_reproduces_the_file_byte_for_byte(planted, capsys, tmp_path):
    ds, ckpts = planted
    doc = {"merge_method": "fisher",
           "models": [{"model": str(ckpts[0]), "parameters": {"weight": 2}}, {"model": str(ckpts[1])}],
           "parameters": {"normalize": True},
           "fisher": {"sampling": "topk", "n": 3, "max_users": 30},
           "dataset": str(ds.path)}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(doc))
    first = tmp_path / "a.safetensors"
    rc, out, err = run_cli(capsys, "merge", "--config", path, "--out", first)
    assert rc == 0, err
    assert "max_users=30 (defaults, overridden by the config)" in out
    recorded = read_metadata(first).merge["config"]
    assert recorded == {
        "merge_method": "fisher", "base_model": None, "dataset": str(ds.path),
        "models": [{"model": str(ckpts[0]), "parameters": {"weight": 2.0}},
                   {"model": str(ckpts[1]), "parameters": {"weight": 1.0}}],
        "parameters": {"normalize": True, "epsilon": 0.0},
        "fisher": {"sampling": "topk", "n": 3, "computation": "per-example", "batch_size": 64, "seed": 0,
                   "max_users": 30}}
    # Again from the checkpoint itself, and from its record written out as a file: the same bytes.
    second = tmp_path / "b.safetensors"
    rc, _, err = run_cli(capsys, "merge", "--config", first, "--out", second)
    assert rc == 0, err
    assert second.read_bytes() == first.read_bytes()
    as_file = tmp_path / "recorded.json"
    as_file.write_text(json.dumps(recorded))
    third = tmp_path / "c.safetensors"
    rc, _, err = run_cli(capsys, "merge", "--config", as_file, "--out", third)
    assert rc == 0, err
    assert third.read_bytes() == first.read_bytes()
    card = (tmp_path / "a.md").read_text()
    assert "# a.safetensors" in card and "Merged with `fisher` from:" in card
    assert f"recmerge merge --config {first} --out a.safetensors" in card


def test_flags_record_the_same_config_a_file_would(planted, capsys, tmp_path):
    ds, ckpts = planted
    by_flags = tmp_path / "flags.safetensors"
    rc, _, err = run_cli(capsys, "merge", "--method", "ties", ckpts[1], ckpts[2], "--base", ckpts[0],
                         "--weights", "1", "0.5", "--option", "density=0.5", "--out", by_flags)
    assert rc == 0, err
    recorded = read_metadata(by_flags).merge["config"]
    assert recorded["parameters"] == {"alpha": 1.0, "density": 0.5} and recorded["base_model"] == str(ckpts[0])
    again = tmp_path / "again.safetensors"
    rc, _, err = run_cli(capsys, "merge", "--config", by_flags, "--out", again)
    assert rc == 0, err
    assert again.read_bytes() == by_flags.read_bytes()
    assert (tmp_path / "flags.md").is_file() and (tmp_path / "again.md").is_file()


def test_an_invalid_config_gets_field_errors_and_nothing_is_written(planted, capsys, tmp_path):
    ds, ckpts = planted
    doc = {"merge_method": "fisher",
           "models": [{"model": str(ckpts[0]), "parameters": {"weight": -1}},
                      {"model": str(tmp_path / "missing.safetensors"), "parameters": {"wieght": 1}}],
           "parameters": {"normalize": "maybe"},
           "fisher": {"sampling": "topk"},
           "base_model": str(ckpts[2])}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, out, err = run_cli(capsys, "merge", "--config", path, "--out", out_dir / "m.safetensors")
    assert rc == 2 and out == ""
    assert err.startswith(f"recmerge merge: error: {path}: ") and len(err.strip().splitlines()) == 1
    for fragment in ["parameters.normalize: Input should be a valid boolean",
                     "models.0.parameters.weight: Input should be greater than or equal to 0",
                     "models.1.parameters.wieght: unknown field",
                     f"models.1.model: {tmp_path / 'missing.safetensors'}: no such file",
                     "base_model: fisher does not use a base model",
                     "fisher: n is required with sampling='topk'"]:
        assert fragment in err
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("text, fragment", [
    ("merge_method: [", "not YAML or JSON"),
    ("- a list", "expected a mapping"),
    ("merge_method: soup\nmodels: [{model: x}]", "merge_method: unknown method 'soup'; known: uniform"),
    ("merge_method: uniform\nmodels: []\nextra: 1", "models: List should have at least 1 item"),
    ("merge_method: uniform\nmodels: [{model: x}]\nextra: 1", "extra: unknown field"),
])
def test_malformed_documents_are_one_line_errors(capsys, tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    rc, _, err = run_cli(capsys, "merge", "--config", path, "--out", tmp_path / "m.safetensors")
    assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]


def test_config_and_merge_flags_do_not_mix(planted, capsys, tmp_path):
    _, ckpts = planted
    path = tmp_path / "c.yaml"
    path.write_text(f"merge_method: uniform\nmodels: [{{model: {ckpts[0]}}}]\n")
    rc, _, err = run_cli(capsys, "merge", ckpts[1], "--config", path, "--method", "uniform",
                         "--out", tmp_path / "m.safetensors")
    assert rc == 2 and "--config replaces CKPT, --method" in err


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.iterdir()))
def test_the_documented_examples_are_valid_configs(example):
    from merging.config import load_document

    cfg = parse_config(load_document((EXAMPLES / example).read_text()), example)
    assert cfg.record()["merge_method"] == cfg.merge_method
