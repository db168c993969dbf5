"""The public kernel: the gated activation of rows whose RMSNorm gain was folded into the gate/up product, through
the Pallas kernel of `kernel.py`."""

from __future__ import annotations

import functools
import math

import jax

from jinfer.kernels.swiglu.kernel import SwigluBlockSizes, default_block_sizes, swiglu_triton


@functools.partial(jax.jit, static_argnames=("eps", "block_sizes", "interpret"))
def swiglu(
    gate_up: jax.Array,  # [..., 2F] f32 | bf16 | f16: the gate's F outputs, then the up product's; or [S, ..., 2F]:
    #   S partial products (a split-K quantized matmul's, `quantized_matmul(sum_splits=False)`), summed here
    x: jax.Array,  # [..., D]: the unnormalized rows the product read
    *,
    eps: float,
    block_sizes: SwigluBlockSizes | None = None,
    interpret: bool | None = None,  # None: natively on a GPU, interpreted elsewhere
) -> jax.Array:  # [..., F] in gate_up's dtype; of partials, in x's
    """`swiglu_reference(gate_up, x, eps)` in one kernel launch (of partials: of their float32 sum)."""
    parts = gate_up.ndim == x.ndim + 1
    rows = gate_up.shape[1:-1] if parts else gate_up.shape[:-1]
    if rows != x.shape[:-1] or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up {gate_up.shape} must be [..., 2F] or [S, ..., 2F] over the rows of x {x.shape} "
                         "[..., D]")
    M = math.prod(x.shape[:-1])
    bs = block_sizes or default_block_sizes(M)
    if bs.block_f & (bs.block_f - 1):
        raise ValueError(f"block_f={bs.block_f} must be a power of two")
    if interpret is None:
        interpret = jax.devices()[0].platform != "gpu"
    out = swiglu_triton(gate_up.reshape(gate_up.shape[0] if parts else 1, M, gate_up.shape[-1]),
                        x.reshape(M, x.shape[-1]), eps=eps, block_sizes=bs, interpret=interpret,
                        out_dtype=x.dtype if parts else None)
    return out.reshape(*rows, gate_up.shape[-1] // 2)
