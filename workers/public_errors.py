"""Job errors as clients read them: every server path (store objects, scratch, the data directory)
replaced by the name of the input it holds, so an error names the model or dataset, never a path."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

_SHA256 = re.compile(r"[0-9a-f]{64}")


class PathLabels:
    """Recently resolved artifact paths and what they are ("model <id> (<name>)"), most recent kept."""

    def __init__(self, keep: int = 512):
        self._labels: OrderedDict[str, str] = OrderedDict()
        self._keep = keep

    def add(self, path: str | Path, label: str) -> None:
        self._labels[str(path)] = label
        self._labels.move_to_end(str(path))
        while len(self._labels) > self._keep:
            self._labels.popitem(last=False)

    def items(self) -> list[tuple[str, str]]:
        return list(self._labels.items())


def public_error(text: str, labels: list[tuple[str, str]], roots: list[str | Path]) -> str:
    """`text` with each labelled path replaced by its label, then any other path under one of `roots`
    by "artifact <sha256 prefix>" (a store object) or "a server file"."""
    for path, label in sorted(labels, key=lambda pl: -len(pl[0])):  # a longer path before its prefix
        text = text.replace(path, label)

    def unnamed(m: re.Match) -> str:
        sha = _SHA256.search(Path(m.group(0)).name)
        return f"artifact {sha.group(0)[:12]}" if sha else "a server file"

    for root in sorted({str(r) for r in roots if str(r) not in ("", "/")}, key=len, reverse=True):
        text = re.sub(re.escape(root) + r"[^\s'\",;:)\]]*", unnamed, text)
    return text
