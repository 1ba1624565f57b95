"""Merge configs as files: the document a mergekit user would write, plus recmerge's Fisher settings.

    merge_method: fisher
    models:
      - model: runs/duorec.safetensors          # a path (CLI) or a registered model's id (API)
        parameters: {weight: 0.6}
      - model: runs/ehrec.safetensors
        parameters: {weight: 0.4}               # also `fisher: F.safetensors`, a Fisher computed before
    base_model: null                            # task-vector methods (task-arithmetic, ties, dare, ...)
    parameters: {normalize: true}               # the method's global options
    fisher: {sampling: topk, n: 10}             # how missing Fishers are estimated (merging.fisher)
    dataset: data/ml-100k                       # prepared dataset (Fisher estimation, the methods
                                                # choosing on data: greedy-soup, weight-search, ...)

`parse_config` validates everything it can before any work and reports every problem at its field
(`models.1.parameters.weight: ...`). `MergeConfig.record()` is the canonical form, with every default
filled in: it is what a merged checkpoint stores, and running it again gives the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merging.fisher import FisherSettings, merge_settings
from merging.methods import METHODS
from models.errors import RecmergeError

FISHER_FILE = "fisher"  # the per-model parameter naming a precomputed Fisher file


class ConfigError(RecmergeError):
    """An invalid merge config; `errors` holds every problem as {"loc": "models.1.parameters.weight", "msg"}."""

    def __init__(self, errors: list[dict[str, str]], source: str = "merge config"):
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(f"{e['loc']}: {e['msg']}" if e["loc"] else e["msg"]
                                                   for e in errors))


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="checkpoint path (CLI) or model id (API)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="per-model options, e.g. weight")


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[ModelEntry] = Field(min_length=1, max_length=64)
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict, description="the method's global options")
    fisher: dict[str, Any] | None = Field(None, description="Fisher estimation settings (method fisher, "
                                                            "weight-search with combine fisher)")
    dataset: str | None = Field(None, description="prepared dataset directory")

    @property
    def method(self):
        return METHODS[self.merge_method]

    @property
    def weights(self) -> list[float] | None:
        if not any("weight" in m.parameters for m in self.models):
            return None
        return [float(m.parameters.get("weight", 1.0)) for m in self.models]

    @property
    def fisher_files(self) -> list[str] | None:
        files = [m.parameters.get(FISHER_FILE) for m in self.models]
        return None if all(f is None for f in files) else files

    def fisher_settings(self) -> FisherSettings | None:
        """The settings missing Fishers are estimated with (None when every Fisher is a given file)."""
        if not self.method.fisher_use(self.parameters) or self.fisher_files is not None:
            return None
        return FisherSettings.model_validate(merge_settings(self.fisher or {}))

    def record(self) -> dict:
        """The canonical document: every option at its value, defaults included, in a fixed key order."""
        cls = self.method
        models = []
        for m in self.models:
            params = cls.ModelOptions.model_validate(_without_file(m.parameters)).model_dump()
            if FISHER_FILE in m.parameters:
                params[FISHER_FILE] = m.parameters[FISHER_FILE]
            models.append({"model": m.model, "parameters": params})
        fs = self.fisher_settings()
        # The dataset is part of the recipe only where the merge reads it (Fisher estimation, the methods that
        # choose on data).
        uses_data = fs is not None or cls.uses_data()
        return {"merge_method": self.merge_method, "models": models, "base_model": self.base_model,
                "parameters": cls.Options.model_validate(self.parameters).model_dump(),
                "fisher": fs.model_dump() if fs is not None else None,
                "dataset": self.dataset if uses_data else None}


def _without_file(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != FISHER_FILE}


def _errors(e: ValidationError, prefix: str) -> list[dict[str, str]]:
    out = []
    for err in e.errors():
        loc = ".".join([prefix, *map(str, err["loc"])] if prefix else map(str, err["loc"]))
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        out.append({"loc": loc, "msg": msg})
    return out


def load_document(text: str | bytes, source: str = "merge config") -> dict:
    """A YAML or JSON document (JSON is read as YAML too) as a dict."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([{"loc": "", "msg": f"not YAML or JSON ({str(e).splitlines()[0]})"}], source) from None
    if not isinstance(doc, dict):
        raise ConfigError([{"loc": "", "msg": "expected a mapping with merge_method and models"}], source)
    return doc


def parse_config(doc: dict, source: str = "merge config", needs_files: bool = False) -> MergeConfig:
    """A validated MergeConfig, or ConfigError listing every invalid field. `needs_files`: the models are
    paths that must exist (the CLI); the API checks its ids itself."""
    try:
        cfg = MergeConfig.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(_errors(e, ""), source) from None
    errors = []
    cls = METHODS.get(cfg.merge_method)
    if cls is None:
        raise ConfigError([{"loc": "merge_method", "msg": f"unknown method {cfg.merge_method!r}; known: "
                                                          f"{', '.join(METHODS)}"}], source)
    uses_fisher = cls.fisher_use(cfg.parameters)
    try:
        cls.Options.model_validate(cfg.parameters)
    except ValidationError as e:
        errors += _errors(e, "parameters")
    for i, m in enumerate(cfg.models):
        try:
            cls.ModelOptions.model_validate(_without_file(m.parameters))
        except ValidationError as e:
            errors += _errors(e, f"models.{i}.parameters")
        if FISHER_FILE in m.parameters and not uses_fisher:
            errors.append({"loc": f"models.{i}.parameters.{FISHER_FILE}", "msg": f"{cfg.merge_method} uses no Fisher"})
        if needs_files and not Path(m.model).is_file():
            errors.append({"loc": f"models.{i}.model", "msg": f"{m.model}: no such file"})
    files = cfg.fisher_files
    if files is not None and None in files:
        errors.append({"loc": "models", "msg": "give a fisher file for every model or for none"})
    uses_base = cls.base_use(cfg.parameters)
    if uses_base and cfg.base_model is None:
        errors.append({"loc": "base_model",
                       "msg": f"{cfg.merge_method} works on task vectors and needs a base checkpoint"})
    if not uses_base and cfg.base_model is not None:
        errors.append({"loc": "base_model", "msg": f"{cfg.merge_method} does not use a base model"})
    if needs_files and cfg.base_model is not None and not Path(cfg.base_model).is_file():
        errors.append({"loc": "base_model", "msg": f"{cfg.base_model}: no such file"})
    if cfg.fisher is not None:
        if not uses_fisher:
            errors.append({"loc": "fisher", "msg": f"{cfg.merge_method} uses no Fisher"})
        elif files is not None:
            errors.append({"loc": "fisher", "msg": "settings for estimating Fishers, but every model gives a file"})
        else:
            try:
                FisherSettings.model_validate(merge_settings(cfg.fisher))
            except ValidationError as e:
                errors += _errors(e, "fisher")
    weights = cfg.weights if not errors else None  # a weight that is not a number is already an error above
    if weights is not None and sum(weights) <= 0:
        errors.append({"loc": "models", "msg": "the weights sum to 0; at least one must be positive"})
    if errors:
        raise ConfigError(errors, source)
    return cfg



def record_of(method: str, models: list[str], weights: list[float] | None, options: dict, base: str | None,
              fisher: dict | None, dataset: str | None = None) -> dict:
    """The canonical config of a merge described by its parts (a job's request, say)."""
    doc = {"merge_method": method, "base_model": base, "parameters": options, "fisher": fisher, "dataset": dataset,
           "models": [{"model": m, "parameters": {} if weights is None else {"weight": w}}
                      for m, w in zip(models, weights or [None] * len(models))]}
    return parse_config(doc).record()
