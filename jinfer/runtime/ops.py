"""The model's products and norms on each platform (`llama.forward(..., ops=)`): on one GPU, quantized weights'
products through the Pallas matmul kernel (`jinfer.runtime.matmul`) and every RMSNorm through the Pallas norm
kernel; XLA's everywhere else (over a mesh XLA partitions its own ops, not a kernel's).

Why the norm kernel: at batch 1 on the H200 XLA makes a layer's first RMSNorm three launches (the scan's slice
of the gain, a reduction, a multiply) and its second two, of ~1.5 us each for 8 kB (RESULTS.md, session 30);
the kernel is one, reading the gain in place from the stacked [L, D] array (`benchmarks/gpu_hlo.py`, Llama-3.1-8B
shape in bf16: 14 kernels a layer with XLA's norm, 12 with the kernel).

Folded norms (`llama.fold_norms`, `ModelOps.fold_norms`): on one GPU a layer's two norms launch nothing. Their gains
are in the products; the attention kernel of a decode step and the gated activation's kernel (`kernel_swiglu`)
each reduce their token's row to its norm factor themselves.
"""

from __future__ import annotations

import jax

from jinfer.kernels.rms_norm import rms_norm as rms_norm_kernel
from jinfer.kernels.swiglu import swiglu as swiglu_kernel
from jinfer.models.layers import swiglu
from jinfer.models.llama import ModelOps
from jinfer.runtime.matmul import kernel_matmul


def kernel_norm(x: jax.Array, gain: jax.Array, eps: float, layer: jax.Array | None = None, *,
                interpret: bool | None = None) -> jax.Array:
    """`jinfer.models.layers.rms_norm` in one kernel launch."""
    return rms_norm_kernel(x, gain, eps=eps, layer=layer, interpret=interpret)


def kernel_swiglu(gate_up: jax.Array, x: jax.Array | None = None, eps: float = 0.0, *,
                  interpret: bool | None = None) -> jax.Array:
    """`jinfer.models.layers.swiglu`, in one kernel launch where it scales rows by their norm factor (XLA makes
    that three: the reduction, the reciprocal square root, the activation); there gate_up may be a split-K
    product's partials [S, ..., 2F] (`ModelOps.split_parts`), which the kernel sums as it loads them."""
    if x is None:
        return swiglu(gate_up)
    return swiglu_kernel(gate_up, x, eps=eps, interpret=interpret)


def model_ops(platform: str, num_devices: int) -> ModelOps:
    """The ops the runner hands the model on `platform` over a mesh of `num_devices`."""
    if platform == "gpu" and num_devices == 1:
        return ModelOps(matmul=kernel_matmul, norm=kernel_norm, unroll=True, swiglu=kernel_swiglu, fuse=True,
                        fold_norms=True, split_parts=True)
    return ModelOps()
