"""AutoAWQ (GEMM) and GPTQ checkpoints: `qweight`, `qzeros`, `scales` (GPTQ: and `g_idx`) per linear layer.

Both store w = (q - zero) * scale with unsigned q and zeros and fp16 scales [groups, out]:
- AWQ "gemm" (config: quant_method "awq", bits / w_bit 4, group_size / q_group_size, version "gemm"):
  `qweight` int32 [in, out / 8] and `qzeros` int32 [groups, out / 8], 8 nibbles a word in AWQ's order
  (`int32_packing.AWQ_ORDER`); groups must divide the inputs (AutoAWQ's dequantization repeats each scale
  group_size times).
- GPTQ (quant_method "gptq", bits 4 or 8, group_size, desc_act, sym, checkpoint_format "gptq" or "gptq_v2"):
  `qweight` int32 [in * bits / 32, out] packed along the inputs, `qzeros` int32 [groups, out * bits / 32],
  `g_idx` int32 [in] the group of each input (i // group_size unless act-order reordered them). The classic
  "gptq" (v1) format stores each zero minus one, and its readers add the one back after masking to `bits`
  bits, so a stored 15 is a zero of 16; "gptq_v2" stores the zero itself.
group_size -1 means one group over all inputs.
"""

from __future__ import annotations

import math

import numpy as np

from jinfer.checkpoints.errors import CheckpointError
from jinfer.checkpoints.hf_names import HFTensor
from jinfer.checkpoints.int32_packing import unpack, unpack_awq
from jinfer.checkpoints.quantized_weight import StoredWeight
from jinfer.checkpoints.tensor_files import TensorFiles


def setting(qcfg: dict, *keys: str, default=None):
    """The first of `keys` present in the quantization_config (AutoAWQ and transformers name them apart)."""
    for k in keys:
        if k in qcfg:
            return qcfg[k]
    return default


def _group_size(qcfg: dict, n_in: int, module: str, keys=("group_size",)) -> int:
    g = setting(qcfg, *keys, default=-1)
    if not isinstance(g, int) or isinstance(g, bool) or not (g == -1 or g > 0):
        raise CheckpointError(f"{module}: quantization_config group size {g!r} is not a positive integer or -1")
    return n_in if g == -1 else g


def read_awq(tensors: TensorFiles, module: str, spec: HFTensor, qcfg: dict) -> StoredWeight | None:
    if f"{module}.qweight" not in tensors:
        return None  # a module AWQ left unquantized (modules_to_not_convert)
    out, n_in = spec.hf_shape
    bits = setting(qcfg, "bits", "w_bit", default=4)
    version = str(setting(qcfg, "version", default="gemm")).lower()
    if bits != 4 or version != "gemm":
        raise CheckpointError(f"{module}: AWQ with bits={bits!r}, version={version!r}; jinfer reads 4-bit "
                              f"AWQ in the 'gemm' packing")
    g = _group_size(qcfg, n_in, module, ("group_size", "q_group_size"))
    if n_in % g or out % 8:
        raise CheckpointError(f"{module}: AWQ groups of {g} over {n_in} inputs, {out} outputs in words of 8: the "
                              f"group size must divide the inputs and 8 the outputs")
    G = n_in // g
    q = unpack_awq(tensors.get_checked(f"{module}.qweight", (n_in, out // 8), "i"))
    zero = unpack_awq(tensors.get_checked(f"{module}.qzeros", (G, out // 8), "i"))
    scale = tensors.get_checked(f"{module}.scales", (G, out), "f")
    return StoredWeight(module, q.T, 4, 0, np.asarray(scale).T, zero.T, g)


def read_gptq(tensors: TensorFiles, module: str, spec: HFTensor, qcfg: dict) -> StoredWeight | None:
    if f"{module}.qweight" not in tensors:
        return None
    out, n_in = spec.hf_shape
    bits = setting(qcfg, "bits", "w_bit", default=4)
    if bits not in (4, 8):
        raise CheckpointError(f"{module}: GPTQ with bits={bits!r}; jinfer reads 4- and 8-bit GPTQ")
    fmt = str(setting(qcfg, "checkpoint_format", "format", default="gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{module}: GPTQ checkpoint_format {fmt!r}; jinfer reads 'gptq' and 'gptq_v2'")
    per = 32 // bits
    if n_in % per or out % per:
        raise CheckpointError(f"{module}: {n_in} inputs and {out} outputs do not fill int32 words of {per} "
                              f"{bits}-bit values")
    g = _group_size(qcfg, n_in, module)
    G = math.ceil(n_in / g)
    q = unpack(tensors.get_checked(f"{module}.qweight", (n_in // per, out), "i"), bits, axis=0)
    zero = unpack(tensors.get_checked(f"{module}.qzeros", (G, out // per), "i"), bits)
    if fmt == "gptq":
        zero = zero + 1
    scale = tensors.get_checked(f"{module}.scales", (G, out), "f")
    g_idx = None
    if f"{module}.g_idx" in tensors:
        g_idx = np.asarray(tensors.get_checked(f"{module}.g_idx", (n_in,), "i")).astype(np.int64)
    return StoredWeight(module, q.T, bits, 0, np.asarray(scale).T, zero.T, g, g_idx)
