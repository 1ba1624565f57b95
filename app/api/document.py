"""The OpenAPI document as this server answers: built by FastAPI, then corrected where FastAPI cannot know.

- Every refusal carries the one error body (app/api/errors.py), FastAPI's own 422 included.
- A route asks for a token only when its door has one (RECMERGE_API_TOKEN, _READ_TOKEN,
  _RECOMMEND_TOKEN); an open door documents neither the security requirement nor a 401.
- Form fields: a form cannot send null, so an optional field is one that may be left out.
- Request bodies whose fields depend on each other: the fields once, then an `anyOf` with one branch
  per case (per merge method and option variant, per recipe, per way of naming a dataset) saying what
  that case asks of them. One level of plain branches, no nested allOf/anyOf trees: the shape
  schemathesis and other generators can draw from. Rules JSON Schema can state only by spelling out
  every value (as many weights as models, heads dividing hidden, a model listed once, low below high)
  are in the descriptions. The specs and registries check them all (422).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from fastapi import FastAPI

from app.api.access import accepted_tokens, flat_routes, route_door
from app.api.errors import WHY

ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_NULL = {"type": "null"}
MAX_MODELS = 64  # MergeSpec.model_ids and MergeConfig.models max_length
JOB_FIELDS_DOC = "name, evaluate, finetune_epochs and protocols as in the job's own JSON"


def inline(schema: dict) -> dict:
    """A pydantic JSON schema with its $defs put in place, to stand alone inside another schema."""
    defs = schema.pop("$defs", {})

    def sub(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return sub(dict(defs[ref.removeprefix("#/$defs/")]))
            return {k: sub(v) for k, v in node.items()}
        return [sub(v) for v in node] if isinstance(node, list) else node

    return sub(schema)


def _obj(properties: dict, required: list[str], description: str | None = None) -> dict:
    out = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    if description:
        out["description"] = description
    return out


def _without_null(schema: dict) -> dict:
    """`X | None` as pydantic writes it (anyOf [X, null]) -> X, keeping the annotations."""
    branches = schema.get("anyOf")
    if not branches or _NULL not in branches:
        return schema
    rest = [b for b in branches if b != _NULL]
    out = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    if len(rest) == 1:
        out.update(rest[0])
    else:
        out["anyOf"] = rest
    return out


# --- Fisher settings ------------------------------------------------------------------------------
def _fisher_branches(*, sampling_required: bool) -> list[dict]:
    """FisherSettings: n is given exactly for the samplings that draw n items per sequence."""
    from merging.fisher import FisherSettings
    from merging.item_selection import NEEDS_N, SAMPLINGS

    base = inline(FisherSettings.model_json_schema())
    props = {k: _without_null(v) for k, v in base["properties"].items()}
    if not sampling_required:  # a merge config's fisher: MERGE_DEFAULTS fill in, max_users "all" means every user
        props["max_users"] = {"anyOf": [props["max_users"], {"enum": ["all", "none"]}, _NULL],
                              "description": props["max_users"].get("description", "")}
    else:
        props["max_users"] = {"anyOf": [props["max_users"], _NULL],
                              "description": props["max_users"].get("description", "")}
    with_n = {**props, "sampling": {"type": "string", "enum": list(NEEDS_N)},
              "n": {"type": "integer", "minimum": 1, "description": props["n"].get("description", "")}}
    without_n = {**{k: v for k, v in props.items() if k != "n"},
                 "sampling": {"type": "string", "enum": [s for s in SAMPLINGS if s not in NEEDS_N]},
                 "n": _NULL}
    out = [_obj(with_n, ["sampling", "n"], "a sampling that draws n items per sequence, and n"),
           _obj(without_n, ["sampling"], "exact or target: no n")]
    if not sampling_required:
        default_sampling = {k: v for k, v in with_n.items() if k != "sampling"}
        out.append(_obj(default_sampling, [], "the merge defaults' sampling (topk), n and max_users overridable"))
    return out


# --- merge jobs -----------------------------------------------------------------------------------
def _job_fields() -> dict:
    from core.specs import MergeSpec

    props = inline(MergeSpec.model_json_schema())["properties"]
    return {k: props[k] for k in ("finetune_epochs", "evaluate", "protocols", "name")}


def _takes_weights(cls) -> bool:
    return "weight" in cls.ModelOptions.model_fields


# Rules of a method's options that its own validators check and no registry attribute states, keyed by
# (method, the value of the option that splits it): they narrow that variant's branch.
def _weight_search_over_weights(options: dict) -> tuple[dict, int]:
    props = options["properties"]
    for name in ("low", "high"):  # they set the task-vector interval; weights are searched in [0, 1]
        props[name] = {**props[name], "const": props[name]["default"]}
    return options, 2  # weights are searched between at least two models


def _weight_search_over_task_vectors(options: dict) -> tuple[dict, int]:
    options["description"] = "low must be below high"
    return options, 1


_OPTION_RULES = {("weight-search", "average"): _weight_search_over_weights,
                 ("weight-search", "fisher"): _weight_search_over_weights,
                 ("weight-search", "task-vectors"): _weight_search_over_task_vectors}


def method_variants(name: str, cls) -> list[tuple[dict, bool, bool, int]]:
    """(options schema, base model used, Fishers used, fewest models) for each way a method's options change
    what else it needs: one variant, unless an option with a fixed set of values decides whether it works
    on task vectors (`base_use`) or weighs by Fishers (`fisher_use`), and then one per value."""
    options = inline(cls.Options.model_json_schema())
    for field, prop in options.get("properties", {}).items():
        uses = {v: (cls.base_use({field: v}), cls.fisher_use({field: v})) for v in prop.get("enum", [])}
        if len(set(uses.values())) < 2:
            continue
        out = []
        for value, (base, fisher) in uses.items():
            variant = copy.deepcopy(options)
            variant["properties"][field] = {k: v for k, v in prop.items() if k != "enum"} | {"const": value}
            if value != prop.get("default"):
                variant["required"] = [*variant.get("required", []), field]
            rule = _OPTION_RULES.get((name, value))
            variant, fewest = rule(variant) if rule else (variant, 1)
            out.append((variant, base, fisher, fewest))
        return out
    return [(options, cls.base_use({}), cls.fisher_use({}), 1)]


def _merge_spec_branch(name: str, cls, options: dict, base: bool, fisher: bool, fewest: int) -> dict:
    """What method `name`, with options of this variant, asks of the other fields."""
    props: dict[str, Any] = {"method": {"const": name}, "options": options}
    if fewest > 1:
        props["model_ids"] = {"minItems": fewest}
    if _takes_weights(cls):
        props["weights"] = {"anyOf": [{"type": "array", "items": {"type": "number", "minimum": 0},
                                       "minItems": 1, "maxItems": MAX_MODELS,
                                       "contains": {"type": "number", "exclusiveMinimum": 0}}, _NULL]}
    else:
        props["weights"] = _NULL
    props["base_model_id"] = {"type": "string"} if base else _NULL
    props["fisher"] = {"anyOf": [*_fisher_branches(sampling_required=True), _NULL]} if fisher else _NULL
    # An option that must be named (the variant's own value) makes the options object itself required.
    required = ["method", "model_ids", *(["base_model_id"] if base else []),
                *(["options"] if options.get("required") else [])]
    return {"properties": props, "required": required}


def _grouped(branches: list[tuple[str, dict]], key: str) -> list[dict]:
    """Methods that ask the same of every other field share one branch (fewer branches, fewer cases to
    cover), in registry order."""
    groups: dict[str, tuple[list[str], dict]] = {}
    for name, branch in branches:
        rest = {**branch, "properties": {k: v for k, v in branch["properties"].items() if k != key}}
        names, _ = groups.setdefault(json.dumps(rest, sort_keys=True), ([], rest))
        names.append(name)
    out = []
    for names, rest in groups.values():
        chosen = {"const": names[0]} if len(names) == 1 else {"enum": names}
        out.append({**rest, "properties": {key: chosen, **rest["properties"]}})
    return out


def _merge_spec() -> dict:
    from core.specs import MergeSpec
    from merging.methods import METHODS

    spec = inline(MergeSpec.model_json_schema())["properties"]
    weighted = [n for n, c in METHODS.items() if _takes_weights(c)]
    based = [n for n, c in METHODS.items() if any(v[1] for v in method_variants(n, c))]
    fishers = [n for n, c in METHODS.items() if any(v[2] for v in method_variants(n, c))]
    props: dict[str, Any] = {
        "method": {"type": "string", "enum": list(METHODS), "description": "; ".join(
            f"{n}: {c.summary}" for n, c in METHODS.items())},
        "model_ids": {**spec["model_ids"], "uniqueItems": True, "description": "the models to merge, each once"},
        # The method decides these (the branches below); here they are only named.
        "weights": {"description": f"one weight per model, in the order of model_ids, not all zero "
                                   f"(default: equal weights); {', '.join(weighted)} only"},
        "base_model_id": {"description": f"the model the task vectors start from: {', '.join(based)} need one, "
                                         "the others take none"},
        "options": {"type": "object", "description": "the method's options"},
        "fisher": {"description": f"how to estimate the Fishers: {', '.join(fishers)} (as its options say) only "
                                  "(default: sampling model, n 8)"},
        **_job_fields(),
    }
    out = _obj(props, ["method", "model_ids"], "the merge job's own JSON")
    out["anyOf"] = _grouped([(n, _merge_spec_branch(n, c, *v)) for n, c in METHODS.items()
                             for v in method_variants(n, c)], "method")
    return out


def _merge_config_branch(name: str, cls, options: dict, base: bool, fisher: bool, fewest: int) -> dict:
    model_params = inline(cls.ModelOptions.model_json_schema())
    entry = _obj({"model": {"type": "string", "minLength": 1, "description": "a model id"},
                  "parameters": model_params}, ["model"])
    models: dict[str, Any] = {"items": entry, **({"minItems": fewest} if fewest > 1 else {})}
    if _takes_weights(cls):  # a weight left out counts as 1, so one entry without a zero weight is enough
        models["contains"] = {"type": "object", "properties": {"parameters": {
            "type": "object", "properties": {"weight": {"type": "number", "exclusiveMinimum": 0}}}}}
    props: dict[str, Any] = {
        "merge_method": {"const": name},
        "models": models,
        "parameters": options,
        "base_model": {"type": "string"} if base else _NULL,
        "fisher": {"anyOf": [*_fisher_branches(sampling_required=False), _NULL]} if fisher else _NULL,
    }
    required = ["merge_method", "models", *(["base_model"] if base else []),
                *(["parameters"] if options.get("required") else [])]
    return {"properties": props, "required": required}


def _merge_config(job: bool) -> dict:
    from merging.config import MergeConfig
    from merging.methods import METHODS

    cfg = inline(MergeConfig.model_json_schema())["properties"]
    props: dict[str, Any] = {
        "merge_method": {"type": "string", "enum": list(METHODS)},
        "models": {**cfg["models"], "items": {"type": "object"},
                   "description": "the models to merge, each model once, with per-model parameters (weight, "
                                  "for the methods that take one; not every weight zero)"},
        "parameters": {"type": "object", "description": "the method's global options"},
        "base_model": {"description": "the model id the task vectors start from (the methods that need one)"},
        "fisher": {"description": "Fisher estimation settings over the merge defaults (the methods that weigh "
                                  "by Fishers)"},
        "dataset": {**_NULL, "description": "the service merges on the models' own dataset"},
        **(_job_fields() if job else {}),
    }
    out = _obj(props, ["merge_method", "models"], "a merge config" + (f", with the job fields ({JOB_FIELDS_DOC})"
                                                                     if job else ""))
    out["anyOf"] = _grouped([(n, _merge_config_branch(n, c, *v)) for n, c in METHODS.items()
                             for v in method_variants(n, c)], "merge_method")
    return out


def merge_request_schemas() -> tuple[dict, dict]:
    """(JSON body, YAML body) of POST /merge-jobs."""
    return {"anyOf": [_merge_spec(), _merge_config(job=True)]}, _merge_config(job=True)


# --- train jobs -----------------------------------------------------------------------------------
def train_request_schema() -> dict:
    from core.specs import TrainSpec
    from models.config import design_help
    from models.recipes import RECIPES

    base = inline(TrainSpec.model_json_schema())
    # null: no start model / name / budget, or for a design field the backbone's own value
    nullable = ("init_model_id", "name", "max_minutes", "heads", "inner", "dropout", "activation")
    props = {k: _without_null(v) if k not in nullable else v for k, v in base["properties"].items()}
    props["heads"] = {**props["heads"], "description": f"attention heads; must divide hidden; null: "
                      f"{design_help('heads')}"}
    props["hidden"] = {**props["hidden"], "description": "hidden size; a multiple of heads"}
    default = base["properties"]["recipe"]["default"]
    props["recipe"] = {"type": "string", "enum": list(RECIPES), "default": default}
    branches = []
    for name, cls in RECIPES.items():
        recipe = {"const": name}
        branch = {"properties": {"recipe": recipe, "options": inline(cls.Options.model_json_schema())}}
        if name != default:
            branch["required"] = ["recipe"]
        branches.append(branch)
    out = _obj(props, ["dataset_id"], "a training job; hidden must be a multiple of heads (422 otherwise)")
    out["anyOf"] = branches
    return out


# --- events ---------------------------------------------------------------------------------------
def events_request_schema(model_schema: dict) -> dict:
    props = model_schema["properties"]
    items = props["items"]
    by_dataset = _obj({"items": items, "dataset_id": _without_null(props["dataset_id"]),
                       "model": {**_NULL, "description": "name the dataset or a model, not both"}},
                      ["items", "dataset_id"], "the dataset named by id")
    by_model = _obj({"items": items, "model": _without_null(props["model"]),
                     "dataset_id": {**_NULL, "description": "name the dataset or a model, not both"}},
                    ["items", "model"], "the dataset of a model (id or alias)")
    return {"anyOf": [by_dataset, by_model], "description": model_schema.get("description", "")}


# --- the document ---------------------------------------------------------------------------------
def _resolve(doc: dict, schema: dict) -> dict:
    ref = schema.get("$ref", "")
    return doc["components"]["schemas"][ref.removeprefix("#/components/schemas/")] if ref else schema


def _one_error_body(doc: dict) -> None:
    for item in doc.get("paths", {}).values():
        for op in item.values():
            answer = op.get("responses", {}).get("422")
            if answer is not None:
                answer["content"] = {"application/json": {"schema": dict(ERROR_REF)}}
                answer["description"] = WHY[422]
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _doors(doc: dict, app: FastAPI) -> None:
    from app.api.deps import DOORS

    settings = app.state.settings
    for route in flat_routes(app.router.routes):
        door = route_door(route, DOORS)
        item = doc.get("paths", {}).get(getattr(route, "path_format", None), {})
        for method in getattr(route, "methods", None) or ():
            op = item.get(method.lower())
            if op is None:
                continue
            if door is None or accepted_tokens(settings, door) is None:
                op.pop("security", None)
                op.get("responses", {}).pop("401", None)


def _forms(doc: dict) -> None:
    for item in doc.get("paths", {}).values():
        for op in item.values():
            form = op.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if form is None:
                continue
            schema = _resolve(doc, form["schema"])
            required = set(schema.get("required", []))
            for name, prop in list(schema.get("properties", {}).items()):
                if name not in required:
                    schema["properties"][name] = _without_null(prop)


def _bodies(doc: dict) -> None:
    from app.schemas import EventsCreate

    paths = doc.get("paths", {})
    merge_json, merge_yaml = merge_request_schemas()
    content = paths["/merge-jobs"]["post"]["requestBody"]["content"]
    content["application/json"]["schema"] = merge_json
    content["application/yaml"]["schema"] = merge_yaml
    paths["/train-jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"] = train_request_schema()
    events = paths["/users/{user}/events"]["post"]["requestBody"]["content"]["application/json"]
    events["schema"] = events_request_schema(EventsCreate.model_json_schema())
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("TrainSpec", "MergeSpec", "EventsCreate", "FisherSettings"):
        if not _still_referenced(doc, name):
            schemas.pop(name, None)


def _still_referenced(doc: dict, name: str) -> bool:
    return f'"#/components/schemas/{name}"' in json.dumps(doc)


def build(app: FastAPI, built: dict) -> dict:
    doc = copy.deepcopy(built)
    _one_error_body(doc)
    _doors(doc, app)
    _forms(doc)
    _bodies(doc)
    return doc


def install(app: FastAPI) -> None:
    make = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, make())
        return app.openapi_schema

    app.openapi = openapi
