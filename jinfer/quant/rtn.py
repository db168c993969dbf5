"""Round-to-nearest quantization of one weight into a QTensor (the online formats of `quantization=`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jinfer.quant.qtensor import QTensor, group_inputs, pack_int4, ungroup_inputs

FP8_MAX = 448.0  # the largest finite float8_e4m3fn


@functools.partial(jax.jit, static_argnames=("fmt", "n_in", "group_size", "lead"))
def quantize(w: jax.Array, *, fmt: str, n_in: int, group_size: int = 0, lead: int = 0) -> QTensor:
    """w [*lead, *in, *out] (lead: stacked-layer axes) -> QTensor by round to nearest: "int8" and "fp8"
    symmetric (the group's largest magnitude maps to the format's largest value), "int4" asymmetric (the
    group's [min, max] onto 0..15)."""
    in_shape = w.shape[lead:lead + n_in]
    n_out = w.ndim - lead - n_in
    # Padding repeats the last input, so it moves no group's range (zeros would widen int4's min/max).
    x = group_inputs(w, n_in, group_size, lead, pad="edge")  # [*lead, G, g, *out]
    axis = lead + 1
    if fmt == "int4":
        lo, hi = x.min(axis=axis), x.max(axis=axis)
        scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
        q = jnp.clip(jnp.round((x - jnp.expand_dims(lo, axis)) / jnp.expand_dims(scale, axis)), 0, 15)
        values = pack_int4(ungroup_inputs(q, in_shape, lead).astype(jnp.uint8))
        return QTensor(values, scale, lo, fmt, n_in, n_out, group_size)
    top = {"int8": 127.0, "fp8": FP8_MAX}[fmt]
    amax = jnp.abs(x).max(axis=axis)
    scale = jnp.where(amax > 0, amax / top, 1.0)
    y = x / jnp.expand_dims(scale, axis)
    q = jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8) if fmt == "int8" else y.astype(jnp.float8_e4m3fn)
    return QTensor(ungroup_inputs(q, in_shape, lead), scale, None, fmt, n_in, n_out, group_size)
