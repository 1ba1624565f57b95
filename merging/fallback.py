"""Why a Fisher merge fell back to the weighted average, in words a user can act on.

FisherWeighted records where Σ λ_i F_i was zero or below `epsilon`; here those places are named. In a
recmerge backbone the usual places are rows of the embedding tables that no Fisher estimate can reach:
the padding row (it never gets a gradient), the [MASK] row of a causal backbone (never fed to it), and
position rows beyond the longest history the Fisher saw (histories are left-padded, so the unreached
positions are the lowest rows).
"""

from __future__ import annotations

from merging.fisher_compute import ITEM_TABLE, POS_TABLE


def _ranges(rows: list[int]) -> str:
    out, start = [], None
    for i, r in enumerate(rows):
        if start is None:
            start = r
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out[:6]) + (f" and {len(out) - 6} more ranges" if len(out) > 6 else "")


def _row_reasons(name: str, rows: list[int], n_items: int, kind: str) -> list[tuple[list[int], str]]:
    if name == ITEM_TABLE:
        named = {0: "the padding token, which never receives a gradient"}
        if kind == "sasrec":
            named[n_items + 1] = "the [MASK] token, which a causal (sasrec) backbone never reads"
        groups = [([r], why) for r, why in named.items() if r in rows]
        rest = [r for r in rows if r not in named]
        if rest:
            groups.append((rest, "items whose Fisher is zero in every ingredient (they never entered the histories "
                                 "the Fishers were estimated on, and the output side gave them no mass)"))
        return groups
    if name == POS_TABLE:
        return [(rows, "positions no history in the Fisher sample reached (histories are left-padded, so "
                       "positions before the longest one get no gradient)")]
    return [(rows, "rows where every ingredient's Fisher is zero")]


def explain_fallback(fallback: dict[str, dict], epsilon: float, n_items: int, kind: str) -> list[str]:
    """One line per tensor and cause: which entries fell back and why. `fallback` is
    FisherWeighted.fallback; n_items and kind describe the backbone."""
    lines = []
    for name, rec in sorted(fallback.items()):
        low = rec["entries"] - rec["zero"]
        why_low = f"; {low:,} of them have some mass but below epsilon={epsilon:g}" if low else ""
        if not rec["rows"]:
            lines.append(f"  {name}: {rec['entries']:,} entries where every ingredient's Fisher is zero{why_low}")
            continue
        rows = sorted(rec["rows"])
        for group, why in _row_reasons(name, rows, n_items, kind):
            n = sum(rec["rows"][r] for r in group)
            what = f"row {group[0]}" if len(group) == 1 else f"{len(group):,} rows ({_ranges(group)})"
            lines.append(f"  {name} {what}: {n:,} entries: {why}")
        if why_low:
            lines.append(f"  {name}:{why_low[1:]}")
    return lines


def fallback_summary(fallback: dict[str, dict], total: int, epsilon: float, n_items: int, kind: str) -> str:
    """The whole message: a headline that says what a fallback is, then the lines of explain_fallback."""
    floor = f"below epsilon={epsilon:g}" if epsilon > 0 else "zero"
    head = (f"fisher: {total:,} entries fell back to the weighted average: there Σ λ_i F_i is {floor}, i.e. no "
            f"ingredient's Fisher says anything about them, so the Fisher-weighted mean is undefined")
    return "\n".join([head, *explain_fallback(fallback, epsilon, n_items, kind)])
