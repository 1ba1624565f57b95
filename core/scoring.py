"""How a merge scores a candidate state when it has to choose (greedy-soup): the same function for
`recmerge merge` and for a merge job on the workers."""

from __future__ import annotations


def validation_score(ds, backbone, device=None, users=None):
    """score(state_dict) = full-ranking validation NDCG@10: what greedy-soup ranks and accepts by. `users`
    (internal indices) scores on those users' validation items only, so that a choice fitted on them can
    be judged on the rest."""
    from models.backbone import SeqRecModel
    from models.evaluate import eval_data, evaluate_data, restrict
    from models.train import resolve_device

    device = resolve_device(device)
    model = SeqRecModel(backbone).to(device).eval()
    data = eval_data(ds, "valid")
    if users is not None:
        data = restrict(data, users)

    def score(state: dict) -> float:
        model.load_state_dict(state)
        return evaluate_data(model, data, protocols=("full",), device=device)["full"]["ndcg@10"]

    return score
