"""Flash attention (prefill) as a Pallas kernel for TPUs (Mosaic lowering; TPU interpret mode on the CPU).

Same contract as `kernel.flash_attention_pallas`. The wrapper puts heads ahead of the sequence,
q -> [B, K, Sq*G, H] (row t*G + g is query t of head g of the group) and k, v -> [B, K, Sk, H], so every
block ends in (rows, H), which Mosaic's (8, 128) tiling rule accepts for any head dim, and each K/V tile is
DMA'd once for all G query heads that share it. Grid (B, K, q blocks, k blocks): the online softmax state
lives in VMEM scratch across the innermost ("arbitrary") k axis. Blocks that the causal mask or the window
hides are skipped, and their index_map repeats a block already in VMEM so the pipeline issues no DMA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jinfer.kernels.flash_attention.validate import check_inputs

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class TPUBlockSizes:
    """block_q: queries per program; each program holds block_q * G rows (all G query heads of one KV
    head), the sublane dim of its tiles, so block_q must be a multiple of 8 (16 fills bf16 tiles).
    block_k: keys per inner step, the lane dim of the score tile, so a multiple of 128.
    Both shrink to the (8-rounded) sequence length when that is shorter, giving a single full block."""

    block_q: int = 128
    block_k: int = 128


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _visible_blocks(q_first, block_q, *, block_k, n_k, causal, window):
    """First and last k block holding a key that some query at q_first .. q_first+block_q-1 may see;
    lo > hi when none does. Shared by the kernel (what to compute) and the index_map (what to fetch)."""
    lo = jnp.int32(0) if window is None else jnp.maximum((q_first - window + 1) // block_k, 0)
    hi = jnp.int32(n_k - 1) if not causal else jnp.minimum((q_first + block_q - 1) // block_k, n_k - 1)
    return lo, hi


def _kernel(q_off_ref, *refs, block_q, block_k, group, n_k, seq_k, causal, window, softcap, sm_scale,
            use_segments):
    if use_segments:
        q_seg_ref, kv_seg_ref, *refs = refs
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    q_first = q_off_ref[b] + i * block_q  # position of this block's first query
    lo, hi = _visible_blocks(q_first, block_q, block_k=block_k, n_k=n_k, causal=causal, window=window)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((lo <= j) & (j <= hi))
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                            precision=prec) * sm_scale  # [rows, block_k]
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        # Row r holds query r // group. Masks compare x <= r // group as x * group <= r, which is the same
        # for integers and keeps vector integer division (no VPU instruction) out of the kernel.
        r = lax.broadcasted_iota(jnp.int32, s.shape, 0)
        k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        d = k_pos - q_first
        masks = [k_pos < seq_k] if seq_k is not None else []
        if causal:
            masks.append(d * group <= r)
        if window is not None:
            masks.append((d + window) * group > r)
        if use_segments:
            masks.append(q_seg_ref[...] == kv_seg_ref[...])  # [rows, 1] vs [1, block_k]
        if masks:
            s = jnp.where(functools.reduce(jnp.logical_and, masks), s, NEG_INF)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows with no visible key yet keep p = 0, not NaN
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m_prev - m_safe)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=-1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                                                    precision=prec)
        m_sc[...] = m_new

    @pl.when(j == n_k - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0
        l = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, NEG_INF, m_sc[...] + jnp.log(l))


def _check(q, k, v, q_offset, q_segment_ids, kv_segment_ids, window, softcap, block_sizes):
    check_inputs(q, k, v, q_offset, q_segment_ids, kv_segment_ids, window, softcap)
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"empty sequence: {q.shape=}, {k.shape=}")
    bq, bk = block_sizes.block_q, block_sizes.block_k
    if bq <= 0 or bq % 8:
        raise ValueError(f"block_q={bq} must be a positive multiple of 8 (sublane tiling)")
    if bk <= 0 or bk % 128:
        raise ValueError(f"block_k={bk} must be a positive multiple of 128 (lane tiling)")


@functools.partial(jax.jit, static_argnames=("causal", "window", "softcap", "sm_scale", "block_sizes", "interpret"))
def flash_attention_tpu(q, k, v, q_offset, q_segment_ids, kv_segment_ids, *, causal: bool, window, softcap,
                        sm_scale, block_sizes: TPUBlockSizes, interpret: bool):
    """q: [B, Sq, N, H]; k, v: [B, Sk, K, H]; q_offset: i32[B] or None; segment ids: i32[B, Sq], i32[B, Sk] or
    None. Returns (out [B, Sq, N, H], lse f32[B, Sq, N]); lse is -inf and out 0 where a query sees no key."""
    _check(q, k, v, q_offset, q_segment_ids, kv_segment_ids, window, softcap, block_sizes)
    B, Sq, N, H = q.shape
    Sk, K = k.shape[1], k.shape[2]
    G = N // K
    bq = min(block_sizes.block_q, _round_up(Sq, 8))
    bk = min(block_sizes.block_k, _round_up(Sk, 8))  # a shorter bk is then the whole (padded) key axis
    Sq_p, Sk_p = _round_up(Sq, bq), _round_up(Sk, bk)
    n_q, n_k, rows = Sq_p // bq, Sk_p // bk, bq * G
    # Heads ahead of the sequence (one HBM pass each) so blocks end in (rows, H): see the module docstring.
    qt = jnp.pad(q, ((0, 0), (0, Sq_p - Sq), (0, 0), (0, 0))).reshape(B, Sq_p, K, G, H)
    qt = qt.transpose(0, 2, 1, 3, 4).reshape(B, K, Sq_p * G, H)
    kt = jnp.pad(k, ((0, 0), (0, Sk_p - Sk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    vt = jnp.pad(v, ((0, 0), (0, Sk_p - Sk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    q_off = jnp.zeros((B,), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)

    def kv_block(b, i, j, off_ref):
        # Hidden blocks map to the nearest visible one, fetched at the step before or after, so no DMA.
        lo, hi = _visible_blocks(off_ref[b] + i * bq, bq, block_k=bk, n_k=n_k, causal=causal, window=window)
        return jnp.maximum(jnp.minimum(jnp.maximum(j, lo), hi), 0)

    q_spec = pl.BlockSpec((None, None, rows, H), lambda b, h, i, j, off: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, h, i, j, off: (b, h, kv_block(b, i, j, off), 0))
    in_specs, args = [q_spec, kv_spec, kv_spec], [qt, kt, vt]
    use_segments = q_segment_ids is not None
    if use_segments:
        # q ids repeated per head row, as a column [rows, 1]; kv ids as a row [1, block_k]: they broadcast
        # against the score tile without an in-kernel transpose. Padding ids never match each other.
        q_seg = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, Sq_p - Sq)), constant_values=-1)
        kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, Sk_p - Sk)), constant_values=-2)
        args = [jnp.repeat(q_seg, G, axis=1)[:, :, None], kv_seg[:, None, :]] + args
        in_specs = [pl.BlockSpec((None, rows, 1), lambda b, h, i, j, off: (b, i, 0)),
                    pl.BlockSpec((None, 1, bk), lambda b, h, i, j, off: (b, 0, kv_block(b, i, j, off)))] + in_specs
    kernel = functools.partial(
        _kernel, block_q=bq, block_k=bk, group=G, n_k=n_k, seq_k=Sk if Sk_p > Sk else None, causal=causal,
        window=window, softcap=softcap, sm_scale=H ** -0.5 if sm_scale is None else sm_scale,
        use_segments=use_segments)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, K, n_q, n_k),
            in_specs=in_specs,
            out_specs=[q_spec, pl.BlockSpec((None, None, rows, 1), lambda b, h, i, j, off: (b, h, i, 0))],
            scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                            pltpu.VMEM((rows, H), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype), jax.ShapeDtypeStruct((B, K, Sq_p * G, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="flash_attention_tpu",
    )(q_off, *args)
    out = out.reshape(B, K, Sq_p, G, H)[:, :, :Sq].transpose(0, 2, 1, 3, 4).reshape(B, Sq, N, H)
    lse = lse.reshape(B, K, Sq_p, G)[:, :, :Sq].transpose(0, 2, 1, 3).reshape(B, Sq, N)
    return out, lse
