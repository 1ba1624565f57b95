"""weight-search against brute force on tiny checkpoints: the chosen coefficients are the best of the grid
(two models) or of the whole product grid (a separable score, where coordinate search must reach it), every
candidate's score is the score of that combination computed here directly, and the file is the best one."""

import itertools
import json
import os

import pytest
import torch

from merging.merge import build_method, merge_checkpoints, merge_state_dicts
from merging.methods import MergeOptionsError
from merging.methods.base import FitInputs
from merging.methods.weight_search import grid_values, search
from models.checkpoint import load_checkpoint
from tests.merging.factory import make_fisher, merge_world


@pytest.fixture
def world(tmp_path):
    return merge_world(tmp_path, 3, base_seed=7)


def probe(state) -> torch.Tensor:
    return torch.cat([state["out_bias"], state["blocks.0.ffn.fc1.weight"].reshape(-1)]).double()


def test_two_models_take_the_best_point_of_the_lambda_grid(world):
    a, b = world["states"][:2]
    # A target between the two models, off the grid's points: the best λ is found only by scoring them.
    target = 0.37 * probe(a) + 0.63 * probe(b) + 0.01 * torch.randn(probe(a).shape, dtype=torch.float64)
    calls = []

    def score(sd):
        calls.append(sd)
        return -float(((probe(sd) - target) ** 2).sum())

    out = world["out"] / "m.safetensors"
    res = merge_checkpoints("weight-search", world["ckpts"][:2], out, score=score, options={"grid": 21})
    lams = grid_values(0.0, 1.0, 21)
    brute = [-float(((probe({k: (lam * a[k] + (1 - lam) * b[k]) for k in a}) - target) ** 2).sum())
             for lam in lams]
    best = max(range(21), key=lambda k: brute[k])
    assert len(calls) == 21
    assert [c["coefficients"] for c in res.fitted["candidates"]] == [[lam, 1 - lam] for lam in lams]
    assert [c["score"] for c in res.fitted["candidates"]] == pytest.approx(brute, rel=1e-5)
    assert res.fitted["coefficients"] == [lams[best], 1 - lams[best]]
    assert 0.3 <= lams[best] <= 0.45  # near the planted mix, so the test is not passing on an edge
    recorded = json.loads(res.metadata["merge"])
    assert recorded["search"] == json.loads(json.dumps(res.fitted))  # the file records what the result says
    merged, _ = load_checkpoint(out)
    weighted = merge_state_dicts(build_method("weighted", 2, None, res.fitted["coefficients"]), [a, b])
    for k in merged:
        torch.testing.assert_close(merged[k], weighted[k], rtol=1e-6, atol=1e-7)


def test_task_vector_coordinate_search_reaches_the_product_grid_optimum(world):
    states, base = world["states"], world["base_state"]
    taus = [{k: s[k] - base[k] for k in base} for s in states]
    want = (0.75, 0.0, 0.5)  # points of the 5-point grid over [0, 1]

    def combo(c):
        return {k: base[k] + sum(ci * t[k] for ci, t in zip(c, taus)) for k in base}

    # The coefficients are read back from the merged state by least squares (exact for these combinations),
    # so the score is separable and concave in them: coordinate search must reach the whole grid's best.
    probes = torch.stack([probe(t) for t in taus], dim=1)

    def score(sd):
        c = torch.linalg.lstsq(probes, (probe(sd) - probe(base))[:, None]).solution[:, 0]
        return -float(((c - torch.tensor(want, dtype=torch.float64)) ** 2).sum())

    res = merge_checkpoints("weight-search", world["ckpts"], world["out"] / "m.safetensors", base=world["base"],
                            score=score, options={"combine": "task-vectors", "grid": 5, "rounds": 3})
    grid = grid_values(0.0, 1.0, 5)
    brute = max(itertools.product(grid, repeat=3), key=lambda c: score(combo(c)))
    assert res.fitted["coefficients"] == pytest.approx(list(brute))
    assert res.fitted["score"] == pytest.approx(score(combo(brute)), rel=1e-5, abs=1e-9)
    # Fewer candidates than the product grid, each scored once.
    cands = [tuple(c["coefficients"]) for c in res.fitted["candidates"]]
    assert len(cands) == len(set(cands)) < 5 ** 3
    for c in res.fitted["candidates"][:6]:
        assert c["score"] == pytest.approx(score(combo(c["coefficients"])), rel=1e-5, abs=1e-9)


