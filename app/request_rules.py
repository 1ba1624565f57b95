"""The rules between fields of a job request, written into its JSON Schema so that the OpenAPI document
refuses what the service refuses. Validation itself stays with the specs (workers/specs.py) and the
registries; these functions only describe it, and tests/app/test_openapi_contract.py holds them to it.

JSON Schema cannot compare two values, so "as many weights as models" and "heads divide hidden" are
spelled out per value: one branch per model count (at most 64) and per head count (at most 64).
"""

from __future__ import annotations

from typing import Any

MAX_MODELS = 64  # MergeSpec.model_ids max_length
MAX_HEADS = 64  # TrainSpec.heads le
DEFAULT_HIDDEN, DEFAULT_HEADS = 64, 2  # TrainSpec's defaults, which the rules must hold for too


def inline(schema: dict) -> dict:
    """A pydantic schema with its $defs put in place, to stand alone inside another schema."""
    defs = schema.pop("$defs", {})

    def sub(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return sub(dict(defs[ref.removeprefix("#/$defs/")]))
            return {k: sub(v) for k, v in node.items()}
        return [sub(v) for v in node] if isinstance(node, list) else node

    return sub(schema)


def _when(field: str, value: Any, then: dict) -> dict:
    return {"if": {"properties": {field: {"const": value}}, "required": [field]}, "then": then}


_ABSENT_OR_NULL = {"type": "null"}


def _absent_or_null(field: str) -> dict:
    return {"properties": {field: _ABSENT_OR_NULL}}


def _present(field: str, schema: dict | None = None) -> dict:
    return {"required": [field], "properties": {field: schema or {"not": _ABSENT_OR_NULL}}}


def fisher_settings_schema() -> dict:
    from merging.fisher import FisherSettings
    from merging.item_selection import NEEDS_N

    schema = inline(FisherSettings.model_json_schema())
    schema["allOf"] = [
        {"if": {"properties": {"sampling": {"enum": list(NEEDS_N)}}},
         "then": {"required": ["n"], "properties": {"n": {"type": "integer"}}},
         "else": {"properties": {"n": _ABSENT_OR_NULL}}},
    ]
    return schema


def merge_rules(schema: dict) -> None:
    from merging.methods import METHODS

    props = schema["properties"]
    props["method"] = {**props["method"], "enum": list(METHODS)}
    props["model_ids"]["uniqueItems"] = True
    props["weights"] = {"anyOf": [{"type": "array", "items": {"type": "number", "minimum": 0},
                                   "contains": {"type": "number", "exclusiveMinimum": 0}}, _ABSENT_OR_NULL],
                        "description": "one per model, not all zero (methods with per-model weights)"}
    props["fisher"] = {"anyOf": [fisher_settings_schema(), _ABSENT_OR_NULL], "description": props["fisher"].get(
        "description", "")}
    one_weight_per_model = {"anyOf": [_absent_or_null("weights")] + [
        {"properties": {"model_ids": {"minItems": n, "maxItems": n}, "weights": {"minItems": n, "maxItems": n}}}
        for n in range(1, MAX_MODELS + 1)]}
    rules = [one_weight_per_model]
    for name, cls in METHODS.items():
        then: list[dict] = [{"properties": {"options": inline(cls.Options.model_json_schema())}}]
        if "weight" not in cls.ModelOptions.model_fields:
            then.append(_absent_or_null("weights"))
        then.append(_present("base_model_id", {"type": "string"}) if cls.needs_base
                    else _absent_or_null("base_model_id"))
        if not cls.needs_fisher:
            then.append(_absent_or_null("fisher"))
        rules.append(_when("method", name, {"allOf": then}))
    schema["allOf"] = rules


def train_rules(schema: dict) -> None:
    from models.recipes import RECIPES

    props = schema["properties"]
    props["recipe"] = {**props["recipe"], "enum": list(RECIPES)}
    rules = [_when("recipe", name, {"properties": {"options": inline(cls.Options.model_json_schema())}})
             for name, cls in RECIPES.items()]
    if "recipe" not in schema.get("required", []):  # the default recipe's options when none is named
        default = props["recipe"].get("default")
        rules.append({"if": {"not": {"required": ["recipe"]}},
                      "then": {"properties": {"options": inline(RECIPES[default].Options.model_json_schema())}}})
    for h in range(1, MAX_HEADS + 1):
        then: dict = {"properties": {"hidden": {"multipleOf": h}}}
        if DEFAULT_HIDDEN % h:
            then["required"] = ["hidden"]
        rules.append({"if": {"properties": {"heads": {"const": h}}, "required": ["heads"]}, "then": then})
    rules.append({"if": {"not": {"required": ["heads"]}},
                  "then": {"properties": {"hidden": {"multipleOf": DEFAULT_HEADS}}}})
    schema["allOf"] = rules
