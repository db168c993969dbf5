"""compressed-tensors checkpoints (what llm-compressor writes): quant_method "compressed-tensors".

The quantization_config's `config_groups` give each group of modules (`targets`: a class name such as
"Linear", "re:" + a regex matched from the start of the module name, or the name itself; `ignore` lists
modules left in float) the `weights` arguments: num_bits, type "int" or "float", symmetric, strategy
("tensor", "channel", "group" with group_size, "block" with block_structure [rows, cols]). The stored
tensors depend on the format (the group's `format`, else the config's):
- "pack-quantized": `weight_packed` int32 [out, ceil(in * bits / 32)], the signed values plus 2^(bits-1)
  packed along the inputs, value j at bit j * bits; `weight_shape` [out, in]; `weight_scale`; asymmetric
  group / channel weights a `weight_zero_point` packed the same way along the outputs (axis 0);
- "int-quantized", "naive-quantized": `weight` int8 (the signed values), `weight_scale`, asymmetric
  weights an unpacked `weight_zero_point`; "naive-quantized" and "float-quantized": `weight` float8_e4m3fn
  for type "float".
Scales are [out, groups] (group), [out, 1] (channel), a single value (tensor: the same for every output
channel) or [ceil(out / rows), ceil(in / cols)] (block: each row repeated over its block's outputs, a group
of `cols` inputs). The weight is (q - zero_point) * scale, so signed q has q_min = -2^(bits-1). An optional
`weight_g_idx` gives act-order groups. Activation quantization (W8A8 `input_activations`) is not applied:
jinfer runs such a model with float activations and warns.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np

from jinfer.checkpoints.errors import CheckpointError
from jinfer.checkpoints.hf_names import HFTensor
from jinfer.checkpoints.int32_packing import unpack
from jinfer.checkpoints.quantized_weight import FP8, StoredWeight
from jinfer.checkpoints.tensor_files import TensorFiles

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")


def _matches(module: str, targets) -> bool:
    for t in targets or ():
        if t == "Linear" or t == module or (t.startswith("re:") and re.match(t[3:], module)):
            return True
    return False


def scheme(qcfg: dict, module: str) -> dict | None:
    """The config group (with "format" filled in) that quantizes `module`, or None when none does."""
    if _matches(module, qcfg.get("ignore")):
        return None
    for group in (qcfg.get("config_groups") or {}).values():
        if _matches(module, group.get("targets")):
            return {**group, "format": group.get("format") or qcfg.get("format")}
    return None


def warn_activations(qcfg: dict) -> None:
    if any((g or {}).get("input_activations") for g in (qcfg.get("config_groups") or {}).values()):
        warnings.warn("compressed-tensors checkpoint quantizes activations too (input_activations); jinfer "
                      "applies the quantized weights to float activations", stacklevel=3)


def _expand(a: np.ndarray, name: str, strategy: str, args: dict, out: int, n_in: int) -> tuple[np.ndarray, int]:
    """A scale or zero-point tensor as stored -> ([out, groups], group size; 0: one group)."""
    a = np.asarray(a)
    if strategy == "tensor":
        if a.size != 1:
            raise CheckpointError(f"tensor {name!r} has shape {list(a.shape)}; strategy 'tensor' has one value")
        return np.broadcast_to(a.reshape(1, 1), (out, 1)), 0
    if strategy == "channel":
        want = (out, 1)
        if a.shape != want:
            raise CheckpointError(f"tensor {name!r} has shape {list(a.shape)}; strategy 'channel' needs {list(want)}")
        return a, 0
    if strategy == "group":
        g = args.get("group_size")
        if not isinstance(g, int) or g <= 0 or n_in % g:
            raise CheckpointError(f"{name}: group_size {g!r} does not divide the {n_in} inputs")
        if a.shape != (out, n_in // g):
            raise CheckpointError(f"tensor {name!r} has shape {list(a.shape)}; groups of {g} need "
                                  f"{[out, n_in // g]}")
        return a, g
    if strategy == "block":
        rows, cols = args.get("block_structure") or (0, 0)
        want = (math.ceil(out / max(rows, 1)), math.ceil(n_in / max(cols, 1)))
        if rows <= 0 or cols <= 0 or a.shape != want:
            raise CheckpointError(f"tensor {name!r} has shape {list(a.shape)}; blocks of {[rows, cols]} need "
                                  f"{list(want)}")
        return np.repeat(a, rows, axis=0)[:out], cols
    raise CheckpointError(f"{name}: weight strategy {strategy!r} is not one jinfer reads "
                          f"(tensor, channel, group, block)")


def read_compressed(tensors: TensorFiles, module: str, spec: HFTensor, qcfg: dict) -> StoredWeight | None:
    group = scheme(qcfg, module)
    if group is None or not group.get("weights"):
        return None  # ignored, or not targeted: the float `weight`
    args, fmt = group["weights"], group["format"]
    if fmt not in FORMATS:
        raise CheckpointError(f"{module}: compressed-tensors format {fmt!r}; jinfer reads {list(FORMATS)}")
    bits, kind = args.get("num_bits"), args.get("type", "int")
    if (kind, bits) not in (("int", 4), ("int", 8), ("float", 8)):
        raise CheckpointError(f"{module}: {bits}-bit {kind} weights; jinfer keeps int4, int8 and float8 (e4m3)")
    out, n_in = spec.hf_shape
    strategy = args.get("strategy", "tensor")
    if fmt == "pack-quantized":
        if kind != "int":
            raise CheckpointError(f"{module}: pack-quantized holds int weights, not {kind}")
        shape = tuple(int(x) for x in np.asarray(tensors.get_checked(f"{module}.weight_shape", (2,), "i")))
        if shape != (out, n_in):
            raise CheckpointError(f"tensor {module + '.weight_shape'!r} says {list(shape)}; config.json implies "
                                  f"{[out, n_in]}")
        packed = tensors.get_checked(f"{module}.weight_packed", (out, math.ceil(n_in * bits / 32)), "i")
        q = unpack(packed, bits)[:, :n_in] - (1 << (bits - 1))
    else:
        weight = tensors.get_checked(f"{module}.weight", (out, n_in), "if")
        want = np.dtype(FP8) if kind == "float" else np.dtype(np.int8)
        if weight.dtype != want:
            raise CheckpointError(f"tensor {module + '.weight'!r} is {weight.dtype}; {bits}-bit {kind} weights "
                                  f"are stored as {want}")
        q = np.asarray(weight) if kind == "float" else np.asarray(weight).astype(np.int32)
    scale_name = f"{module}.weight_scale"
    scale, g = _expand(tensors.get(scale_name), scale_name, strategy, args, out, n_in)
    zero = None
    zp_name = f"{module}.weight_zero_point"
    if not args.get("symmetric", True):
        zp = tensors.get(zp_name)
        if fmt == "pack-quantized" and strategy in ("group", "channel"):
            zp = unpack(tensors.get_checked(zp_name, (math.ceil(out * bits / 32), scale.shape[1]), "i"), bits,
                        axis=0)[:out] - (1 << (bits - 1))
        zero = _expand(np.asarray(zp).astype(np.int32), zp_name, strategy, args, out, n_in)[0]
    g_idx = None
    if f"{module}.weight_g_idx" in tensors:
        g_idx = np.asarray(tensors.get_checked(f"{module}.weight_g_idx", (n_in,), "i")).astype(np.int64)
    return StoredWeight(module, q, bits, -(1 << (bits - 1)), np.asarray(scale), zero, g, g_idx)
