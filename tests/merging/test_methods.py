"""Merge methods as pure math on hand-made tensors: each against its formula or a worked example."""

import math

import pytest
import torch

from merging.merge import build_method, merge_state_dicts
from merging.methods import METHODS, MergeOptionsError, get_method
from merging.methods.base import FitInputs, TensorInputs
from merging.methods.dare import tensor_generator
from merging.methods.greedy_soup import greedy_select

T = torch.tensor


def run(method, tensors, weights=None, options=None, base=None, fishers=None, name="w"):
    m = build_method(method, len(tensors), options, weights)
    return m.merge(TensorInputs(name, tensors, base=base, fishers=fishers)), m


def test_registry_lists_every_method_and_unknown_names_list_them():
    assert set(METHODS) == {"uniform", "weighted", "fisher", "greedy-soup", "task-arithmetic", "ties", "dare",
                            "weight-search", "regmean", "adamerging"}
    with pytest.raises(MergeOptionsError, match="unknown merge method 'soup'; known: uniform, weighted, fisher"):
        get_method("soup")


def test_uniform_and_weighted_follow_their_formulas():
    a, b, c = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    out, _ = run("uniform", [a, b, c])
    torch.testing.assert_close(out, (a + b + c) / 3)
    out, _ = run("weighted", [a, b, c], weights=[1.0, 2.0, 5.0])
    torch.testing.assert_close(out, (1 * a + 2 * b + 5 * c) / 8)
    out, _ = run("weighted", [a, b], weights=[0.0, 3.0])  # a zero weight is allowed, only the sum must be > 0
    torch.testing.assert_close(out, b)


def test_fisher_matches_eq_3_7_with_zero_fisher_fallback():
    t1, t2 = T([1.0, 2.0, 3.0, 4.0]), T([5.0, 6.0, 7.0, 8.0])
    f1, f2 = T([1.0, 0.0, 0.0, 3.0]), T([1.0, 2.0, 0.0, 1.0])
    out, m = run("fisher", [t1, t2], fishers=[f1, f2])
    # entry 2 has no Fisher mass at all: the (λ-)weighted average, (3 + 7) / 2
    torch.testing.assert_close(out, T([3.0, 6.0, 5.0, 5.0]))
    assert m.fallback_entries == 1
    out, _ = run("fisher", [t1, t2], weights=[3.0, 1.0], fishers=[f1, f2])
    # (3·1·1 + 1·1·5)/4, (0 + 2·6)/2, fallback (3·3 + 7)/4, (3·3·4 + 1·1·8)/(9 + 1)
    torch.testing.assert_close(out, T([2.0, 6.0, 4.0, 4.4]))


def test_fisher_floor_sends_small_mass_to_the_weighted_average():
    t1, t2 = T([1.0, 10.0]), T([3.0, 20.0])
    f1, f2 = T([1e-6, 1.0]), T([0.0, 3.0])
    out, m = run("fisher", [t1, t2], fishers=[f1, f2], options={"epsilon": 1e-3})
    torch.testing.assert_close(out, T([2.0, (10 + 60) / 4]))
    assert m.fallback_entries == 1
    out, _ = run("fisher", [t1, t2], fishers=[f1, f2])  # no floor: the tiny Fisher wins entry 0 outright
    torch.testing.assert_close(out, T([1.0, 17.5]))


def test_fisher_normalisation_uses_the_global_norm_over_all_tensors():
    ckpts = [{"a": torch.randn(3, 2), "b": torch.randn(5)} for _ in range(2)]
    fishers = [{"a": torch.rand(3, 2), "b": torch.rand(5)} for _ in range(2)]
    lam = [2.0, 1.0]
    norms = [math.sqrt(sum(float((f[k] ** 2).sum()) for k in f)) for f in fishers]
    got = merge_state_dicts(build_method("fisher", 2, {"normalize": True}, lam), ckpts, fishers=fishers)
    for k in ("a", "b"):
        w = [lam[i] * fishers[i][k] / norms[i] for i in range(2)]
        torch.testing.assert_close(got[k], (w[0] * ckpts[0][k] + w[1] * ckpts[1][k]) / (w[0] + w[1]))
    # Rescaling one Fisher changes nothing once normalised, and does change the raw merge.
    scaled = [{k: v * 1000 for k, v in fishers[0].items()}, fishers[1]]
    again = merge_state_dicts(build_method("fisher", 2, {"normalize": True}, lam), ckpts, fishers=scaled)
    raw = merge_state_dicts(build_method("fisher", 2, {}, lam), ckpts, fishers=fishers)
    raw_scaled = merge_state_dicts(build_method("fisher", 2, {}, lam), ckpts, fishers=scaled)
    for k in ("a", "b"):
        torch.testing.assert_close(again[k], got[k])
        assert not torch.allclose(raw_scaled[k], raw[k])


