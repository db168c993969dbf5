"""The public weight-only quantized matmul: x times a QTensor (one layer of a stacked one, read in place),
through the Pallas kernel of `kernel.py`.

The QTensor's input axes flatten to K and its output axes to N (free reshapes: int4's packing runs along the
last axis, so flat byte c still holds flat columns 2c and 2c + 1), x's trailing `n_in` axes are contracted,
and the result has x's other axes followed by the weight's outputs: `qeinsum` for the model's specs.

Every M runs the kernel, with no fall-back to XLA's `x @ dequantize(w)`: on an H200 at 4096x14336 the kernel
took 41.8 / 42.6 / 61.4 us (int8 / fp8 / int4) at M = 64 and 96.8 / 94.2 / 168.4 us at M = 256, XLA 107.8 /
107.6 / 176.9 us and 120.6 / 120.2 / 189.8 us. Those XLA times include a copy of one layer out of the stacked
weight (about 28 us for int8 / fp8, 14 us for int4, by bytes), so at M = 256 int8 and fp8 are about level with
XLA and int4 ahead; XLA would also hold a bfloat16 copy of the weight (2x int8's bytes) for every call.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jinfer.kernels.quant_matmul.kernel import quantized_matmul_triton
from jinfer.kernels.quant_matmul.out_in import out_in_matmul_triton
from jinfer.kernels.quant_matmul.tuning import QuantMatmulBlockSizes, block_sizes_for
from jinfer.quant.qtensor import QTensor


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "sum_splits"))
def quantized_matmul(
    x: jax.Array,  # [..., *in] f32 | bf16 | f16
    w: QTensor,  # [*in, *out], or stacked [L, *in, *out] with `layer`
    *,
    layer: jax.Array | int | None = None,  # i32[]: the layer of a stacked w (traced; must lie in [0, L))
    block_sizes: QuantMatmulBlockSizes | None = None,  # None: tuning.block_sizes_for this shape and device
    interpret: bool | None = None,  # None: natively on a GPU, interpreted elsewhere
    sum_splits: bool = True,
) -> jax.Array:  # [..., *out] in x's dtype; sum_splits=False: [S, ..., *out], float32 where S > 1
    """x @ dequantize(w) without dequantizing w in memory. An `input_scale` divides x first (as `qeinsum`
    does); W8A8 (act="int8") is not this kernel's: it stays on XLA's int8 dot. sum_splits=False: the split_k
    programs' partial products unsummed (S = 1 without splits), for a reader that sums them itself where XLA's
    sum would be a kernel launch of its own (`jinfer.kernels.swiglu` takes them)."""
    if not isinstance(w, QTensor):
        raise ValueError(f"w must be a QTensor; got {type(w).__name__}")
    if w.act is not None:
        raise ValueError(f"w.act={w.act!r}: quantized activations (W8A8) run on XLA (qeinsum), not this kernel")
    shape = w.shape
    lead = len(shape) - w.n_in - w.n_out
    if lead not in (0, 1) or (layer is None) != (lead == 0):
        raise ValueError(f"w of shape {shape} (n_in={w.n_in}, n_out={w.n_out}) has {lead} stacked axes; pass "
                         f"layer with one stacked axis, none without (got layer={layer!r})")
    in_shape, out_shape = shape[lead:lead + w.n_in], shape[lead + w.n_in:]
    if tuple(x.shape[x.ndim - w.n_in:]) != in_shape:
        raise ValueError(f"x's trailing {w.n_in} axes {x.shape[x.ndim - w.n_in:]} (x.shape={x.shape}) must equal "
                         f"the weight's inputs {in_shape}")
    K, N = math.prod(in_shape), math.prod(out_shape)
    batch = x.shape[:x.ndim - w.n_in]
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)

    if w.input_scale is not None:  # the stored weight is W·diag(s): x / s times it is x·W
        s = w.input_scale if lead == 0 else w.input_scale[layer]
        x = (x.astype(jnp.float32) / s.astype(jnp.float32)).astype(x.dtype)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return jnp.zeros((*(() if sum_splits else (1,)), *batch, *out_shape), x.dtype)

    L = shape[0] if lead else 1
    scale = w.scale.reshape(L, -1, N)
    offset = None if w.offset is None else w.offset.reshape(L, -1, N)
    if block_sizes is None:
        block_sizes = block_sizes_for(M, K, N, w.fmt, jax.devices()[0].device_kind, w.group_size, w.layout)
    if interpret is None:
        interpret = jax.devices()[0].platform != "gpu"
    if w.layout == "out_in":  # [L, *out, *in] (int4: pairs along the last input axis, flat byte j = inputs 2j, 2j + 1)
        out = out_in_matmul_triton(x2, w.values.reshape(L, N, -1), scale, offset, layer, fmt=w.fmt,
                                   group_size=w.group_size, block_sizes=block_sizes, interpret=interpret,
                                   sum_splits=sum_splits)
    else:
        out = quantized_matmul_triton(x2, w.values.reshape(L, K, -1), scale, offset, layer, fmt=w.fmt,
                                      group_size=w.group_size, block_sizes=block_sizes, interpret=interpret,
                                      sum_splits=sum_splits)
    return out.reshape(*batch, *out_shape) if sum_splits else out.reshape(out.shape[0], *batch, *out_shape)
