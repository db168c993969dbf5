"""SmoothQuant (Xiao et al. 2022) and plain W8A8: int8 weights per output channel times int8 activations per
token (QTensor.act = "int8").

A few input channels of an LLM's activations run 10-100x larger than the rest; rounding a token's row to int8
by its largest value then wipes out the small channels. SmoothQuant divides channel j of the activation by
s_j = max|X_j|^α / max_o |W_jo|^(1-α) and multiplies the weight's row j by it (the product is unchanged),
moving part of the outlier range from the activation, rounded per token, into the weight, rounded per output
channel. α = 0.5 splits it evenly. The scales stay per matrix (QTensor.input_scale) rather than folded into
the preceding norm: see jinfer.quant.qtensor.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jinfer.quant.qtensor import QTensor
from jinfer.quant.rtn import quantize

ALPHA = 0.5  # migration strength: the share of the activation's range moved into the weight


def smooth_scales(x_absmax: jax.Array, w_absmax: jax.Array, alpha: float = ALPHA) -> jax.Array:
    """max|X_j| and max|W_j| per input channel -> s_j, both floored so a silent channel keeps a finite scale."""
    return jnp.maximum(x_absmax, 1e-5) ** alpha / jnp.maximum(w_absmax, 1e-5) ** (1.0 - alpha)


def w8a8_quantize(w: jax.Array, *, n_in: int) -> QTensor:
    """Plain W8A8: int8 per output channel by round to nearest, activations int8 per token at run time."""
    return dataclasses.replace(quantize(jnp.asarray(w), fmt="int8", n_in=n_in, group_size=0), act="int8")


def smoothquant_quantize(w: jax.Array, x: jax.Array, *, n_in: int, alpha: float = ALPHA) -> QTensor:
    """w [*in, *out] (one layer's weight), x f32[tokens, prod(in)] its calibration inputs -> W8A8 QTensor
    of W·diag(s) with input_scale s."""
    in_shape = w.shape[:n_in]
    w2 = jnp.asarray(w, jnp.float32).reshape(x.shape[1], -1)
    s = smooth_scales(jnp.abs(x).max(axis=0), jnp.abs(w2).max(axis=1), alpha)
    qt = w8a8_quantize((w2 * s[:, None]).reshape(w.shape), n_in=n_in)
    return dataclasses.replace(qt, input_scale=s.reshape(in_shape))
