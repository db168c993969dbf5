"""RoPE of a step's queries and keys and the write of its keys and values into the KV pages, in plain jnp (as
the model and `jinfer.quant.kv.store_kv` compute them): the kernel's oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotate(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x [T, heads, H] rotated by RoPE at positions i32[T] (HF's rotate_half layout; cos and sin rounded to x's
    dtype, as the model does)."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq  # [T, H/2]
    cos = jnp.cos(freqs).astype(x.dtype)[:, None, :]
    sin = jnp.sin(freqs).astype(x.dtype)[:, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_and_store_reference(qkv, positions, inv_freq, k_pages, v_pages, layer, slot, *, num_heads: int):
    """qkv [T, N + 2K, H] (q's N heads, then k's and v's K each) -> (q rotated [T, N, H], k_pages and v_pages
    [L, K, P, S, H] with token t's rotated k and its v at (layer, every head, slot[t] // S, slot[t] % S))."""
    N, S = num_heads, k_pages.shape[3]
    page, offset = slot // S, slot % S
    K = (qkv.shape[1] - N) // 2
    q, k, v = qkv[:, :N], qkv[:, N:N + K], qkv[:, N + K:]
    k = rotate(k, positions, inv_freq)
    k_pages = k_pages.at[layer, :, page, offset].set(k.astype(k_pages.dtype))
    v_pages = v_pages.at[layer, :, page, offset].set(v.astype(v_pages.dtype))
    return rotate(q, positions, inv_freq), k_pages, v_pages
