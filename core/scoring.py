"""How a merge scores a candidate state when it has to choose (greedy-soup): the same function for
`recmerge merge` and for a merge job on the workers."""

from __future__ import annotations


def validation_score(ds, backbone, device=None):
    """score(state_dict) = full-ranking validation NDCG@10: what greedy-soup ranks and accepts by."""
    from models.backbone import SeqRecModel
    from models.evaluate import evaluate
    from models.train import resolve_device

    device = resolve_device(device)
    model = SeqRecModel(backbone).to(device).eval()

    def score(state: dict) -> float:
        model.load_state_dict(state)
        return evaluate(model, ds, split="valid", protocols=("full",), device=device)["full"]["ndcg@10"]

    return score
