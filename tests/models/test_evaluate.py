"""Evaluation protocols on plain arrays (EvalData) with scorers whose ranks we can work out by hand."""

import numpy as np
import pytest
import torch

from models.config import BackboneConfig
from models.errors import DataError, RecmergeError
from models.evaluate import (
    PROTOCOLS,
    EvalData,
    clear_negatives_cache,
    evaluate_data,
    negatives_for,
    popularity_scorer,
    sample_negatives,
    top_popular,
    user_ranks,
)
from models.metrics import rank_of_target


def make_data(n_users=40, n_items=150, seed=0, cache_key=None):
    """Random users; targets drawn from the 100 most popular items so top-popular100 can rank them."""
    rng = np.random.default_rng(seed)
    popularity = np.zeros(n_items + 1)
    popularity[1:] = rng.integers(1, 5, n_items)
    popularity[1:101] += 10  # items 1..100 are the top 100
    inputs, targets, touched = [], [], []
    for _ in range(n_users):
        n = int(rng.integers(3, 30))
        hist = rng.choice(np.arange(1, n_items + 1), n, replace=False)
        target = int(rng.integers(1, 101))
        inputs.append(hist)
        targets.append(target)
        touched.append(np.append(hist, target))
    return EvalData(inputs, np.array(targets), touched, popularity, n_items, cache_key=cache_key)


def oracle(data):
    """A scorer that knows each user's target (looked up by its history) and scores it highest."""
    lookup = {tuple(int(x) for x in h): t for h, t in zip(data.inputs, data.targets)}

    def score(history):
        out = torch.zeros(history.shape[0], data.n_items)
        for row, h in enumerate(history.tolist()):
            out[row, lookup[tuple(x for x in h if x)] - 1] = 1.0
        return out

    return score


def table_scorer(n_items, seed):
    """A fixed random score per item (different seeds = different 'models')."""
    s = torch.from_numpy(np.random.default_rng(seed).normal(size=n_items).astype(np.float32))
    return lambda history: s.expand(history.shape[0], -1)


def test_target_scored_highest_gets_perfect_metrics_under_every_protocol():
    data = make_data()
    result = evaluate_data(oracle(data), data, batch_size=7)
    assert set(result) == set(PROTOCOLS)
    for protocol, m in result.items():
        assert list(m) == ["ndcg@10", "hr@10", "ndcg@20", "hr@20", "mrr"]
        assert m == {k: 1.0 for k in m}, protocol


def test_target_inside_history_is_still_ranked():
    data = make_data(n_users=10)
    data.inputs[0] = np.append(data.inputs[0], data.targets[0])  # re-consumption: target already seen
    data.touched[0] = np.append(data.touched[0], data.targets[0])
    ranks = user_ranks(oracle(data), data, ("full", "top-popular100"))
    assert ranks["full"][0] == 0 and ranks["top-popular100"][0] == 0


def test_full_ranking_excludes_history_and_breaks_ties_pessimistically():
    data = make_data(n_users=12)
    flat = lambda history: torch.zeros(history.shape[0], data.n_items)  # noqa: E731 - every item ties
    ranks = user_ranks(flat, data, ("full",), batch_size=5)["full"]
    for u in range(12):
        excluded = set(data.inputs[u].tolist()) - {int(data.targets[u])}
        assert ranks[u] == data.n_items - len(excluded) - 1


def test_popularity_scorer_ranks_match_hand_computation():
    data = make_data(n_users=15)
    ranks = user_ranks(popularity_scorer(data.popularity), data, ("full", "top-popular100"))
    top = set(top_popular(data.popularity).tolist())
    for u in range(15):
        t = int(data.targets[u])
        seen = set(data.inputs[u].tolist()) - {t}
        others = [i for i in range(1, data.n_items + 1) if i != t and i not in seen]
        expect = sum(data.popularity[i] >= data.popularity[t] for i in others)
        assert ranks["full"][u] == expect
        expect_top = sum(data.popularity[i] >= data.popularity[t] for i in others if i in top)
        assert ranks["top-popular100"][u] == (expect_top if t in top else np.inf)


def test_top_popular_target_outside_the_100_is_a_miss():
    data = make_data(n_users=5)
    data.targets[:] = 150  # item 150 is not among the 100 most popular
    for t in data.touched:
        t[-1] = 150
    ranks = user_ranks(oracle(data), data, ("full", "top-popular100"))
    assert np.all(ranks["full"] == 0)
    assert np.all(np.isinf(ranks["top-popular100"]))


