"""Unpacking the int32 words in which AutoAWQ, GPTQ and compressed-tensors store 4- and 8-bit integers.

All three put 32 / bits values in a word, value j of the word in bits [j * bits, (j + 1) * bits); they differ
in the axis they pack along and in AWQ's order:
- GPTQ: `qweight` [in * bits / 32, out] packs consecutive inputs (axis 0); `qzeros` [groups, out * bits / 32]
  packs consecutive outputs;
- compressed-tensors "pack-quantized": `weight_packed` [out, in * bits / 32] packs consecutive inputs along
  its last axis, `weight_zero_point` [out * bits / 32, groups] consecutive outputs along axis 0;
- AutoAWQ GEMM: `qweight` [in, out / 8] and `qzeros` [groups, out / 8] pack outputs, a word's 8 nibbles
  holding its outputs 0, 2, 4, 6, 1, 3, 5, 7 (the order its CUDA kernel dequantizes in).
"""

from __future__ import annotations

import numpy as np

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds output AWQ_ORDER[j] of its 8


def unpack(words: np.ndarray, bits: int, axis: int = -1) -> np.ndarray:
    """int32 words -> their unsigned values (int32), 32 / bits per word, in order along `axis`."""
    if 32 % bits:
        raise ValueError(f"{bits}-bit values do not fill an int32 word evenly")
    per = 32 // bits
    w = np.moveaxis(np.asarray(words).astype(np.int32, copy=False).view(np.uint32), axis, -1)
    shifts = np.arange(per, dtype=np.uint32) * bits
    v = (w[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return np.moveaxis(v.reshape(*w.shape[:-1], w.shape[-1] * per).astype(np.int32), -1, axis)


def unpack_awq(words: np.ndarray) -> np.ndarray:
    """AutoAWQ GEMM's [rows, out / 8] int32 -> [rows, out] unsigned 4-bit values in output order."""
    v = unpack(words, 4)
    out = np.empty_like(v)
    out.reshape(*v.shape[:-1], -1, 8)[..., list(AWQ_ORDER)] = v.reshape(*v.shape[:-1], -1, 8)
    return out
