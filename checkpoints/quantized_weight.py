"""One quantized matmul weight as an HF checkpoint stores it, and its conversion to jinfer's QTensor.

Every importer of a quantized format (AutoAWQ, GPTQ, compressed-tensors) reads its tensors into a
`StoredWeight` in HF's [out, in] layout, w[o, i] = (q[o, i] - zero[o, g(i)]) * scale[o, g(i)], and this
module makes the params leaf: a QTensor in jinfer's layout (see `jinfer.quant.qtensor`) where the format maps
onto one exactly, else the float weight.
- 4 bits: QTensor "int4" with u = q - q_min in [0, 15] and offset = (q_min - zero) * scale, so
  u * scale + offset = (q - zero) * scale. In float32 both products are exact for f16 / bf16 scales (4 + 11
  bits), so the dequantized weight is the exact (q - zero) * scale, which the packers round once into their
  scale dtype.
- 8 bits: QTensor "int8" (which has no offset) when the zero is the middle of the range (symmetric), so
  q - zero is a signed byte; asymmetric 8-bit weights are kept as floats.
- float8 e4m3: QTensor "fp8".
- inputs whose groups are not contiguous (GPTQ's act-order `g_idx`): QTensor groups consecutive inputs, and
  a permutation of the inputs cannot be undone inside one weight (q, k and v share theirs with the norm
  before them), so such weights are dequantized to float, with a warning.
Other bit widths raise CheckpointError. The layers of a leaf are stacked into one QTensor when they all
became QTensors of the same kind; otherwise (some layers left unquantized, mixed formats) the leaf is float.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from jinfer.checkpoints.errors import CheckpointError
from jinfer.checkpoints.gguf_blocks import stack
from jinfer.checkpoints.hf_names import HFTensor
from jinfer.quant.qtensor import QTensor, dequantize, pack_int4

FP8 = "float8_e4m3fn"


@dataclasses.dataclass
class StoredWeight:
    name: str  # the HF module, e.g. "model.layers.0.self_attn.q_proj", for errors
    q: np.ndarray  # int32 [out, in] in [q_min, q_min + 2^bits), or float8_e4m3fn [out, in]
    bits: int  # 4 or 8 (8 for float8)
    q_min: int  # the smallest stored value: 0 for AWQ / GPTQ, -2^(bits-1) for compressed-tensors
    scale: np.ndarray  # float [out, groups]
    zero: np.ndarray | None  # int32 [out, groups] in q's range; None: 0
    group_size: int  # inputs per group (the last may be shorter); 0: one group
    g_idx: np.ndarray | None = None  # int [in]: the group of each input, where not i // group_size

    def check(self, spec: HFTensor) -> None:
        out, n_in = spec.hf_shape
        if self.q.shape != (out, n_in):
            raise CheckpointError(f"{self.name}: the quantized weight is {list(self.q.shape)} (out, in) once "
                                  f"unpacked; config.json implies {[out, n_in]}")
        g = self.group_size or n_in
        groups = math.ceil(n_in / g)
        if self.scale.shape != (out, groups):
            raise CheckpointError(f"{self.name}: scales are {list(self.scale.shape)} (out, groups); groups of "
                                  f"{g} over {n_in} inputs need {[out, groups]}")
        if self.zero is not None and self.zero.shape != self.scale.shape:
            raise CheckpointError(f"{self.name}: zeros are {list(self.zero.shape)}; scales are "
                                  f"{list(self.scale.shape)}")
        if self.g_idx is not None and (self.g_idx.shape != (n_in,) or self.g_idx.min(initial=0) < 0
                                       or self.g_idx.max(initial=0) >= groups):
            raise CheckpointError(f"{self.name}: g_idx of shape {list(self.g_idx.shape)} does not give each of "
                                  f"the {n_in} inputs a group in [0, {groups})")
        if self.q.dtype == np.dtype(FP8) and self.zero is not None:
            raise CheckpointError(f"{self.name}: float8 weights with zero points are not a format jinfer has")
        if self.q.dtype != np.dtype(FP8):
            if self.bits not in (4, 8):
                raise CheckpointError(f"{self.name}: {self.bits}-bit weights; jinfer keeps 4 or 8 bits (int4, int8)")
            top = self.q_min + (1 << self.bits) - 1
            if self.q.size and (self.q.min() < self.q_min or self.q.max() > top):
                raise CheckpointError(f"{self.name}: stored values span [{self.q.min()}, {self.q.max()}], outside "
                                      f"the {self.bits}-bit range [{self.q_min}, {top}]")

    def zeros(self) -> np.ndarray:
        return np.zeros(self.scale.shape, np.int32) if self.zero is None else self.zero

    def float_weight(self) -> np.ndarray:
        """f32 [out, in]: (q - zero) * scale, each input with its group's scale."""
        n_in = self.q.shape[1]
        g = self.g_idx if self.g_idx is not None else np.arange(n_in) // (self.group_size or n_in)
        scale = self.scale.astype(np.float32)[:, g]
        if self.q.dtype == np.dtype(FP8):
            return self.q.astype(np.float32) * scale
        return (self.q - self.zeros()[:, g]).astype(np.float32) * scale


