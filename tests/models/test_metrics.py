"""Rank metrics on hand-made score matrices whose ranks are known."""

import math

import numpy as np
import pytest
import torch

from models.metrics import error_inconsistency, mean_metrics, mean_se, metric_names, per_user_metrics, rank_of_target


def test_rank_counts_strictly_better_items():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3],
                           [0.1, 0.9, 0.5, 0.3],
                           [0.1, 0.9, 0.5, 0.3]])
    ranks = rank_of_target(scores, torch.tensor([1, 2, 0]))
    assert ranks.tolist() == [0.0, 1.0, 3.0]


def test_ties_are_pessimistic():
    # the target (column 0) ties with two others and is beaten by one: r = 1 + 2
    scores = torch.tensor([[0.5, 0.5, 0.9, 0.5, 0.1]])
    assert rank_of_target(scores, torch.tensor([0])).item() == 3.0
    # all equal: the target comes last among 5
    assert rank_of_target(torch.zeros(1, 5), torch.tensor([2])).item() == 4.0


def test_excluded_candidates_do_not_count_and_target_is_never_excluded():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    cand = torch.tensor([[False, True, True, True]])  # item in column 0 excluded (e.g. history)
    assert rank_of_target(scores, torch.tensor([2]), cand).item() == 1.0
    # a target outside the candidate set is a miss
    assert math.isinf(rank_of_target(scores, torch.tensor([0]), cand).item())


def test_nan_scores_never_help():
    scores = torch.tensor([[float("nan"), 0.0, -1.0]])
    # a NaN target ranks below every finite candidate
    assert rank_of_target(scores, torch.tensor([0])).item() == 2.0
    # a NaN competitor does not beat a finite target
    assert rank_of_target(scores, torch.tensor([1])).item() == 0.0


def test_metric_values_from_ranks():
    ranks = np.array([0.0, 1.0, 9.0, 10.0, 19.0, np.inf])
    m = per_user_metrics(ranks, (10, 20))
    np.testing.assert_allclose(m["ndcg@10"], [1.0, 1 / math.log2(3), 1 / math.log2(11), 0, 0, 0])
    np.testing.assert_allclose(m["hr@10"], [1, 1, 1, 0, 0, 0])
    np.testing.assert_allclose(m["ndcg@20"], [1.0, 1 / math.log2(3), 1 / math.log2(11),
                                              1 / math.log2(12), 1 / math.log2(21), 0])
    np.testing.assert_allclose(m["hr@20"], [1, 1, 1, 1, 1, 0])
    np.testing.assert_allclose(m["mrr"], [1, 1 / 2, 1 / 10, 1 / 11, 1 / 20, 0])
    means = mean_metrics(ranks)
    assert list(means) == ["ndcg@10", "hr@10", "ndcg@20", "hr@20", "mrr"] == metric_names()
    assert means["hr@10"] == pytest.approx(0.5)


def test_error_inconsistency_counts_users_where_exactly_one_model_is_good():
    a = np.array([1.0, 0.0, 0.63, 0.5, 0.0])
    b = np.array([1.0, 0.63, 0.0, 0.0, 0.0])
    # user 0: both good; 1 and 2: exactly one; 3: 0.5 is not > 0.5 (neither); 4: neither
    assert error_inconsistency(a, b) == pytest.approx(40.0)
    assert error_inconsistency(a, a) == 0.0
    with pytest.raises(ValueError):
        error_inconsistency(a, b[:3])


def test_mean_se_is_the_mean_and_its_standard_error_over_users():
    m, se = mean_se([1.0, 2.0, 3.0, 6.0])
    assert m == 3.0
    assert abs(se - (14 / 3) ** 0.5 / 2) < 1e-12  # sample variance 14/3, four users
    m, se = mean_se([0.25, 0.25, 0.25])
    assert (m, se) == (0.25, 0.0)  # exactly representable: no spread, no error
