"""Pieces shared by the quantized matmul kernels (`kernel.py`, `out_in.py`): masked loads and index helpers that
read the same compiled and in interpret mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def iota(n: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def load(ref, mask):
    """The whole of `ref` (a view), masked where `mask` is given: lanes off the array read as 0, except for
    float8 (Triton's lowering makes no float8 constant): those lanes are undefined, for the caller to zero."""
    if mask is None:
        return plgpu.load(ref)
    other = None if jnp.dtype(ref.dtype).itemsize == 1 and jnp.issubdtype(ref.dtype, jnp.floating) else 0
    return plgpu.load(ref, mask=jnp.broadcast_to(mask, ref.shape), other=other)


def i32(v) -> jax.Array:
    """A scalar index as an array: interpret mode's load and store take no Python int beside a slice."""
    return jnp.asarray(v, jnp.int32)


def both(a, b):
    return b if a is None else a if b is None else a & b


def split_range(split, per_split, total):
    if per_split < total:
        first = split * per_split
        return first, jnp.minimum(first + per_split, total)
    return 0, total  # static bounds: no split


def launch(kernel, operands, out_shape: jax.ShapeDtypeStruct, grid, bs, *, interpret: bool, name: str) -> jax.Array:
    """One pallas_call over `grid` with every operand and the output whole (each program addresses its own
    tiles), under the block sizes' Triton launch options."""
    def whole(a):
        return pl.BlockSpec(a.shape, lambda i, j, s: (0,) * a.ndim)

    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole(a) for a in operands],
        out_specs=whole(out_shape),
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=bs.num_warps,
                                                                    num_stages=bs.num_stages),
        name=name,
    )(*operands)