def _contiguous(w: StoredWeight) -> bool:
    n_in = w.q.shape[1]
    return w.g_idx is None or np.array_equal(w.g_idx, np.arange(n_in) // (w.group_size or n_in))


def float_reason(w: StoredWeight, spec: HFTensor, n_in: int) -> str | None:
    """Why the weight has no exact QTensor form (so `to_leaf` gives floats), or None when it has one."""
    if not _contiguous(w):
        return "inputs grouped out of order (act-order g_idx), which jinfer's contiguous groups cannot hold"
    if w.q.dtype == np.dtype(FP8):
        return None
    if w.bits == 4:
        return None if spec.shape[-1] % 2 == 0 else "an odd number of outputs on the axis int4 packs in pairs"
    if not np.all(w.zeros() == w.q_min + 128):  # the zero of a symmetric 8-bit weight: 128 unsigned, 0 signed
        return "8-bit weights with zero points (jinfer's int8 is symmetric)"
    return None


def to_leaf(w: StoredWeight, spec: HFTensor, n_in: int) -> QTensor | np.ndarray:
    """The layer's weight in jinfer's layout (`spec.shape`, its first `n_in` axes contracted): a QTensor where
    the format maps onto one, else float32 (`float_reason` says why)."""
    w.check(spec)
    if float_reason(w, spec, n_in) is not None:
        return spec.to_jinfer(w.float_weight())
    out_shape = spec.shape[n_in:]
    group = 0 if w.scale.shape[1] == 1 else w.group_size
    scale = w.scale.astype(np.float32)

    def layout(a: np.ndarray) -> np.ndarray:  # [out, groups] -> [groups, *out]
        return np.ascontiguousarray(a.T.reshape(-1, *out_shape))

    if w.q.dtype == np.dtype(FP8):
        return QTensor(np.ascontiguousarray(spec.to_jinfer(w.q)), layout(scale), None, "fp8", n_in,
                       len(out_shape), group)
    if w.bits == 4:
        u = (w.q - w.q_min).astype(np.uint8)
        offset = (w.q_min - w.zeros()).astype(np.float32) * scale
        return QTensor(pack_int4(spec.to_jinfer(u)), layout(scale), layout(offset), "int4", n_in,
                       len(out_shape), group)
    q = (w.q - (w.q_min + 128)).astype(np.int8)
    return QTensor(np.ascontiguousarray(spec.to_jinfer(q)), layout(scale), None, "int8", n_in, len(out_shape), group)


def _kind(x) -> tuple | None:
    if isinstance(x, QTensor):
        return x.fmt, x.group_size, x.offset is None, x.scale.shape
    return None


def stack_layers(leaf: str, parts: list, dtype) -> QTensor | np.ndarray:
    """Per-layer leaves of one weight -> the stacked leaf: one QTensor when every layer is a QTensor of the same
    kind, else floats in `dtype` (None: float32) with the quantized layers dequantized."""
    kinds = {_kind(p) for p in parts}
    if len(kinds) == 1 and None not in kinds:
        return stack(parts)
    if kinds != {None}:
        warnings.warn(f"layers/{leaf}: its layers are stored in different formats (or some unquantized); the "
                      f"leaf is kept as float", stacklevel=2)
    dtype = np.float32 if dtype is None else dtype
    return np.stack([np.asarray(dequantize(p)) if isinstance(p, QTensor) else p for p in parts]).astype(dtype)
