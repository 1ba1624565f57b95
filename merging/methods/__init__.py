"""The merge-method registry: a method exists because it is listed here."""

from __future__ import annotations

from merging.methods.adamerging import AdaMerging
from merging.methods.base import MergeMethod, MergeOptionsError
from merging.methods.dare import Dare
from merging.methods.fisher_weighted import FisherWeighted
from merging.methods.greedy_soup import GreedySoup
from merging.methods.regmean import RegMean
from merging.methods.task_arithmetic import TaskArithmetic
from merging.methods.ties import Ties
from merging.methods.uniform import Uniform
from merging.methods.weight_search import WeightSearch
from merging.methods.weighted import Weighted

METHODS: dict[str, type[MergeMethod]] = {
    m.name: m for m in (Uniform, Weighted, FisherWeighted, GreedySoup, TaskArithmetic, Ties, Dare,
                        WeightSearch, RegMean, AdaMerging)
}


def get_method(name: str) -> type[MergeMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise MergeOptionsError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "MergeMethod", "MergeOptionsError", "get_method"]
