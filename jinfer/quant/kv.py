"""The quantized KV cache (`kv_cache_dtype=`): K/V stored in 8 bits, with one scale per token per KV head.

Each stored vector x (one token's K or V of one KV head, head_dim values) is kept as

    x ~= values * scale,   scale = max|x| / top   (symmetric; top = 127 for int8, 448 for float8_e4m3fn)

with values int8 (round to nearest) or float8_e4m3fn (a cast). One scale per token and head, not per page
or per tensor: a token's scale is fixed when it is written, so writing token i never rescales tokens
already in its page, and an outlier token costs only its own precision.

Scales are float32: the scale used to quantize is stored as it is (no second rounding between quantizing
and dequantizing), and its 4 bytes are 3% of an int8 token at head_dim 128 (bfloat16 scales would save
half of that; `kv_token_bytes` counts them). A quantized cache is a `QuantizedKV` pytree, so it rides in
the model's scan carry and is donated to the step like a float array; `store_kv`, `store_tokens` and `load_kv` write and
read either kind, so code that moves K/V does not branch on the format. The dense reference loop quantizes
K/V with the same `quantize_kv` and keeps `dequantize_kv` of it (`jinfer.models.attention`), so the engine
can be checked against it token for token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.quant.formats import resolve_kv_cache_dtype

STORAGE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
TOP = {"int8": 127.0, "fp8": 448.0}  # the largest value of each format (448: float8_e4m3fn's largest finite)
SCALE_DTYPE = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    """A K or V cache held quantized: `values` in the layout of the float cache it replaces (the engine's
    pages: [L, K, P, page_size, H]) and one `scale` per vector of head_dim values ([L, K, P, page_size])."""

    values: jax.Array  # int8 | float8_e4m3fn [..., H]
    scale: jax.Array  # f32 [...]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the float cache this stands for."""
        return tuple(self.values.shape)

    @property
    def fmt(self) -> str:
        return "int8" if self.values.dtype == jnp.int8 else "fp8"

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in (self.values, self.scale))


def is_quantized_kv(x) -> bool:
    return isinstance(x, QuantizedKV)


def quantize_kv(x: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> (values [..., H] in the format's storage type, scale f32[...]) with x ~= values * scale."""
    x = x.astype(jnp.float32)
    amax = jnp.abs(x).max(axis=-1)
    scale = amax / TOP[fmt]
    y = x / jnp.where(scale > 0, scale, 1.0)[..., None]  # an all-zero vector: values 0 under any scale
    if fmt == "int8":
        values = jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8)
    else:  # clipped: float8_e4m3fn has no infinity, and a value past 448 would cast to NaN
        values = jnp.clip(y, -TOP[fmt], TOP[fmt]).astype(jnp.float8_e4m3fn)
    return values, scale.astype(SCALE_DTYPE)


def dequantize_kv(values: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """The stored vectors in `dtype` (the product taken in float32, then rounded once)."""
    return (values.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)


def round_trip_kv(x: jax.Array, fmt: str | None) -> jax.Array:
    """x as a quantized cache gives it back (x itself for fmt None): what attention sees of a K/V it stored."""
    if fmt is None:
        return x
    values, scale = quantize_kv(x, fmt)
    # A barrier between the cast to the storage type and the cast back: XLA may fold the pair of converts into
    # nothing (its excess-precision rule, on by default; the GPU's simplifier does so for float8), and the oracle
    # would then see unrounded values where the engine's pages hold rounded ones.
    return dequantize_kv(jax.lax.optimization_barrier(values), scale, x.dtype)


def empty_kv(shape: tuple[int, ...], dtype, fmt: str | None):
    """A zero cache of the float `shape` ([..., H]): a float array of `dtype`, or a QuantizedKV for fmt."""
    if fmt is None:
        return jnp.zeros(shape, dtype)
    return QuantizedKV(jnp.zeros(shape, STORAGE[fmt]), jnp.zeros(shape[:-1], SCALE_DTYPE))


def store_kv(cache, index, x: jax.Array, mode: str | None = None):
    """`cache.at[index].set(x, mode=mode)` for a float cache or a QuantizedKV (x quantized first; `index`
    selects whole vectors, so the same index addresses the values and their scales)."""
    if isinstance(cache, QuantizedKV):
        values, scale = quantize_kv(x, cache.fmt)
        return QuantizedKV(cache.values.at[index].set(values, mode=mode),
                           cache.scale.at[index].set(scale, mode=mode))
    return cache.at[index].set(x.astype(cache.dtype), mode=mode)


def store_tokens(cache, layer, page: jax.Array, offset: jax.Array, x: jax.Array):
    """A step's K or V, x [T, K, H], written at (layer, every head, page[t], offset[t]) of a float cache or a
    QuantizedKV laid out [L, K, P, page_size, H]. One token (batch-1 decode) is a block update, not a scatter:
    XLA GPU turns a one-update scatter into the same update plus a kernel that reads the old vectors, to honour
    scatter's skipping of out-of-range indices (these never are): a kernel more a layer, a token (the H200)."""
    if x.shape[0] > 1:
        return store_kv(cache, (layer, slice(None), page, offset), x)
    start = (layer, 0, page[0], offset[0], 0)
    x = x.reshape(1, x.shape[1], 1, 1, x.shape[2])
    if isinstance(cache, QuantizedKV):
        values, scale = quantize_kv(x, cache.fmt)
        return QuantizedKV(jax.lax.dynamic_update_slice(cache.values, values, start),
                           jax.lax.dynamic_update_slice(cache.scale, scale, start[:-1]))
    return jax.lax.dynamic_update_slice(cache, x.astype(cache.dtype), start)


def load_kv(cache, index, dtype):
    """`cache[index]` of whole vectors; a QuantizedKV's dequantized into `dtype` (a float cache as stored)."""
    if isinstance(cache, QuantizedKV):
        return dequantize_kv(cache.values[index], cache.scale[index], dtype)
    return cache[index]


def kv_token_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype, kv_cache_dtype: str | None) -> int:
    """Bytes one token takes in the KV cache: K and V of every layer and KV head, with their scales."""
    fmt = resolve_kv_cache_dtype(kv_cache_dtype)
    per_vector = (head_dim * jnp.dtype(dtype).itemsize if fmt is None
                  else head_dim * jnp.dtype(STORAGE[fmt]).itemsize + jnp.dtype(SCALE_DTYPE).itemsize)
    return 2 * num_layers * num_kv_heads * per_vector
