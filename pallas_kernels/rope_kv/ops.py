"""The public RoPE-and-store kernel: a step's fused qkv product in, its rotated queries out, its rotated keys and
its values written into the paged KV cache in place, through the Pallas kernel of `kernel.py`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jinfer.kernels.rms_norm.kernel import check_rows
from jinfer.kernels.rope_kv.kernel import rope_and_store_triton


@functools.partial(jax.jit, static_argnames=("num_heads", "num_warps", "interpret", "eps"), donate_argnums=(3, 4))
def rope_and_store(
    qkv: jax.Array,  # [T, N + 2K, H]: the step's queries' N heads, then its keys' and values' K each
    positions: jax.Array,  # i32[T]
    inv_freq: jax.Array,  # f32[H / 2]: the rotary frequencies
    k_pages: jax.Array,  # [L, K, P, S, H], donated: written in place
    v_pages: jax.Array,  # [L, K, P, S, H], donated: written in place
    layer: jax.Array | int,  # i32[]: the layer whose pages take the step's keys and values
    slot: jax.Array,  # i32[T]: token t's key and value go to (layer, every head, slot // S, slot % S)
    x: jax.Array | None = None,  # [T, D], with eps: qkv is first scaled by each token's RMSNorm factor of x
    *,
    num_heads: int,
    num_warps: int = 4,
    interpret: bool | None = None,  # None: natively on a GPU, interpreted elsewhere
    eps: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`rope_and_store_reference` in one kernel launch -> (q [T, N, H], k_pages, v_pages); with x and eps, of
    `jinfer.models.layers.scale_rows(qkv, x, eps)` (a product whose norm gain was folded into its weights)."""
    T, heads, H = qkv.shape
    K, Hp = k_pages.shape[1], k_pages.shape[4]
    if v_pages.shape != k_pages.shape or Hp != H or heads != num_heads + 2 * K or H % 2:
        raise ValueError(f"qkv {qkv.shape} must hold num_heads={num_heads} query heads and the pages' K={K} key "
                         f"and value heads of an even head dim equal to the pages' (k_pages {k_pages.shape}, "
                         f"v_pages {v_pages.shape})")
    if positions.shape != (T,) or slot.shape != (T,) or inv_freq.shape != (H // 2,):
        raise ValueError(f"positions {positions.shape} and slot {slot.shape} must be [{T}] and inv_freq "
                         f"{inv_freq.shape} [{H // 2}]")
    check_rows(x, eps, T)
    if interpret is None:
        interpret = jax.devices()[0].platform != "gpu"
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    return rope_and_store_triton(qkv, i32(positions), jnp.asarray(inv_freq, jnp.float32),
                                 jnp.reshape(i32(layer), (1,)), i32(slot), k_pages, v_pages, x,
                                 num_heads=num_heads, num_warps=num_warps, interpret=interpret, eps=eps)
