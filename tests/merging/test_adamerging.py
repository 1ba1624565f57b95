"""adamerging on tiny checkpoints: with an objective that is a known quadratic in the coefficients (the
distance to a planted merge) Adam reaches the planted optimum, at every granularity, and no point of a
brute-force grid over the same coefficients does better; the file holds the merge at the learnt
coefficients; refusals leave nothing. The dataset objectives of core/merge_inputs.py are checked against
the model's own scores and are differentiable."""

import itertools
import os

import pytest
import torch

from merging.merge import merge_checkpoints
from merging.methods import MergeOptionsError
from merging.methods.adamerging import group_of
from models.checkpoint import load_checkpoint
from tests.merging.factory import merge_world


@pytest.fixture
def world(tmp_path):
    world = merge_world(tmp_path, 2, base_seed=9)
    base_state = world["base_state"]
    return {**world, "taus": [{k: s[k] - base_state[k] for k in base_state} for s in world["states"]]}


def planted(world, lam: dict[str, list[float]], granularity: str):
    base, taus = world["base_state"], world["taus"]
    return {k: base[k] + sum(lam[group_of(k, granularity)][i] * t[k] for i, t in enumerate(taus)) for k in base}


def distance(target):
    def objective(params):
        return sum(((params[k] - target[k]) ** 2).sum() for k in target)

    return objective


@pytest.mark.parametrize("granularity", ["model", "block", "tensor"])
def test_adam_reaches_the_optimum_of_a_quadratic_objective(world, granularity):
    groups = list(dict.fromkeys(group_of(k, granularity) for k in world["base_state"]))
    gen = torch.Generator().manual_seed(len(groups))
    want = {g: [float(v) for v in 0.15 + 0.7 * torch.rand(2, generator=gen)] for g in groups}
    target = planted(world, want, granularity)
    out = world["out"] / "m.safetensors"
    res = merge_checkpoints("adamerging", world["ckpts"], out, base=world["base"], objective=distance(target),
                            options={"granularity": granularity, "steps": 300, "lr": 0.02})
    got = res.fitted["coefficients"]
    assert list(got) == groups
    for g in groups:
        assert got[g] == pytest.approx(want[g], abs=0.02), g
    assert res.fitted["final_loss"] < res.fitted["losses"][0] / 50
    merged, _ = load_checkpoint(out)
    learnt = planted(world, got, granularity)
    for k in merged:
        torch.testing.assert_close(merged[k], learnt[k], rtol=1e-5, atol=1e-6)


def test_no_point_of_a_brute_force_grid_beats_the_learnt_coefficients(world):
    # Off-grid optimum, and one coefficient planted outside [0, 1]: the clip must hold it at the bound.
    want = {"all": [0.43, 1.3]}
    objective = distance(planted(world, want, "model"))
    res = merge_checkpoints("adamerging", world["ckpts"], world["out"] / "m.safetensors", base=world["base"],
                            objective=objective, options={"granularity": "model", "steps": 300, "lr": 0.02})
    got = res.fitted["coefficients"]["all"]
    grid = [i / 20 for i in range(21)]
    with torch.no_grad():
        brute = min(float(objective(planted(world, {"all": list(c)}, "model"))) for c in itertools.product(grid, grid))
        learnt = float(objective(planted(world, {"all": got}, "model")))
    assert learnt <= brute * 1.001
    # With λ_2 held at the bound, λ_1 minimises the quadratic along the line: the planted value moved by
    # the part of τ_2's shortfall that τ_1 can make up, (0.3) <τ1, τ2> / <τ1, τ1>.
    t1, t2 = (torch.cat([t[k].reshape(-1) for k in sorted(t)]).double() for t in world["taus"])
    along = want["all"][0] + (want["all"][1] - 1.0) * float(t1 @ t2 / (t1 @ t1))
    assert got[1] == 1.0 and got[0] == pytest.approx(along, abs=0.01)


def test_progress_and_the_loss_history(world):
    seen = []
    target = planted(world, {"all": [0.5, 0.5]}, "model")
    res = merge_checkpoints("adamerging", world["ckpts"], world["out"] / "m.safetensors", base=world["base"],
                            objective=distance(target), options={"granularity": "model", "steps": 5},
                            progress=lambda stage, f: seen.append((stage, f)))
    assert len(res.fitted["losses"]) == 5
    fractions = [f for stage, f in seen if stage == "adamerging"]
    assert len(fractions) == 6 and fractions == sorted(fractions) and fractions[-1] == 1.0


