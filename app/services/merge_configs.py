"""POST /merge-jobs takes either the job's own JSON (core.specs.MergeSpec) or a merge config, the
document `recmerge merge --config` reads (merging/config.py), as JSON or YAML. A config names registered
models by id; the job fields that are not part of a merge recipe (name, evaluate, finetune_epochs,
protocols) may sit beside it."""

from __future__ import annotations

from core.specs import MergeSpec
from merging.config import FISHER_FILE, ConfigError, load_document, parse_config

JOB_FIELDS = ("name", "evaluate", "finetune_epochs", "protocols")
MAX_DOCUMENT_BYTES = 256 * 1024  # a config is a few hundred bytes; YAML is not parsed beyond this


def read_document(body: bytes, content_type: str) -> dict:
    """The request body as a dict: YAML when the content type says so, JSON otherwise."""
    if len(body) > MAX_DOCUMENT_BYTES:
        raise ConfigError([{"loc": "", "msg": f"larger than {MAX_DOCUMENT_BYTES} bytes"}], "request body")
    if "yaml" in content_type.lower():
        return load_document(body, "request body")
    import json

    try:
        doc = json.loads(body)
    except ValueError as e:
        raise ConfigError([{"loc": "", "msg": f"not JSON ({e}); send YAML as application/yaml"}],
                          "request body") from None
    if not isinstance(doc, dict):
        raise ConfigError([{"loc": "", "msg": "expected a JSON object"}], "request body")
    return doc


def is_config(doc: dict) -> bool:
    return "merge_method" in doc


def spec_from_config(doc: dict) -> MergeSpec:
    """The merge job a config asks for. Raises ConfigError (its fields) or pydantic's ValidationError (the
    job fields beside it)."""
    doc = dict(doc)
    job = {k: doc.pop(k) for k in JOB_FIELDS if k in doc}
    cfg = parse_config(doc)
    errors = [{"loc": f"models.{i}.parameters.{FISHER_FILE}",
               "msg": "the service estimates Fishers itself (and caches them); leave Fisher files out"}
              for i, m in enumerate(cfg.models) if FISHER_FILE in m.parameters]
    if cfg.dataset is not None:
        errors.append({"loc": "dataset", "msg": "the service merges on the models' own dataset; leave it out"})
    if errors:
        raise ConfigError(errors)
    fisher = cfg.fisher_settings()
    return MergeSpec.model_validate({
        "method": cfg.merge_method, "model_ids": [m.model for m in cfg.models], "weights": cfg.weights,
        "base_model_id": cfg.base_model, "options": cfg.parameters,
        "fisher": fisher.model_dump() if fisher is not None else None, **job})
