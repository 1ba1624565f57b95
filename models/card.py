"""Model cards: one Markdown page per model — what it is, where it came from, how it was set up, how it
scores beside the models it was made from, and how to make it again. The CLI writes one beside every
merged file; the API serves one per stored model (GET /models/{id}/card). Everything here is plain data
in, text out, so both build a card from what they hold."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from models.checkpoint import CheckpointMeta

COLUMNS = [("valid", "ndcg@10"), ("valid", "hr@10"), ("test", "ndcg@10"), ("test", "hr@10"), ("test", "mrr")]
KIND_TEXT = {"uploaded": "an uploaded checkpoint", "trained": "a model trained by recmerge",
             "merged": "a merge of other models"}


@dataclass
class Ingredient:
    label: str  # a path or a registered model's name
    sha256: str
    recipe: str | None = None
    weight: float | None = None


@dataclass
class CardInput:
    name: str
    kind: str  # uploaded | trained | merged
    meta: CheckpointMeta
    sha256: str
    size: int
    metrics: dict[str, dict] = field(default_factory=dict)  # row label -> {split: {protocol: {metric: value}}}
    ingredients: list[Ingredient] = field(default_factory=list)
    base: Ingredient | None = None
    reproduce: str = ""  # Markdown: the command, request or config that makes this model again
    notes: list[str] = field(default_factory=list)


def _json_block(value) -> str:
    return "```json\n" + json.dumps(value, indent=2, sort_keys=True) + "\n```"


def _recipe_line(recipe: dict) -> str:
    if recipe.get("name") == "merge":  # ingredients of different recipes
        return "a merge of " + ", ".join(sorted({r.get("name", "?") for r in recipe.get("ingredients", [])}))
    options = recipe.get("options")
    return f"`{recipe.get('name', '?')}`" + (f" with {json.dumps(options, sort_keys=True)}" if options else "")


def _metrics_table(metrics: dict[str, dict], protocol: str = "full") -> list[str]:
    have = [(label, m) for label, m in metrics.items() if m]
    if not have:
        return ["No metrics recorded for this model yet."]
    lines = ["| model | " + " | ".join(f"{s} {m}" for s, m in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for label, m in have:
        cells = []
        for split, metric in COLUMNS:
            v = ((m.get(split) or {}).get(protocol) or {}).get(metric)
            cells.append(f"{v:.4f}" if isinstance(v, (int, float)) else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + ["", f"Protocol `{protocol}`: every item ranked, the user's history excluded."]


def render_card(c: CardInput) -> str:
    b, meta = c.meta.backbone, c.meta
    out = [f"# {c.name}", "",
           f"{KIND_TEXT.get(c.kind, c.kind).capitalize()}: a `{b.kind}` sequential recommender over "
           f"{meta.n_items:,} items.", "",
           "## What it is", "",
           f"- file: sha256 `{c.sha256}`, {c.size / 1e6:.2f} MB (safetensors)",
           f"- backbone: {b.kind}, hidden {b.hidden}, layers {b.layers}, heads {b.heads}, inner {b.inner}, "
           f"max_len {b.max_len}, dropout {b.dropout}",
           f"- recipe: {_recipe_line(meta.recipe)}",
           f"- dataset fingerprint: `{meta.dataset_fingerprint}`",
           f"- made by: {meta.created_by}", "",
           "## Lineage", ""]
    merge = meta.merge or {}
    train = json.loads(meta.extra["train"]) if "train" in meta.extra else None
    if c.ingredients:
        out.append(f"Merged with `{merge.get('method', '?')}` from:")
        out += ["", "| # | ingredient | sha256 | recipe | weight |", "|---:|---|---|---|---:|"]
        for i, ing in enumerate(c.ingredients, 1):
            w = "–" if ing.weight is None else f"{ing.weight:g}"
            out.append(f"| {i} | {ing.label} | `{ing.sha256[:16]}` | {ing.recipe or '–'} | {w} |")
        out.append("")
        if c.base is not None:
            out += [f"Task vectors are taken against the base {c.base.label} (`{c.base.sha256[:16]}`).", ""]
        if "selection" in merge:
            kept = ", ".join(c.ingredients[i].label for i in merge["selection"].get("kept", []))
            out += [f"Greedy soup kept: {kept}.", ""]
        if "finetune" in merge:
            ft = merge["finetune"]
            out += [f"Then fine-tuned {ft.get('epochs')} epoch(s) with `{ft.get('recipe')}` from the merge "
                    f"(`{str(ft.get('from_sha256', ''))[:16]}`).", ""]
    elif train is not None:
        init = (train.get("config") or {}).get("init")
        out += [f"Trained by recmerge{' from ' + repr(init) if init else ' from scratch'}: "
                f"{train.get('epochs_run')} epoch(s) run, best validation at epoch {train.get('best_epoch')}.", ""]
    else:
        out += ["Uploaded as a finished checkpoint: recmerge knows no more of its history than its header.", ""]
    out += c.notes + ([""] if c.notes else [])
    out += ["## Options", ""]
    if merge:
        opts = {k: merge[k] for k in ("options", "weights", "fisher_norms") if k in merge}
        settings = [f.get("settings") for f in merge.get("fishers", [])]
        if settings and all(s == settings[0] for s in settings):
            opts["fisher_settings"] = json.loads(settings[0]) if isinstance(settings[0], str) else settings[0]
        out += [_json_block(opts), ""]
    elif train is not None:
        out += [_json_block(train.get("config") or {}), ""]
    else:
        out += [_json_block({"recipe": meta.recipe}), ""]
    out += ["## Metrics", "", *_metrics_table(c.metrics), "", "## Reproduce", "",
            c.reproduce or "Not reproducible from recmerge alone: the file was made elsewhere.", ""]
    return "\n".join(out)
