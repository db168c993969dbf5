"""GGUF weights kept in their file's block format (`quantization="gguf"`), as `jinfer.quant` QTensors.

ggml's blocks hold 32 consecutive inputs of one output row: Q8_0 is an f16 scale d and 32 int8 values
(w = d * q); Q4_0 an f16 d and 32 nibbles (w = d * (q - 8)); Q4_1 f16 d and m and 32 nibbles (w = d * q + m).
The nibbles of a block are inputs 0-15 in the low halves of its 16 bytes and 16-31 in the high halves. All
three are a QTensor with groups of 32 inputs: Q8_0 as "int8", Q4_0 and Q4_1 as "int4" with offset -8d and m
(q * d + m rounds once, like ggml's own dequantization, and d * q is exact in float32). Other types (K-quants,
Q5_*) are not kept: the importer dequantizes them, as without `quantization="gguf"`.
"""

from __future__ import annotations

import numpy as np

from jinfer.quant.qtensor import QTensor, pack_int4

BLOCK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
KEPT_TYPES = tuple(BLOCK_BYTES)


def _f16(b: np.ndarray) -> np.ndarray:
    """The f16 fields, kept in float16 (exact, and half the bytes of float32 scales)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def read_blocks(data: np.ndarray, type_name: str, rows: int, cols: int):
    """A tensor's raw blocks (uint8[rows, cols / 32 * block bytes]) -> (q [rows, cols] int8 (Q8_0) or uint8
    in [0, 15], scale f16[rows, cols / 32], offset f16[rows, cols / 32] or None)."""
    if cols % BLOCK:
        raise ValueError(f"{cols} inputs are not whole blocks of {BLOCK}")
    b = np.asarray(data, np.uint8).reshape(rows, cols // BLOCK, BLOCK_BYTES[type_name])
    d = _f16(b[..., 0:2])
    if type_name == "Q8_0":
        return np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, cols), d, None
    qs = b[..., 4:] if type_name == "Q4_1" else b[..., 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(rows, cols)
    offset = _f16(b[..., 2:4]) if type_name == "Q4_1" else (-8.0 * d).astype(np.float16)  # exact: a power of 2
    return q, d, offset


def to_layout(a: np.ndarray, out_fn, in_shape: tuple, out_shape: tuple) -> np.ndarray:
    """A GGUF matrix [out rows, inputs] -> jinfer's [*in, *out], its rows reordered by `out_fn` (llama.cpp's
    Q/K permutation undone); the float importer's layout too."""
    n_out, n_in = int(np.prod(out_shape)), int(np.prod(in_shape))
    return out_fn(a).reshape(n_out, n_in).T.reshape(*in_shape, *out_shape)


def to_qtensor(q: np.ndarray, scale: np.ndarray, offset, out_fn, in_shape: tuple, out_shape: tuple) -> QTensor:
    """GGUF's [out rows, inputs] fields -> a QTensor in jinfer's [*in, *out] layout (`to_layout`)."""
    q = to_layout(q, out_fn, in_shape, out_shape)
    scale = out_fn(scale).T.reshape(-1, *out_shape)
    fmt = "int8" if q.dtype == np.int8 else "int4"
    if fmt == "int4":
        q = pack_int4(q)
        offset = out_fn(offset).T.reshape(-1, *out_shape)
    return QTensor(q, scale, offset, fmt, len(in_shape), len(out_shape), BLOCK)


def stack(parts: list[QTensor]) -> QTensor:
    """Per-layer QTensors of one weight -> one with a leading layer axis."""
    first = parts[0]
    fields = [np.stack([getattr(p, f) for p in parts]) if getattr(first, f) is not None else None
              for f in ("values", "scale", "offset")]
    return QTensor(*fields, first.fmt, first.n_in, first.n_out, first.group_size)
