"""Plain-`jnp` attention with every option of the flash kernel: the oracle its tests compare against.

q: [B, Sq, N, H]; k, v: [B, Sk, K, H] with N a multiple of K (GQA/MQA). Query i of batch b sits at
position q_offset[b] + i (a chunk of a longer context when q_offset > 0); key j at position j.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(B, Sq, Sk, *, causal, q_offset=None, q_segment_ids=None, kv_segment_ids=None,
                   window=None):
    """bool[B, Sq, Sk]: which keys each query sees."""
    q_pos = jnp.arange(Sq)[None, :] + (0 if q_offset is None else q_offset[:, None])  # [B, Sq]
    k_pos = jnp.arange(Sk)
    mask = jnp.ones((B, Sq, Sk), bool)
    if causal:
        mask &= k_pos[None, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - window
    if q_segment_ids is not None:
        mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return mask


def flash_attention_reference(q, k, v, *, causal=True, q_offset=None, q_segment_ids=None, kv_segment_ids=None,
                              window=None, softcap=None, sm_scale=None):
    B, Sq, N, H = q.shape
    Sk, K = k.shape[1], k.shape[2]
    scale = H ** -0.5 if sm_scale is None else sm_scale
    qg = q.reshape(B, Sq, K, N // K, H)
    s = jnp.einsum("BQKGH,BSKH->BKGQS", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    mask = attention_mask(B, Sq, Sk, causal=causal, q_offset=q_offset, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids, window=window)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    # A query that sees no key (padding) gets zeros, not NaN.
    p = jnp.where(mask[:, None, None], jax.nn.softmax(s, axis=-1), 0.0)
    out = jnp.einsum("BKGQS,BSKH->BQKGH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(B, Sq, N, H).astype(q.dtype)
