"""The public RMSNorm kernel: x [..., D] times a gain [D], or one layer's of a stacked gain [L, D] read in place,
through the Pallas kernel of `kernel.py`."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jinfer.kernels.rms_norm.kernel import RMSNormBlockSizes, rms_norm_triton


@functools.partial(jax.jit, static_argnames=("eps", "block_sizes", "interpret"))
def rms_norm(
    x: jax.Array,  # [..., D] f32 | bf16 | f16
    gain: jax.Array,  # [D], or stacked [L, D] with `layer`
    *,
    eps: float,
    layer: jax.Array | int | None = None,  # i32[]: the layer of a stacked gain (traced; must lie in [0, L))
    block_sizes: RMSNormBlockSizes | None = None,
    interpret: bool | None = None,  # None: natively on a GPU, interpreted elsewhere
) -> jax.Array:  # [..., D] in the dtype of gain * x
    """`rms_norm_reference(x, gain[layer], eps)` in one kernel launch."""
    if gain.ndim not in (1, 2) or (layer is None) != (gain.ndim == 1):
        raise ValueError(f"gain of shape {gain.shape} needs layer with a stacked [L, D] gain and none with a [D] "
                         f"one (got layer={layer!r})")
    D = x.shape[-1]
    if gain.shape[-1] != D:
        raise ValueError(f"gain's last axis {gain.shape[-1]} (gain.shape={gain.shape}) must equal x's {D} "
                         f"(x.shape={x.shape})")
    if interpret is None:
        interpret = jax.devices()[0].platform != "gpu"
    if layer is not None:
        layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    out = rms_norm_triton(x.reshape(math.prod(x.shape[:-1]), D), gain, layer, eps=eps,
                          block_sizes=block_sizes or RMSNormBlockSizes(), interpret=interpret)
    return out.reshape(x.shape)