@pytest.mark.parametrize("kw, message", [
    ({"options": {"steps": 0}}, "option 'steps'"),
    ({"options": {"lr": 0}}, "option 'lr'"),
    ({"options": {"granularity": "neuron"}}, "option 'granularity'"),
    ({"options": {"objective": "mse"}}, "option 'objective'"),
    ({"options": {"init": 2.0}}, "need low < high and init within them"),
    ({"base": None}, "needs a base checkpoint"),
    ({"objective": None}, "needs a differentiable objective"),
    ({"objective": lambda p: torch.tensor(1.0)}, "not differentiable"),
    ({"objective": lambda p: p["out_bias"]}, "must return a 0-d tensor"),
    ({"objective": lambda p: (p["out_bias"] ** 2).sum() * float("inf")}, "returned inf"),
    ({"weights": [1.0, 2.0]}, "takes no per-model weights"),
])
def test_bad_options_are_refused_and_nothing_is_written(world, kw, message):
    kw = {"base": world["base"], "objective": lambda p: (p["out_bias"] ** 2).sum(), **kw}
    with pytest.raises(MergeOptionsError, match=message):
        merge_checkpoints("adamerging", world["ckpts"], world["out"] / "m.safetensors", **kw)
    assert os.listdir(world["out"]) == []


@pytest.mark.parametrize("kind", ["bert4rec", "sasrec"])
def test_dataset_objectives_are_the_models_own_scores_and_differentiable(tmp_path, kind):
    from core.merge_inputs import objective_function, sample_users
    from models.backbone import SeqRecModel
    from models.batching import pad_left
    from models.config import BackboneConfig
    from tests.synthetic import make_planted_dataset

    ds = make_planted_dataset(tmp_path, n_users=25, n_items=20, seed=2)
    cfg = BackboneConfig(n_items=ds.n_items, hidden=8, layers=1, heads=2, inner=12, max_len=9, kind=kind)
    torch.manual_seed(1)
    model = SeqRecModel(cfg).eval()
    state = model.state_dict()
    users = sample_users(ds, 11, 4)
    with torch.no_grad():
        scores = model.next_item_scores(pad_left([ds.split(u, "valid")[0][-cfg.max_len:] for u in users]))
    targets = torch.tensor([ds.split(u, "valid")[1] - 1 for u in users])
    ce = torch.nn.functional.cross_entropy(scores, targets)
    p = scores.softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    for name, want in (("cross-entropy", ce), ("entropy", entropy)):
        objective = objective_function(ds, cfg, kind=name, users=11, seed=4, batch_size=3)
        params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
        got = objective(params)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        got.backward()
        assert params["blocks.0.ffn.fc1.weight"].grad.abs().sum() > 0


def test_a_pool_restricts_the_objective_and_the_sample_to_its_users(tmp_path):
    from core.merge_inputs import merge_inputs, objective_function, sample_users
    from models.backbone import SeqRecModel
    from models.batching import pad_left
    from models.config import BackboneConfig
    from tests.synthetic import make_planted_dataset

    ds = make_planted_dataset(tmp_path, n_users=30, n_items=20, seed=5)
    cfg = BackboneConfig(n_items=ds.n_items, hidden=8, layers=1, heads=2, inner=12, max_len=9, kind="sasrec")
    torch.manual_seed(2)
    state = SeqRecModel(cfg).eval().state_dict()
    pool = list(range(1, 30, 2))
    drawn = sample_users(ds, 6, 1, pool=pool)
    assert len(drawn) == 6 and set(drawn) <= set(pool) and drawn == sorted(drawn)
    assert sample_users(ds, None, 1, pool=pool) == pool  # every user of this dataset has a validation item

    model = SeqRecModel(cfg).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        scores = model.next_item_scores(pad_left([ds.split(u, "valid")[0][-cfg.max_len:] for u in pool]))
    want = torch.nn.functional.cross_entropy(scores, torch.tensor([ds.split(u, "valid")[1] - 1 for u in pool]))
    got = objective_function(ds, cfg, users=None, pool=pool)(state)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    via = merge_inputs("adamerging", {"users": 100}, ds, cfg, device="cpu", pool=pool)["objective"](state)
    torch.testing.assert_close(via, want, rtol=1e-5, atol=1e-6)  # 100 > the pool: all of the pool
    assert not torch.allclose(objective_function(ds, cfg, users=None)(state), want)


@pytest.mark.parametrize("method, options, fits", [
    ("weight-search", {}, True), ("greedy-soup", {}, True), ("adamerging", {}, True),
    ("adamerging", {"objective": "entropy"}, False), ("regmean", {}, False), ("uniform", {}, False),
    ("fisher", {}, False),
])
def test_which_methods_fit_on_the_validation_targets(method, options, fits):
    from core.merge_inputs import fits_validation_targets

    assert fits_validation_targets(method, options) is fits