def test_negatives_avoid_history_and_target_and_are_distinct():
    data = make_data()
    for protocol in ("random100", "popular100"):
        neg = negatives_for(data, protocol, seed=3)
        assert neg.shape == (len(data.targets), 100)
        for u in range(len(data.targets)):
            row = neg[u]
            assert np.all(row > 0)  # 150 items, <= 30 touched: always 100 eligible
            assert len(set(row.tolist())) == 100
            assert not set(row.tolist()) & set(data.touched[u].tolist())
            assert int(data.targets[u]) not in row


def test_negatives_shorter_list_when_catalogue_is_small():
    neg = sample_negatives([np.array([1, 2, 3])], n_items=10, n=100, seed=0)
    drawn = neg[0][neg[0] > 0]
    assert sorted(drawn.tolist()) == list(range(4, 11))
    assert np.all(neg[0][7:] == 0)


def test_same_seed_same_lists_for_every_model_other_seed_other_lists():
    key = ("fingerprint-x", "test")
    data = make_data(cache_key=key)
    clear_negatives_cache()
    lists = {p: negatives_for(data, p, seed=0).copy() for p in ("random100", "popular100")}
    clear_negatives_cache()  # a fresh draw, not the cached object, must give the same lists
    for p in lists:
        assert np.array_equal(negatives_for(data, p, seed=0), lists[p])
        assert not np.array_equal(negatives_for(data, p, seed=1), lists[p])

    # Two different models are scored against exactly these lists.
    for model_seed in (1, 2):
        scorer = table_scorer(data.n_items, model_seed)
        ranks = user_ranks(scorer, data, ("random100", "popular100"), seed=0, batch_size=8)
        scores = scorer(torch.zeros(1, 1, dtype=torch.long))[0]
        for p, neg in lists.items():
            cand = torch.from_numpy(np.concatenate([data.targets[:, None], neg], axis=1))
            expect = rank_of_target(scores[cand - 1], torch.zeros(len(cand), dtype=torch.long))
            np.testing.assert_array_equal(ranks[p], expect.numpy())


def test_popular100_follows_popularity_and_random100_is_uniform():
    n_items, U = 2000, 1000
    rng = np.random.default_rng(0)
    cls = np.arange(n_items) % 10  # item i+1 has weight cls+1 (1..10)
    popularity = np.concatenate([[0.0], cls + 1.0])
    popularity[-50:] = 0  # never seen in training: must never be drawn
    touched = [rng.choice(np.arange(1, n_items + 1), 5, replace=False) for _ in range(U)]
    inputs = [t[:-1] for t in touched]
    data = EvalData(inputs, np.array([t[-1] for t in touched]), touched, popularity, n_items)

    counts = np.bincount(negatives_for(data, "popular100", seed=0).ravel(), minlength=n_items + 1)[1:]
    assert counts[-50:].sum() == 0
    share = np.array([counts[cls == c].sum() for c in range(10)]) / counts.sum()
    expect = np.array([popularity[1:][cls == c].sum() for c in range(10)]) / popularity.sum()
    # ~100k draws; sampling without replacement bends proportionality only slightly at 100 of 2000
    np.testing.assert_allclose(share, expect, rtol=0.1)
    assert 8.0 < share[9] / share[0] < 12.0

    counts = np.bincount(negatives_for(data, "random100", seed=0).ravel(), minlength=n_items + 1)[1:]
    share = np.array([counts[cls == c].sum() for c in range(10)]) / counts.sum()
    np.testing.assert_allclose(share, 0.1, rtol=0.05)


def test_model_is_evaluated_in_eval_mode_and_left_as_found():
    from models.backbone import SeqRecModel

    torch.manual_seed(0)
    data = make_data(n_users=20)
    model = SeqRecModel(BackboneConfig(n_items=data.n_items, hidden=16, layers=1, heads=2, inner=32, max_len=8))
    model.train()
    a = user_ranks(model, data, batch_size=4)
    b = user_ranks(model, data, batch_size=4)
    assert model.training  # restored
    for p in PROTOCOLS:  # dropout off during evaluation: two runs agree exactly
        np.testing.assert_array_equal(a[p], b[p])
    assert np.all(a["full"] >= 0) and np.all(a["full"] < data.n_items)