def test_identical_fishers_give_the_weighted_average():
    tensors = [torch.randn(6, 4) for _ in range(3)]
    f = torch.rand(6, 4) + 0.1
    out, _ = run("fisher", tensors, weights=[1.0, 2.0, 3.0], fishers=[f, f, f])
    expected, _ = run("weighted", tensors, weights=[1.0, 2.0, 3.0])
    torch.testing.assert_close(out, expected)


def test_task_arithmetic_by_hand():
    base = T([1.0, 1.0])
    out, _ = run("task-arithmetic", [T([2.0, 0.0]), T([1.0, 3.0])], weights=[1.0, 2.0], base=base,
                 options={"alpha": 0.5})
    # τ = [1, -1], [0, 2]; Σ w τ = [1, 3]; base + 0.5 · [1, 3]
    torch.testing.assert_close(out, T([1.5, 2.5]))


TAUS = [T([3.0, -1.0, 0.5, -2.0, 4.0, 0.1]),
        T([-2.0, -3.0, 1.0, 1.0, 0.2, 5.0]),
        T([1.0, 2.0, -0.5, -4.0, 0.3, -0.2])]


def test_ties_worked_example():
    base = torch.ones(6)
    # density 0.5 keeps 3 of 6 entries: [3,0,0,-2,4,0], [-2,-3,0,0,0,5], [1,2,0,-4,0,0]
    # elected signs of the sums [2,-1,0,-6,4,5]: + - 0 - + +; disjoint means: 2, -3, 0, -3, 4, 5
    out, _ = run("ties", [base + t for t in TAUS], base=base, options={"density": 0.5})
    torch.testing.assert_close(out, base + T([2.0, -3.0, 0.0, -3.0, 4.0, 5.0]))
    # Weights take part in the election and the mean: w = [1, 1, 2] gives sums [3, 1, 0, -10, 4, 5],
    # so entry 1 now elects + (only τ3's 2 agrees) and entry 0 averages 3·1 and 1·2 over weight 3.
    out, _ = run("ties", [base + t for t in TAUS], weights=[1.0, 1.0, 2.0], base=base,
                 options={"density": 0.5, "alpha": 2.0})
    torch.testing.assert_close(out, base + 2.0 * T([5 / 3, 2.0, 0.0, -10 / 3, 4.0, 5.0]))


def test_dare_worked_example_with_the_documented_masks():
    base = torch.zeros(200)
    thetas = [torch.randn(200), torch.randn(200)]
    p, seed = 0.7, 11
    out, _ = run("dare", thetas, weights=[1.0, 0.5], base=base, name="blocks.0.ffn.fc1.weight",
                 options={"p": p, "seed": seed, "alpha": 0.8})
    g = tensor_generator(seed, "blocks.0.ffn.fc1.weight")
    keep = [torch.rand(200, generator=g) >= p for _ in thetas]  # one generator per tensor, models in order
    expected = 0.8 * (keep[0] * thetas[0] / (1 - p) + 0.5 * keep[1] * thetas[1] / (1 - p))
    torch.testing.assert_close(out, expected)


def test_dare_drops_about_p_and_rescales_the_rest():
    base = torch.zeros(100, 100)
    out, _ = run("dare", [torch.ones(100, 100)], base=base, options={"p": 0.75})
    values = set(out.unique().tolist())
    assert values == {0.0, 4.0}
    assert abs(float((out == 0).float().mean()) - 0.75) < 0.03


def test_dare_is_reproducible_per_seed_and_tensor_name():
    base = torch.zeros(50)
    thetas = [torch.randn(50), torch.randn(50)]

    def dare(seed, name="x"):
        return run("dare", thetas, base=base, name=name, options={"p": 0.5, "seed": seed})[0]

    assert torch.equal(dare(3), dare(3))
    assert not torch.equal(dare(3), dare(4))
    assert not torch.equal(dare(3, "x"), dare(3, "y"))


