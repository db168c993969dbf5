"""How a quantized params pytree lives in an orbax checkpoint.

Orbax stores nested dicts of arrays, so each QTensor leaf is written as a dict of its arrays
(`layers/wq/values`, `layers/wq/scale`, ...), and `quantization.json` beside config.json records what the
arrays do not say: each quantized leaf's static fields (format, contracted axes, group size, activation
format) and which of its optional arrays exist, plus the checkpoint's quantization as the tool that made
it described it (`{"method": "awq", "bits": 4, "group_size": 128}`). A checkpoint with that file loads
quantized with no flag; a float checkpoint has no such file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from jinfer.checkpoints.errors import CheckpointError
from jinfer.quant.formats import FORMATS
from jinfer.quant.qtensor import LAYOUTS, OUT_IN_FORMATS, QTensor

RECORD_FILE = "quantization.json"

STATIC = tuple(f.name for f in dataclasses.fields(QTensor) if f.metadata.get("static"))
ARRAYS = tuple(f.name for f in dataclasses.fields(QTensor) if not f.metadata.get("static"))
# Static fields added since the first records were written, and what a record without one means.
STATIC_DEFAULTS = {"layout": "in_out"}
VALUE_DTYPES = {"int8": np.dtype(np.int8), "int4": np.dtype(np.uint8), "fp8": np.dtype("float8_e4m3fn")}


def split(params: dict, prefix: str = "") -> tuple[dict, dict]:
    """params -> (the same tree with each QTensor as a dict of its present arrays, {leaf name: its record})."""
    plain, leaves = {}, {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            plain[key], sub = split(value, name + "/")
            leaves.update(sub)
        elif isinstance(value, QTensor):
            arrays = {a: getattr(value, a) for a in ARRAYS if getattr(value, a) is not None}
            plain[key] = arrays
            leaves[name] = {**{s: getattr(value, s) for s in STATIC}, "arrays": sorted(arrays)}
        else:
            plain[key] = value
    return plain, leaves


def write(path: Path, description: dict | None, leaves: dict) -> None:
    """quantization.json, when any leaf is quantized (and no stale one otherwise)."""
    file = path / RECORD_FILE
    if not leaves:
        file.unlink(missing_ok=True)
        return
    file.write_text(json.dumps({"quantization": description or {}, "leaves": leaves}, indent=2) + "\n")


def read(path: Path) -> dict | None:
    """The record of a checkpoint directory, or None for a float checkpoint."""
    file = path / RECORD_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(file)!r} is not readable JSON: {e}") from e
    if not isinstance(record, dict) or not isinstance(record.get("leaves"), dict):
        raise CheckpointError(f"{str(file)!r} lacks its 'leaves' table")
    for name, leaf in record["leaves"].items():
        _check_record(file, name, leaf)
    return record


def _check_record(file: Path, name: str, leaf) -> None:
    if not isinstance(leaf, dict):
        raise CheckpointError(f"{str(file)!r}: the record of {name!r} is not an object")
    missing = [k for k in (*STATIC, "arrays") if k not in leaf and k not in STATIC_DEFAULTS]
    if missing:
        raise CheckpointError(f"{str(file)!r}: the record of {name!r} lacks {missing}")
    if leaf["fmt"] not in FORMATS:
        raise CheckpointError(f"{str(file)!r}: {name!r} has format {leaf['fmt']!r}; jinfer has {list(FORMATS)}")
    layout = leaf.get("layout", STATIC_DEFAULTS["layout"])
    if layout not in LAYOUTS or (layout == "out_in" and leaf["fmt"] not in OUT_IN_FORMATS):
        raise CheckpointError(f"{str(file)!r}: {name!r} has layout {layout!r} for format {leaf['fmt']!r}; "
                              f"jinfer has {list(LAYOUTS)} ('out_in' for {', '.join(OUT_IN_FORMATS)})")
    unknown = set(leaf["arrays"]) - set(ARRAYS)
    if unknown or not {"values", "scale"} <= set(leaf["arrays"]):
        raise CheckpointError(f"{str(file)!r}: {name!r} lists arrays {leaf['arrays']}; expected values, scale "
                              f"and any of {[a for a in ARRAYS if a not in ('values', 'scale')]}")


def join(name: str, arrays: dict, leaf: dict, shape: tuple[int, ...]) -> QTensor:
    """A restored leaf's arrays -> its QTensor, checked against the float shape the config implies."""
    q = QTensor(**{a: arrays.get(a) for a in ARRAYS}, **{s: leaf.get(s, STATIC_DEFAULTS.get(s)) for s in STATIC})
    check(name, q, shape)
    return q


def check(name: str, q: QTensor, shape: tuple[int, ...]) -> None:
    """Raises CheckpointError naming the tensor when its arrays disagree with each other or with `shape`."""
    if np.dtype(q.values.dtype) != VALUE_DTYPES[q.fmt]:
        raise CheckpointError(f"quantized tensor {name!r}: {q.fmt} values must be {VALUE_DTYPES[q.fmt]}, "
                              f"not {q.values.dtype}")
    if tuple(q.shape) != tuple(shape):
        raise CheckpointError(f"quantized tensor {name!r} stands for shape {list(q.shape)}; the config implies "
                              f"{list(shape)}")
    lead = len(shape) - q.n_in - q.n_out
    if lead < 0:
        raise CheckpointError(f"quantized tensor {name!r}: n_in={q.n_in} + n_out={q.n_out} exceed its "
                              f"{len(shape)} axes")
    n = math.prod(shape[lead:lead + q.n_in])
    groups = -(-n // (q.group_size or n))
    want = (*shape[:lead], groups, *shape[lead + q.n_in:])
    for field in ("scale", "offset"):
        x = getattr(q, field)
        if x is not None and tuple(x.shape) != want:
            raise CheckpointError(f"quantized tensor {name!r}: {field} has shape {list(x.shape)}; {groups} groups "
                                  f"of {q.group_size or n} inputs imply {list(want)}")
    if (q.offset is None) != (q.fmt != "int4"):
        raise CheckpointError(f"quantized tensor {name!r}: {q.fmt} {'needs' if q.fmt == 'int4' else 'has no'} "
                              f"offset")
    input_scale = getattr(q, "input_scale", None)
    if input_scale is not None and tuple(input_scale.shape) != tuple(shape[:lead + q.n_in]):
        raise CheckpointError(f"quantized tensor {name!r}: input_scale has shape {list(input_scale.shape)}; "
                              f"expected {list(shape[:lead + q.n_in])}")