def test_bad_inputs_are_refused():
    data = make_data(n_users=3)
    with pytest.raises(RecmergeError, match="unknown protocol"):
        evaluate_data(oracle(data), data, protocols=("fullish",))
    with pytest.raises(RecmergeError, match="cutoffs"):
        evaluate_data(oracle(data), data, ks=(0,))
    with pytest.raises(DataError, match="targets"):
        EvalData([np.array([1])], np.array([99]), [np.array([1, 99])], np.zeros(11), 10)
    with pytest.raises(RecmergeError, match="shape"):
        user_ranks(lambda h: torch.zeros(h.shape[0], 7), data, ("full",))


# ------------------------------------------------------------------ on a prepared dataset (models/data.py)

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from tests.synthetic import make_planted_dataset

    return make_planted_dataset(tmp_path_factory.mktemp("planted"), n_users=120, n_items=50, seed=1)


def tiny_model(n_items, dropout=0.2, seed=0):
    from models.backbone import SeqRecModel

    torch.manual_seed(seed)
    return SeqRecModel(BackboneConfig(n_items=n_items, hidden=16, layers=1, heads=2, inner=32,
                                      dropout=dropout, max_len=12))


def test_eval_data_follows_the_dataset_splits(planted):
    from models.evaluate import eval_data

    for split in ("valid", "test"):
        data = eval_data(planted, split)
        assert len(data.targets) == planted.n_users
        for u in (0, 17, planted.n_users - 1):
            inp, tgt = planted.split(u, split)
            assert np.array_equal(data.inputs[u], inp) and data.targets[u] == tgt
        np.testing.assert_array_equal(data.popularity, planted.item_popularity())


def test_dataset_negatives_avoid_the_whole_sequence_and_are_cached(planted):
    from models.evaluate import eval_data

    for split in ("valid", "test"):
        data = eval_data(planted, split)
        for p in ("random100", "popular100"):
            neg = negatives_for(data, p, seed=0)
            assert neg is negatives_for(eval_data(planted, split), p, seed=0)  # cached per fingerprint
            for u in range(planted.n_users):
                drawn = neg[u][neg[u] > 0]
                # valid and test items count as touched too, whichever split is evaluated
                assert not set(drawn.tolist()) & set(planted.sequence(u).tolist())
                assert len(set(drawn.tolist())) == len(drawn) == min(100, 50 - len(set(planted.sequence(u))))


def test_planted_rule_scorer_beats_popularity_on_the_dataset(planted):
    from models.evaluate import evaluate
    from tests.synthetic import planted_next

    def rule(history):  # one point on the item the planted rule predicts, 0 elsewhere
        out = torch.zeros(history.shape[0], planted.n_items)
        nxt = torch.tensor([planted_next(int(i), planted.n_items) for i in history[:, -1]])
        out[torch.arange(len(out)), nxt - 1] = 1.0
        return out

    good = evaluate(rule, planted, protocols=("full", "random100"))
    base = evaluate(popularity_scorer(planted.item_popularity()), planted, protocols=("full", "random100"))
    assert good["full"]["hr@10"] > 0.8  # noise 5%: most targets follow the rule
    assert good["full"]["ndcg@10"] == pytest.approx(good["full"]["hr@10"])  # a hit is always rank 0
    assert base["full"]["ndcg@10"] < 0.3 < good["full"]["ndcg@10"]


def test_evaluate_runs_a_model_and_per_user_ndcg_agrees(planted):
    from models.evaluate import evaluate, per_user_ndcg

    model = tiny_model(planted.n_items)
    result = evaluate(model, planted, split="valid")
    assert set(result) == set(PROTOCOLS)
    for m in result.values():
        assert all(0.0 <= v <= 1.0 for v in m.values())
        assert m["hr@10"] <= m["hr@20"] and m["ndcg@10"] <= m["ndcg@20"]
    per_user = per_user_ndcg(model, planted, split="valid")
    assert per_user.shape == (planted.n_users,)
    assert per_user.mean() == pytest.approx(result["full"]["ndcg@10"])