def test_fisher_combine_scores_each_lambdas_fisher_weighted_average(world):
    a, b = world["states"][:2]
    fishers = []
    for i, c in enumerate(world["ckpts"][:2]):
        gen = torch.Generator().manual_seed(40 + i)
        f = {k: torch.rand(v.shape, generator=gen) for k, v in world["states"][i].items()}
        # Rows no model's Fisher covers (the fallback) and rows only one model's covers.
        f["item_emb.weight"][:3] = 0
        if i == 1:
            f["item_emb.weight"][3:6] = 0
        path = world["out"].parent / f"in/f{i}.safetensors"
        make_fisher(path, c, seed=i, fisher=f)
        fishers.append((path, f))
    target = 0.6 * probe(a) + 0.4 * probe(b) + 0.01

    def score(sd):
        return -float(((probe(sd) - target) ** 2).sum()) - float(sd["item_emb.weight"][:6].abs().sum())

    out = world["out"] / "m.safetensors"
    res = merge_checkpoints("weight-search", world["ckpts"][:2], out, fishers=[p for p, _ in fishers], score=score,
                            options={"combine": "fisher", "grid": 11})
    fd = [f for _, f in fishers]
    for cand in res.fitted["candidates"]:
        ref = merge_state_dicts(build_method("fisher", 2, None, cand["coefficients"]), [a, b], fishers=fd)
        assert cand["score"] == pytest.approx(score(ref), rel=1e-5), cand["coefficients"]
    assert len(res.fitted["candidates"]) == 11
    best = max(res.fitted["candidates"], key=lambda c: c["score"])
    assert res.fitted["coefficients"] == best["coefficients"] and 0 < best["coefficients"][0] < 1
    merged, _ = load_checkpoint(out)
    ref = merge_state_dicts(build_method("fisher", 2, None, best["coefficients"]), [a, b], fishers=fd)
    for k in merged:
        torch.testing.assert_close(merged[k], ref[k], rtol=1e-5, atol=1e-6)
    assert json.loads(res.metadata["merge"])["fishers"][0]["sampling"] == "exact"  # the Fishers are recorded


def test_coordinate_search_stops_after_a_round_without_gain_and_ties_keep_the_earlier():
    seen = []

    def flat(c):
        seen.append(c)
        return 1.0

    best, s, cands = search(3, [0.0, 0.5, 1.0], flat, pair=False, start=(0.2, 0.2, 0.2), rounds=5)
    assert best == (0.2, 0.2, 0.2) and s == 1.0
    assert len(seen) == 1 + 3 * 3  # one round: nothing beat the start, so no second round
    best, _, _ = search(2, [0.0, 0.5, 1.0], lambda c: 1.0, pair=True, start=(0.5, 0.5), rounds=1)
    assert best == (0.0, 1.0)  # the first grid point of equal best scores


def test_an_average_search_skips_the_all_zero_point():
    best, _, cands = search(3, [0.0, 1.0], lambda c: -abs(sum(c) - 1), pair=False, start=(1.0, 0.0, 0.0),
                            rounds=2, average=True)
    assert all(sum(c["coefficients"]) > 0 for c in cands)


def test_progress_is_reported_per_candidate(world):
    seen = []
    merge_checkpoints("weight-search", world["ckpts"][:2], world["out"] / "m.safetensors",
                      score=lambda sd: float(sd["out_bias"].sum()), options={"grid": 7},
                      progress=lambda stage, f: seen.append((stage, f)))
    fractions = [f for stage, f in seen if stage == "weight-search"]
    assert len(fractions) >= 7 and fractions == sorted(fractions) and fractions[-1] == 1.0


def test_in_memory_fit_equals_the_streamed_file(world):
    def score(sd):
        return -float(sd["out_bias"].mean() - 0.01) ** 2

    m = build_method("weight-search", 3, {"grid": 4})
    mem = merge_state_dicts(m, world["states"], inputs=FitInputs(score=score))
    res = merge_checkpoints("weight-search", world["ckpts"], world["out"] / "m.safetensors", score=score,
                            options={"grid": 4}, chunk_bytes=100)
    assert res.fitted["coefficients"] == m.coefficients
    merged, _ = load_checkpoint(res.path)
    assert all(torch.equal(merged[k], mem[k]) for k in mem)


@pytest.mark.parametrize("kw, message", [
    ({"options": {"grid": 1}}, "option 'grid'"),
    ({"options": {"combine": "median"}}, "option 'combine'"),
    ({"options": {"rounds": 0}}, "option 'rounds'"),
    ({"options": {"combine": "task-vectors", "low": 1.0, "high": 0.5}}, r"low \(1.0\) must be below high"),
    ({"options": {"low": -1.0}}, "low and high set the task-vector interval"),
    ({"options": {"bogus": 1}}, "unknown option 'bogus'"),
    ({"weights": [1.0, 2.0]}, "takes no per-model weights"),
    ({"options": {"combine": "task-vectors"}, "base": None}, "needs a base checkpoint"),
    ({"base": "base"}, "does not use a base checkpoint"),
    ({"score": None}, "needs a score function"),
    ({"checkpoints": 1}, "averaging searches between at least two checkpoints"),
    ({"options": {"combine": "fisher"}}, "needs one Fisher file per checkpoint"),
    ({"fishers": "fishers"}, "does not use Fisher files"),
    ({"options": {"combine": "fisher", "low": -1.0}, "fishers": "fishers"}, "low and high set the task-vector"),
    ({"score": lambda sd: float("nan")}, "the score function returned nan"),
])
def test_bad_options_are_refused_and_nothing_is_written(world, kw, message):
    kw = dict(kw)
    kw.setdefault("score", lambda sd: 0.0)
    if kw.get("base") == "base" or kw.get("options", {}).get("combine") == "task-vectors" and "base" not in kw:
        kw["base"] = world["base"]
    ckpts = world["ckpts"][:kw.pop("checkpoints", 2)]
    if kw.get("fishers") == "fishers":
        kw["fishers"] = []
        for i, c in enumerate(ckpts):
            kw["fishers"].append(world["out"].parent / f"in/f{i}.safetensors")
            make_fisher(kw["fishers"][-1], c, seed=i)
    with pytest.raises(MergeOptionsError, match=message):
        merge_checkpoints("weight-search", ckpts, world["out"] / "m.safetensors", **kw)
    assert os.listdir(world["out"]) == []