def test_dare_without_drops_reduces_to_task_arithmetic_and_ties():
    base = torch.randn(6)
    thetas = [base + t for t in TAUS]
    linear, _ = run("dare", thetas, base=base, options={"p": 0.0, "alpha": 0.3})
    ta, _ = run("task-arithmetic", thetas, base=base, options={"alpha": 0.3})
    assert torch.equal(linear, ta)
    dt, _ = run("dare", thetas, base=base, options={"p": 0.0, "combine": "ties"})
    ties, _ = run("ties", thetas, base=base, options={"density": 1.0})
    assert torch.equal(dt, ties)


def test_greedy_select_keeps_what_does_not_lower_the_score():
    # individual scores: model 2 is best, then 0, then 1 (tie order irrelevant here)
    individual = [0.5, 0.1, 0.9]
    soups = {(2, 0): 0.95, (2, 0, 1): 0.94}
    kept, history = greedy_select(individual, lambda idx: soups[tuple(idx)])
    assert kept == [2, 0]
    assert [h["kept"] for h in history] == [True, True, False]
    kept, _ = greedy_select([0.3, 0.3], lambda idx: 0.3)  # equal score is "does not lower": kept
    assert kept == [0, 1]


@pytest.mark.parametrize("method, options, weights, message", [
    ("ties", {"density": 0.0}, None, "option 'density'"),
    ("ties", {"density": 1.5}, None, "option 'density'"),
    ("dare", {"p": 1.0}, None, "option 'p'"),
    ("dare", {"combine": "mean"}, None, "option 'combine'"),
    ("fisher", {"epsilon": -1}, None, "option 'epsilon'"),
    ("fisher", {"bogus": 1}, None, r"unknown option 'bogus' \(known: normalize, epsilon\)"),
    ("weighted", None, [1.0, -1.0], "model 2 option 'weight'"),
    ("weighted", None, [0.0, 0.0], "weights sum to 0"),
    ("weighted", None, [1.0], "1 weights for 2 checkpoints"),
    ("uniform", None, [1.0, 2.0], "takes no per-model weights"),
])
def test_bad_options_are_field_errors(method, options, weights, message):
    with pytest.raises(MergeOptionsError, match=message):
        build_method(method, 2, options, weights)


def test_options_from_strings_are_converted():
    m = build_method("fisher", 2, {"normalize": "true", "epsilon": "1e-3"})
    assert m.options.normalize is True and m.options.epsilon == 1e-3


FIT_INPUTS = FitInputs(score=lambda sd: -float(sd["w"].sum()) ** 2,
                       grams=lambda sd: {"w": torch.eye(5) + 0.1},
                       objective=lambda params: (params["w"] ** 2).sum())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_method_writes_to_its_inputs(name):
    # merge_state_dicts hands methods the caller's own tensors (float32 inputs are not copied by .to()).
    cls = get_method(name)
    gen = torch.Generator().manual_seed(0)
    x = TensorInputs("w", [torch.randn(6, 5, generator=gen) for _ in range(3)],
                     base=torch.randn(6, 5, generator=gen) if cls.needs_base else None,
                     fishers=[torch.rand(6, 5, generator=gen) for _ in range(3)] if cls.needs_fisher else None)
    x.fishers and x.fishers[1].view(-1)[:7].zero_()  # zero-Fisher entries take the fallback path too
    before = [t.clone() for t in [*x.tensors, *([x.base] if x.base is not None else []), *(x.fishers or [])]]
    m = build_method(name, 3, {"normalize": True} if name == "fisher" else None)
    if name == "fisher":
        m.set_fisher_norms([2.0, 3.0, 4.0])
    if m.fits:  # learn on other tensors; what is checked is that merging leaves x's alone
        states = [{"w": torch.randn(6, 5, generator=gen)} for _ in range(3)]
        base = {"w": torch.randn(6, 5, generator=gen)} if cls.needs_base else None
        m.fit(states, base, FIT_INPUTS, lambda f: None)
    out = m.merge(x)
    after = [*x.tensors, *([x.base] if x.base is not None else []), *(x.fishers or [])]
    for b, a in zip(before, after):
        assert torch.equal(a, b)
        assert out.data_ptr() != a.data_ptr()  # a new tensor, not one of the inputs