def test_restricted_split_keeps_those_users_rows_and_their_full_ranks(planted):
    from models.evaluate import eval_data, restrict

    data = eval_data(planted, "valid")
    users = [40, 3, 77, 3]  # any order, a repeat: the part holds each once, in the split's order
    part = restrict(data, users)
    np.testing.assert_array_equal(part.users, [3, 40, 77])
    for row, u in enumerate(part.users):
        assert np.array_equal(part.inputs[row], data.inputs[u]) and part.targets[row] == data.targets[u]
    model = tiny_model(planted.n_items)
    whole = user_ranks(model, data, ("full", "top-popular100"))
    got = user_ranks(model, part, ("full", "top-popular100"))
    for p in got:
        np.testing.assert_array_equal(got[p], whole[p][[3, 40, 77]])
    with pytest.raises(DataError, match="1 of the 2 users asked for have no row.*first: 500"):
        restrict(data, [5, 500])
    with pytest.raises(DataError, match="no users"):
        restrict(data, [])


def test_validation_score_on_some_users_is_their_mean_ndcg(planted):
    from core.scoring import validation_score
    from models.evaluate import per_user_ndcg

    model = tiny_model(planted.n_items).eval()
    per_user = per_user_ndcg(model, planted, split="valid")
    users = np.arange(0, planted.n_users, 3)
    score = validation_score(planted, model.cfg, device="cpu", users=users)
    assert score(model.state_dict()) == pytest.approx(per_user[users].mean())
    assert validation_score(planted, model.cfg, device="cpu")(model.state_dict()) == pytest.approx(per_user.mean())
    assert per_user[users].mean() != pytest.approx(per_user.mean())  # the part is not the whole here


def test_uniformity_and_alignment_by_hand():
    from models.representation import alignment, uniformity

    antipodal = torch.tensor([[1.0, 0.0], [-3.0, 0.0]])  # squared distance 4 after normalising
    assert uniformity(antipodal) == pytest.approx(-8.0)
    assert uniformity(torch.ones(5, 3)) == pytest.approx(0.0)  # all on one point: no spread
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert alignment(x, 5 * x) == pytest.approx(0.0)
    assert alignment(x, x.flip(1)) == pytest.approx(2.0)  # orthogonal unit vectors: |a-b|^2 = 2
    # the blockwise sum equals the plain pairwise definition
    z = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    zn = torch.nn.functional.normalize(z.double(), dim=1)
    ref = torch.pdist(zn).pow(2).mul(-2).exp().mean().log()
    assert uniformity(z) == pytest.approx(float(ref), rel=1e-9)


def test_representation_metrics_on_a_model(planted):
    from models.representation import representation_metrics

    m = representation_metrics(tiny_model(planted.n_items, dropout=0.3), planted)
    assert set(m) == {"item_uniformity", "seq_uniformity", "seq_alignment"}
    assert -8.0 <= m["item_uniformity"] <= 0.0 and -8.0 <= m["seq_uniformity"] <= 0.0
    assert m["seq_alignment"] > 0.0  # two dropout views differ
    assert representation_metrics(tiny_model(planted.n_items, dropout=0.3), planted) == m  # seeded
    # without dropout the two views are the same sequence twice: perfectly aligned
    assert representation_metrics(tiny_model(planted.n_items, dropout=0.0), planted)["seq_alignment"] < 1e-10


def test_recommend_for_user_excludes_history_and_matches_the_scores(planted):
    from models.recommend import recommend_for_user, top_k

    model = tiny_model(planted.n_items)
    user = planted.user_ids[5]
    seq = planted.sequence(5)
    recs = recommend_for_user(model, planted, user, k=10)
    items = [planted.item_index(r["item"]) for r in recs]
    scores = [r["score"] for r in recs]
    assert len(recs) == 10 and not set(items) & set(seq.tolist())
    assert scores == sorted(scores, reverse=True)
    with torch.no_grad():
        s = model.eval().next_item_scores(torch.from_numpy(np.asarray(seq, dtype=np.int64))[None])[0]
    s[torch.from_numpy(np.asarray(seq, dtype=np.int64)) - 1] = -torch.inf
    assert items == (s.topk(10).indices + 1).tolist()
    # k larger than what is left after exclusion: the tail is empty, never a seen item
    ids, _ = top_k(model, [seq], k=planted.n_items, n_items=planted.n_items)
    real = ids[0][ids[0] > 0]
    assert len(real) == planted.n_items - len(set(seq.tolist())) and not set(real.tolist()) & set(seq.tolist())
    with pytest.raises(DataError, match="unknown user"):
        recommend_for_user(model, planted, "no-such-user", k=10)
    for bad_k in (0, planted.n_items + 1):
        with pytest.raises(RecmergeError, match="k must be"):
            recommend_for_user(model, planted, user, k=bad_k)
