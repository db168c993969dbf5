"""AWQ (Lin et al. 2023): activation-aware scales. The input channels whose activations are large carry the
output; scaling their weight rows up by s (and the activation down by s) before rounding gives them a finer
share of each group's grid, at the cost of the channels with small activations.

Per matrix: s = mean_tokens |x|^α, normalized by sqrt(max(s) · min(s)) so scales sit around 1; α is searched
over a grid of 20 points in [0, 1) for the smallest output error ||Q(W·diag(s)) · (x/s) - W x||² on the
calibration inputs. α = 0 is s = 1, plain round to nearest, so the chosen scales never do worse than RTN on
the calibration inputs. The rounding is RTN's (jinfer.quant.rtn), the scales go into QTensor.input_scale.
Left out: AWQ's clipping search (shrinking each group's range before rounding), and the paper's folding of
s into the preceding norm (kept per matrix, see jinfer.quant.qtensor).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jinfer.quant.qtensor import QTensor, dequantize
from jinfer.quant.rtn import quantize

GRID = 20  # α = 0, 1/20, ..., 19/20
MAX_TOKENS = 4096  # calibration rows the search reads (evenly spaced); bounds its cost per matrix


def awq_scales(x_mean: jax.Array, alpha) -> jax.Array:
    """mean |x| per input channel -> the scales at exponent α, normalized around 1."""
    s = jnp.maximum(x_mean, 1e-4) ** alpha  # a channel never active keeps a finite scale
    return s / jnp.sqrt(s.max() * s.min())


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "grid"))
def search_alpha(w: jax.Array, x: jax.Array, *, fmt: str, group_size: int, grid: int = GRID) -> jax.Array:
    """w f32[n, m], x f32[tokens, n] -> f32[grid]: the output error of each α = k / grid."""
    x_mean = jnp.abs(x).mean(axis=0)
    want = x @ w

    def error(alpha):
        s = awq_scales(x_mean, alpha)
        q = dequantize(quantize(w * s[:, None], fmt=fmt, n_in=1, group_size=group_size))
        return jnp.mean(jnp.square((x / s) @ q - want))

    return jax.lax.map(error, jnp.arange(grid, dtype=jnp.float32) / grid)


def awq_quantize(w: jax.Array, x: jax.Array, *, n_in: int, bits: int, group_size: int = 0,
                 grid: int = GRID, max_tokens: int = MAX_TOKENS) -> QTensor:
    """w [*in, *out] (one layer's weight), x f32[tokens, prod(in)] its calibration inputs -> QTensor (RTN's
    int4 / int8 layout) of W·diag(s) with input_scale s at the best α."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} must be 4 or 8")
    in_shape = w.shape[:n_in]
    fmt = "int4" if bits == 4 else "int8"
    w2 = jnp.asarray(w, jnp.float32).reshape(x.shape[1], -1)
    x = jnp.asarray(x, jnp.float32)
    if len(x) > max_tokens:
        x = x[jnp.linspace(0, len(x) - 1, max_tokens).astype(jnp.int32)]
    errors = search_alpha(w2, x, fmt=fmt, group_size=group_size, grid=grid)
    alpha = jnp.argmin(errors) / grid  # the first minimum: α = 0 (RTN) on a tie
    s = awq_scales(jnp.abs(x).mean(axis=0), alpha)
    scaled = (w2 * s[:, None]).reshape(w.shape)
    qt = quantize(scaled, fmt=fmt, n_in=n_in, group_size=group_size)
    return dataclasses.replace(qt, input_scale=s.reshape(in_shape))
