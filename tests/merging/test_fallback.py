"""The Fisher merge says where it fell back to the weighted average and why."""

import torch

from merging.fallback import explain_fallback, fallback_summary
from merging.merge import build_method
from merging.methods.base import TensorInputs


def test_the_method_records_rows_of_each_block_at_their_place_in_the_tensor():
    m = build_method("fisher", 2)
    t = [torch.ones(4, 3), torch.zeros(4, 3)]
    f = [torch.ones(4, 3), torch.ones(4, 3)]
    f[0][1], f[1][1] = 0, 0  # row 1 of this block = row 11 of the tensor
    m.merge(TensorInputs("item_emb.weight", t, fishers=f, start=10))
    m.merge(TensorInputs("out_bias", [torch.ones(5), torch.ones(5)], fishers=[torch.zeros(5), torch.ones(5) * 0]))
    assert m.fallback_entries == 8
    assert m.fallback == {"item_emb.weight": {"entries": 3, "zero": 3, "rows": {11: 3}},
                          "out_bias": {"entries": 5, "zero": 5, "rows": {}}}


def test_each_place_gets_its_reason():
    fallback = {"item_emb.weight": {"entries": 12, "zero": 12, "rows": {0: 4, 5: 4, 21: 4}},
                "pos_emb.weight": {"entries": 12, "zero": 12, "rows": {0: 4, 1: 4, 2: 4}},
                "out_bias": {"entries": 2, "zero": 1, "rows": {}}}
    lines = explain_fallback(fallback, 1e-9, n_items=20, kind="sasrec")
    assert lines == [
        "  item_emb.weight row 0: 4 entries: the padding token, which never receives a gradient",
        "  item_emb.weight row 21: 4 entries: the [MASK] token, which a causal (sasrec) backbone never reads",
        "  item_emb.weight row 5: 4 entries: items whose Fisher is zero in every ingredient (they never entered "
        "the histories the Fishers were estimated on, and the output side gave them no mass)",
        "  out_bias: 2 entries where every ingredient's Fisher is zero; 1 of them have some mass but below "
        "epsilon=1e-09",
        "  pos_emb.weight 3 rows (0-2): 12 entries: positions no history in the Fisher sample reached (histories "
        "are left-padded, so positions before the longest one get no gradient)",
    ]
    head = fallback_summary(fallback, 26, 0.0, 20, "bert4rec").splitlines()[0]
    assert head.startswith("fisher: 26 entries fell back to the weighted average: there Σ λ_i F_i is zero")
