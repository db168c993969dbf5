"""The model's matmul on each platform (`llama.forward(..., matmul=)`): a quantized weight goes through the
Pallas kernel where that kernel runs natively and pays, everything else through XLA (`qeinsum`).

Why: XLA's `x @ dequantize(w)` writes the dequantized weight to memory before cuBLAS reads it, so on the GPU an
int8 or int4 decode step reads more bytes than bf16's (benchmarks/RESULTS.md); the kernel reads the stored bytes
once, and a stacked layer's in place (a `LayerSlice` carries the layer index into it). Rows above
`KERNEL_MAX_ROWS` (prefill chunks) are compute-bound, where XLA's dot is as good. The kernel runs on one
device: a weight sharded over a mesh stays on XLA, which partitions it. Where the tuning table says so
(`tuning.OUT_IN_FORMATS`), int4 / int8 weights are stored "out_in" for that kernel (`kernel_layout`); XLA's
products (prefill) read that layout too.
"""

from __future__ import annotations

import math

import jax

from jinfer.kernels.quant_matmul import quantized_matmul
from jinfer.kernels.quant_matmul.tuning import out_in_formats
from jinfer.quant.qtensor import LayerSlice, QTensor, is_plain_spec, is_qtensor, qeinsum, to_out_in, why_not_out_in

KERNEL_MAX_ROWS = 64  # the H200 (RESULTS.md): 1.8-6x faster than XLA up to 64 rows; level for int8 / fp8 at 256


def kernel_matmul(spec: str, x, w, *, interpret: bool | None = None, parts: bool = False):
    """`qeinsum` with quantized weights at decode sizes computed by the Pallas kernel. parts: where the kernel
    runs, its split-K partial products unsummed, [S, ...] (`quantized_matmul(sum_splits=False)`), for a reader
    that sums them in its own launch (`ModelOps.split_parts`); elsewhere the product as always."""
    qt = w.stacked if isinstance(w, LayerSlice) else w
    if (isinstance(qt, QTensor) and qt.act is None and is_plain_spec(spec, qt.n_in)
            and math.prod(x.shape[:x.ndim - qt.n_in]) <= KERNEL_MAX_ROWS):
        return quantized_matmul(x, qt, layer=w.layer if isinstance(w, LayerSlice) else None, interpret=interpret,
                                sum_splits=not parts)
    return qeinsum(spec, x, w)


def kernel_layout(params, device_kind: str, formats: tuple[str, ...] | None = None):
    """params with the quantized weights of `formats` (default: the table's for `device_kind`) stored "out_in",
    for `kernel_matmul` (int4 ones only where their last input axis is even); every other leaf as it is."""
    formats = out_in_formats(device_kind) if formats is None else formats
    if not formats:
        return params

    def convert(w):
        fits = is_qtensor(w) and w.fmt in formats and why_not_out_in(w) is None
        return to_out_in(w) if fits else w

    return jax.tree_util.tree_map(convert, params, is_leaf=is_qtensor)
