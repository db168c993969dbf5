"""Flash attention (prefill) as a Pallas kernel: GPU Triton lowering, interpret mode on the CPU.

One program computes `block_q` queries of one batch row for all G query heads of one KV head, so each
K/V tile is loaded once per group (GQA/MQA without repeating K/V). It walks the keys `block_k` at a
time with an online softmax in float32, skipping blocks that the causal mask or the sliding window
hides entirely. Options: causal, per-row query offset into a longer context (chunked prefill), segment
ids (packed variable-length sequences), sliding window, logit soft-cap.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_q queries (x the group size padded to a power of two = the rows of each product, >= 16),
    block_k keys per inner step; num_warps and num_stages are Triton's launch options."""

    block_q: int = 32
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2


def _kernel(q_off_ref, q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_q, block_k, seq_k,
            causal, window, softcap, sm_scale, use_segments):
    b, qi = pl.program_id(0), pl.program_id(2)
    _, Gp, H = q_ref.shape
    rows = block_q * Gp
    q = q_ref[...].reshape(rows, H)
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    q_first = q_off_ref[b] + qi * block_q  # position of this block's first query
    q_pos = q_first + lax.broadcasted_iota(jnp.int32, (block_q, Gp), 0).reshape(rows)
    if use_segments:
        q_seg = jnp.broadcast_to(q_seg_ref[...][:, None], (block_q, Gp)).reshape(rows)

    n_blocks = pl.cdiv(seq_k, block_k)
    hi = jnp.minimum(n_blocks, pl.cdiv(q_first + block_q, block_k)) if causal else n_blocks
    lo = jnp.maximum(0, (q_first - window + 1) // block_k) if window is not None else 0

    def body(j, carry):
        o, m, l = carry
        start = j * block_k
        k = k_ref[pl.ds(start, block_k)]
        v = v_ref[pl.ds(start, block_k)]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=prec) * sm_scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        k_pos = start + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        ok = k_pos < seq_k
        if causal:
            ok &= k_pos <= q_pos[:, None]
        if window is not None:
            ok &= k_pos > q_pos[:, None] - window
        if use_segments:
            ok &= q_seg[:, None] == kv_seg_ref[pl.ds(start, block_k)][None, :]
        s = jnp.where(ok, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(jnp.where(m == NEG_INF, NEG_INF, m - m_safe))
        l = alpha * l + p.sum(axis=-1)
        o = alpha[:, None] * o + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=prec)
        return o, m_new, l

    init = (jnp.zeros((rows, H), jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32))
    o, m, l = lax.fori_loop(lo, jnp.maximum(hi, lo), body, init)
    o = o / jnp.where(l == 0, 1.0, l)[:, None]
    o_ref[...] = o.reshape(block_q, Gp, H).astype(o_ref.dtype)
    # log-sum-exp of each row's scores (-inf where no key was visible), for merging partial results
    lse_ref[...] = jnp.where(l == 0, NEG_INF, m + jnp.log(jnp.where(l == 0, 1.0, l))).reshape(block_q, Gp)


@functools.partial(jax.jit, static_argnames=("causal", "window", "softcap", "sm_scale", "block_sizes", "interpret"))
def flash_attention_pallas(q, k, v, q_offset, q_segment_ids, kv_segment_ids, *, causal: bool, window, softcap,
                           sm_scale, block_sizes: BlockSizes, interpret: bool):
    """Returns (out [B, Sq, N, H], lse f32[B, Sq, N])."""
    B, Sq, N, H = q.shape
    Sk, K = k.shape[1], k.shape[2]
    G = N // K
    Gp = 1 << (G - 1).bit_length()
    bq, bk = block_sizes.block_q, block_sizes.block_k
    Sq_p, Sk_p = -(-Sq // bq) * bq, -(-Sk // bk) * bk
    q5 = jnp.pad(q.reshape(B, Sq, K, G, H), ((0, 0), (0, Sq_p - Sq), (0, 0), (0, Gp - G), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, Sk_p - Sk), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, Sk_p - Sk), (0, 0), (0, 0)))
    use_segments = q_segment_ids is not None
    if not use_segments:  # placeholders keep one kernel signature; never read
        q_segment_ids, kv_segment_ids = jnp.zeros((B, Sq), jnp.int32), jnp.zeros((B, Sk), jnp.int32)
    q_seg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, Sq_p - Sq)), constant_values=-1)
    kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, Sk_p - Sk)), constant_values=-2)
    q_off = jnp.zeros((B,), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)
    kernel = functools.partial(_kernel, block_q=bq, block_k=bk, seq_k=Sk, causal=causal, window=window,
                               softcap=softcap, sm_scale=H ** -0.5 if sm_scale is None else sm_scale,
                               use_segments=use_segments)
    from jax.experimental.pallas import triton as plgpu

    out, lse = pl.pallas_call(
        kernel,
        grid=(B, K, Sq_p // bq),
        in_specs=[
            pl.BlockSpec((B,), lambda b, h, i: (0,)),
            pl.BlockSpec((None, bq), lambda b, h, i: (b, i)),
            pl.BlockSpec((None, Sk_p), lambda b, h, i: (b, 0)),
            pl.BlockSpec((None, bq, None, Gp, H), lambda b, h, i: (b, i, h, 0, 0)),
            pl.BlockSpec((None, Sk_p, None, H), lambda b, h, i: (b, 0, h, 0)),
            pl.BlockSpec((None, Sk_p, None, H), lambda b, h, i: (b, 0, h, 0)),
        ],
        out_specs=[pl.BlockSpec((None, bq, None, Gp, H), lambda b, h, i: (b, i, h, 0, 0)),
                   pl.BlockSpec((None, bq, None, Gp), lambda b, h, i: (b, i, h, 0))],
        out_shape=[jax.ShapeDtypeStruct(q5.shape, q.dtype), jax.ShapeDtypeStruct(q5.shape[:-1], jnp.float32)],
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                                                   num_stages=block_sizes.num_stages),
        name="flash_attention",
    )(q_off, q_seg, kv_seg, q5, k, v)
    return out[:, :Sq, :, :G].reshape(B, Sq, N, H), lse[:, :Sq, :, :G].reshape(B, Sq, N)
