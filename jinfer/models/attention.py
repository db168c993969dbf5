"""Attention over a dense per-sequence KV cache: the plain-`jnp` backend of the reference loop.

Cache layout: k_cache, v_cache: [B, S, K, H] per layer (stacked [L, B, S, K, H] across layers).
A query at position p sees the keys at positions 0..p of its own row. Slots past a row's length may hold
stale values (from padding or an earlier, longer request); the causal mask by position hides them, since
every position a query can see was written before it in the same step or an earlier one.

With a `kv_cache_dtype` ("int8", "fp8") the cache stays in the float dtype but holds what a quantized cache
would give back (`jinfer.quant.kv.round_trip_kv`, the engine's own quantization): the oracle the engine's
quantized KV pages are checked against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.models.layers import apply_rope
from jinfer.quant.kv import round_trip_kv


def dense_kv_cache(num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype):
    shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def gqa_attention(q, k, v, mask):
    """q: [B, T, N, H], k/v: [B, S, K, H], mask: bool[B, T, S] -> [B, T, N, H], softmax in float32."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * (H ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(B, T, N, H)


def dense_cache_attention(q, k, v, k_cache, v_cache, layer, positions, attn_meta, inv_freq, kv_cache_dtype=None):
    """Rotates q and k by RoPE, writes k/v ([B, T, K, H]) of `layer` at `positions` (i32[B, T]) into the stacked
    caches ([L, B, S, K, H]), quantized and dequantized when `kv_cache_dtype` is given, then attends causally
    over that layer's rows."""
    del attn_meta  # the dense cache needs nothing beyond the positions
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    k, v = round_trip_kv(k, kv_cache_dtype), round_trip_kv(v, kv_cache_dtype)
    B, S = k_cache.shape[1:3]
    rows = jnp.arange(B)[:, None]
    # Positions past the cache (padding of a prompt bucket) are dropped rather than wrapped.
    k_cache = k_cache.at[layer, rows, positions].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[layer, rows, positions].set(v.astype(v_cache.dtype), mode="drop")
    mask = jnp.arange(S)[None, None, :] <= positions[:, :, None]
    return gqa_attention(q, k_cache[layer], v_cache[layer], mask), k_cache, v_cache
