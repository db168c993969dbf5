"""The quantized matmul in plain jnp, written apart from jinfer.quant's own dequantize (its own unpacking and
group indexing), so the kernel's tests check against two readings of the format."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def quantized_matmul_reference(
    x: jax.Array,  # [M, K]
    values: jax.Array,  # [K, N] int8 | float8_e4m3fn; int4: u8[K, N // 2], column 2c low nibble, 2c + 1 high
    scale: jax.Array,  # [G, N]
    offset: jax.Array | None,  # [G, N] (int4) or None
    *,
    fmt: str,
    group_size: int,  # inputs per group, the last group possibly shorter; 0: one group
) -> jax.Array:  # [M, N] in x's dtype, from float32 products
    K = values.shape[0]
    if fmt == "int4":
        col = jnp.arange(2 * values.shape[1])
        q = (values[:, col // 2] >> (4 * (col % 2)).astype(jnp.uint8)) & 0xF
    else:
        q = values
    group = jnp.arange(K) // (group_size or K)  # [K]: each input's row of scale and offset
    w = q.astype(jnp.float32) * scale[group].astype(jnp.float32)
    if offset is not None:
        w = w + offset[group].astype(jnp.float32)
    out = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return out.astype(x.dtype)
