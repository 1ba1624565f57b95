"""Markdown to HTML for model cards, covering only what models/card.py writes: headings, paragraphs,
bullet lists, fenced code, pipe tables, `code` and **bold**. Everything is escaped before any tag is
added, so a model name or option value can never become markup."""

from __future__ import annotations

import re
from html import escape

_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def inline(text: str) -> str:
    # Code spans first, kept aside, so ** inside them stays literal.
    spans: list[str] = []

    def keep(m: re.Match) -> str:
        spans.append(f"<code>{escape(m.group(1))}</code>")
        return f"\x00{len(spans) - 1}\x00"

    out = _BOLD.sub(r"<strong>\1</strong>", escape(_CODE.sub(keep, text)))
    return re.sub("\x00(\\d+)\x00", lambda m: spans[int(m.group(1))], out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    head, rule, body = _cells(lines[0]), _cells(lines[1]), [_cells(x) for x in lines[2:]]
    right = [c.endswith(":") for c in rule]

    def row(cells: list[str], tag: str) -> str:
        return "<tr>" + "".join(f'<{tag}{" class=num" if i < len(right) and right[i] else ""}>{inline(c)}</{tag}>'
                                for i, c in enumerate(cells)) + "</tr>"

    return ("<table><thead>" + row(head, "th") + "</thead><tbody>" + "".join(row(r, "td") for r in body)
            + "</tbody></table>")


def _is_rule(line: str) -> bool:
    return bool(re.fullmatch(r"\s*\|?(\s*:?-+:?\s*\|)*\s*:?-+:?\s*\|?\s*", line))


def render(md: str, shift: int = 0) -> str:
    """`shift` moves headings down (1: # becomes <h2>) to nest the document under a page's own heading."""
    lines = md.splitlines()
    out: list[str] = []
    para: list[str] = []
    i = 0

    def flush() -> None:
        if para:
            out.append("<p>" + inline(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            lang = stripped[3:].strip()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            cls = f' class="lang-{escape(lang)}"' if lang else ""
            out.append(f"<pre><code{cls}>" + escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
            continue
        if m := re.match(r"(#{1,6})\s+(.*)", stripped):
            flush()
            level = min(len(m.group(1)) + shift, 6)
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
        elif stripped.startswith("|") and i + 1 < len(lines) and _is_rule(lines[i + 1]):
            flush()
            j = i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                j += 1
            out.append(_table(lines[i:j]))
            i = j
            continue
        elif re.match(r"[-*]\s+", stripped):
            flush()
            items = []
            while i < len(lines) and re.match(r"\s*[-*]\s+", lines[i]):
                items.append("<li>" + inline(re.sub(r"^\s*[-*]\s+", "", lines[i])) + "</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif not stripped:
            flush()
        else:
            para.append(stripped)
        i += 1
    flush()
    return "\n".join(out)
