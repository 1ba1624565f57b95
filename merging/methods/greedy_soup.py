"""`greedy-soup` (Wortsman et al. 2022): rank the checkpoints by a validation score, start from the best
and keep each next one only if the uniform average with it does not lower the score. The score is a
caller-supplied function of a state dict, so merging/ stays free of evaluation code; the engine builds
the candidate soups and writes the final one. Per tensor, the soup is a uniform average."""

from __future__ import annotations

from collections.abc import Callable

from merging.methods.uniform import Uniform


def greedy_select(individual: list[float], soup_score: Callable[[list[int]], float]) -> tuple[list[int], list[dict]]:
    """individual[i] = score of model i alone; soup_score(indices) = score of their uniform soup.
    Returns the kept indices (in the order they joined) and the history of decisions."""
    order = sorted(range(len(individual)), key=lambda i: -individual[i])  # stable: ties keep input order
    kept, best = [order[0]], individual[order[0]]
    history = [{"model": order[0], "score": best, "kept": True}]
    for i in order[1:]:
        s = soup_score(kept + [i])
        history.append({"model": i, "score": s, "kept": s >= best})
        if s >= best:
            kept.append(i)
            best = s
    return kept, history


class GreedySoup(Uniform):
    """Per tensor a uniform average; the engine feeds it only the kept checkpoints."""

    name = "greedy-soup"
    summary = "uniform soup of the checkpoints that do not lower a validation score, best first"
    needs_score = True
