"""A corpus of checkpoints whose safetensors header lies: each one is made from a real checkpoint's bytes by
changing its header (and sometimes its data), so everything else about it is as believable as possible.

`lying_checkpoints(good)` -> [(case name, file bytes)]; every case must be refused by checkpoint admission.
The backbone cases are generated from BackboneConfig's own fields, so a field added later is fuzzed too.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import typing

from models.config import BackboneConfig


def split(content: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", content[:8])
    return json.loads(content[8 : 8 + n]), content[8 + n :]


def join(header: dict | str | bytes, data: bytes) -> bytes:
    blob = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def _with_meta(header: dict, data: bytes, **changes) -> bytes:
    h = json.loads(json.dumps(header))
    for k, v in changes.items():
        if v is None:
            h["__metadata__"].pop(k, None)
        else:
            h["__metadata__"][k] = v
    return join(h, data)


def _with_backbone(header: dict, data: bytes, **changes) -> bytes:
    backbone = json.loads(header["__metadata__"]["backbone"])
    backbone.update(changes)
    extra = {}
    if "n_items" in changes and isinstance(changes["n_items"], int):
        extra["n_items"] = str(changes["n_items"])  # the outer field agrees, so only the tensors can refute it
    text = json.dumps(backbone, allow_nan=True)
    return _with_meta(header, data, backbone=text, **extra)


_INT_LIES = [1_000_000, 10**9, 10**18, -1, 0, 1e9, "64", None, True, [2]]
_FLOAT_LIES = [1e308, -1.0, float("nan"), float("inf"), "0.1", None, [0.1]]
_STR_LIES = ["x" * 10_000, 5, None, "transformer"]
_BOOL_LIES = ["yes", 2, None]


def backbone_field_cases(header: dict, data: bytes) -> list[tuple[str, bytes]]:
    true = json.loads(header["__metadata__"]["backbone"])
    types = typing.get_type_hints(BackboneConfig)
    cases = []
    for f in dataclasses.fields(BackboneConfig):
        want = types[f.name]
        lies = {int: _INT_LIES, float: _FLOAT_LIES, str: _STR_LIES, bool: _BOOL_LIES}.get(want, [None, [1], "?" * 500])
        for value in lies:
            if value == true.get(f.name) and type(value) is type(true.get(f.name)):
                continue
            cases.append((f"backbone-{f.name}={str(value)[:12]}", _with_backbone(header, data, **{f.name: value})))
    return cases


def lying_checkpoints(good: bytes) -> list[tuple[str, bytes]]:
    header, data = split(good)
    names = [k for k in header if k != "__metadata__"]
    by_offset = sorted(names, key=lambda k: header[k]["data_offsets"][0])
    bias = "out_bias" if "out_bias" in header else by_offset[-1]

    def entry(name, **changes):
        h = json.loads(json.dumps(header))
        h[name].update(changes)
        return h

    cases = [
        # dtypes: an int32 tensor of the same byte size (its offsets stay right), a half tensor among floats
        ("int32-bias", join(entry(bias, dtype="I32"), data)),
        ("uint8-everything", join({k: ({**v, "dtype": "U8", "shape": [v["data_offsets"][1] - v["data_offsets"][0]]}
                                      if k != "__metadata__" else v) for k, v in header.items()}, data)),
        ("unknown-dtype", join(entry(bias, dtype="Q99"), data)),
        ("f64-without-the-bytes", join(entry(bias, dtype="F64"), data)),
        # the issue's own cases
        ("layers=1000000", _with_backbone(header, data, layers=1_000_000)),
        ("hidden=1e9,max_len=1e9", _with_backbone(header, data, hidden=1e9, max_len=1e9)),
        ("hidden=10**9,max_len=10**9", _with_backbone(header, data, hidden=10**9, max_len=10**9)),
        ("n_items=10**9", _with_backbone(header, data, n_items=10**9)),
        ("heads=0", _with_backbone(header, data, heads=0)),
        ("layers=3", _with_backbone(header, data, layers=json.loads(header["__metadata__"]["backbone"])["layers"] + 1)),
        # shapes
        ("shape-huge", join(entry(bias, shape=[10**9, 10**9]), data)),
        ("shape-zero-dim-huge", join(entry(bias, shape=[0, 10**12], data_offsets=[header[bias]["data_offsets"][0]] * 2),
                                     data)),
        ("shape-negative", join(entry(bias, shape=[-4]), data)),
        ("shape-float", join(entry(bias, shape=[1.5]), data)),
        ("shape-string", join(entry(bias, shape="30"), data)),
        ("shape-9-dims", join(entry(bias, shape=[1] * 9), data)),
        *[(f"shape-transposed-{k}", join(entry(k, shape=list(reversed(header[k]["shape"]))), data))
          for k in names if len(set(header[k]["shape"])) > 1][:1],
        # offsets
        ("offsets-overlap", join(entry(by_offset[1], data_offsets=header[by_offset[0]]["data_offsets"]), data)),
        ("offsets-past-end", join(entry(bias, data_offsets=[len(data), len(data) + 4 * header[bias]["shape"][0]]),
                                  data)),
        ("offsets-reversed", join(entry(bias, data_offsets=list(reversed(header[bias]["data_offsets"]))), data)),
        ("offsets-negative", join(entry(bias, data_offsets=[-8, header[bias]["data_offsets"][1]]), data)),
        ("offsets-huge", join(entry(bias, data_offsets=[2**62, 2**62 + 4 * header[bias]["shape"][0]]), data)),
        ("offsets-missing", join(entry(bias, data_offsets=None), data)),
        ("trailing-bytes", join(header, data + b"\0" * 64)),
        ("truncated-data", join(header, data[:-4])),
        # names and counts
        ("renamed-tensor", join({(k + ".x" if k == bias else k): v for k, v in header.items()}, data)),
        ("extra-empty-tensor", join({**header, "evil": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, data)),
        ("duplicate-key", join(json.dumps(header)[:-1] + ', "' + bias + '": ' + json.dumps(header[bias]) + "}", data)),
        ("huge-count", join({**header, **{f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                                          for i in range(5000)}}, data)),
        ("long-name", join({**header, "n" * 100_000: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, data)),
        # the header itself
        ("header-length-past-end", struct.pack("<Q", len(good)) + good[8:]),
        ("header-length-2GiB", struct.pack("<Q", 2**31) + good[8:]),
        ("header-not-object", join("[1, 2, 3]", data)),
        ("header-deeply-nested", join("{" + '"a": ' + "[" * 100_000 + "]" * 100_000 + "}", data)),
        ("header-4MiB", join({**header, "__pad__": "x" * (4 << 20)}, data)),
        ("metadata-not-strings", join({**header, "__metadata__": {**header["__metadata__"], "n_items": 30}}, data)),
        # metadata
        ("format-missing", _with_meta(header, data, format=None)),
        ("format-wrong", _with_meta(header, data, format="pt")),
        ("backbone-missing", _with_meta(header, data, backbone=None)),
        ("backbone-not-json", _with_meta(header, data, backbone="{oops")),
        ("backbone-a-list", _with_meta(header, data, backbone="[64, 2]")),
        ("backbone-nested", _with_meta(header, data, backbone="[" * 100_000 + "]" * 100_000)),
        ("backbone-unknown-field", _with_backbone(header, data, evil=1)),
        ("n_items-disagrees", _with_meta(header, data, n_items="31")),
        ("n_items-1e9", _with_meta(header, data, n_items="1e9")),
        ("n_items-9999-digits", _with_meta(header, data, n_items="9" * 9999)),
        ("recipe-not-json", _with_meta(header, data, recipe="{oops")),
        ("recipe-a-list", _with_meta(header, data, recipe="[1]")),
        ("fingerprint-missing", _with_meta(header, data, dataset_fingerprint=None)),
    ]
    cases += backbone_field_cases(header, data)
    return cases
