"""Flash attention (prefill) for Hopper GPUs through Pallas' Mosaic GPU lowering: wgmma + TMA, warp-specialized.

Each CTA runs three warpgroups. Two compute warpgroups each keep a `block_q` x head_dim output tile in
registers; a third, memory warpgroup streams K/V tiles with TMA into a ring of `num_stages` shared-memory
slots, refilling a slot once both compute warpgroups have released it (a barrier with two arrivals).

GQA: when the group size is even, the two compute warpgroups take two query heads of the *same* KV group on
the same queries, so every K/V tile in shared memory serves both heads (and, under the causal mask, both
have the same amount of work). With an odd group they take two consecutive query blocks of one head.
Query heads vary fastest over the grid, so the CTAs of one KV group run side by side and find the K/V
tiles the other pair already read in L2.

Ping-pong (the FlashAttention-3 schedule): a two-arrival barrier orders the warpgroups so that one
computes its softmax while the other's matrix products occupy the tensor cores.

Scope (the fast path `ops.flash_attention` takes when it applies): causal or full attention with queries
and keys both starting at position 0, no segment ids, window or soft-cap, f16/bf16, head_dim 64 or 128,
query length a multiple of the CTA's query rows and key length a multiple of `block_kv`. Everything else
goes to the Triton kernel (`kernel.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class HopperBlockSizes:
    """block_q: query rows of each compute warpgroup (wgmma works on 64-row slabs). block_kv: keys per
    tile. num_stages: K/V tiles in flight. pingpong: the FA3 warpgroup ordering. persistent: one CTA per
    SM looping over work tiles. prefetch_q: each warpgroup loads its next tile's queries into a second
    buffer while it works on this tile's (needs persistent, at most two stages and, at head dim 128, no
    lse: shared memory)."""

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2
    pingpong: bool = True
    persistent: bool = False
    prefetch_q: bool = False


def supported(q, k, *, causal: bool, q_offset, q_segment_ids, window, softcap, block_sizes: HopperBlockSizes) -> str | None:
    """None if this kernel applies, else the reason it does not (for the dispatcher and its tests)."""
    B, Sq, N, H = q.shape
    Sk, K = k.shape[1], k.shape[2]
    G = N // K
    rows = block_sizes.block_q * (1 if G % 2 == 0 else 2)
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
        return f"dtype {q.dtype} (needs bf16/f16)"
    if H not in (64, 128):
        return f"head_dim={H}"
    if q_offset is not None or q_segment_ids is not None or window is not None or softcap is not None:
        return "q_offset, segments, window or softcap"
    if Sq % rows or Sk % block_sizes.block_kv:
        return f"{Sq=} not a multiple of {rows} or {Sk=} of block_kv={block_sizes.block_kv}"
    if causal and Sk < Sq:
        return f"causal with {Sk=} < {Sq=}"
    return None


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "block_sizes", "return_lse"))
def flash_attention_hopper(q, k, v, *, causal: bool, sm_scale: float, block_sizes: HopperBlockSizes,
                           return_lse: bool = False):
    """q [B, Sq, N, H], k/v [B, Sk, K, H] -> out [B, Sq, N, H], and with return_lse also lse f32[B, Sq, N].
    Check `supported` first. Native Hopper only: Pallas' GPU interpreter (jax 0.10/0.11) has no
    `transpose_ref`, `run_state` or register layouts, so it cannot run this kernel; its tests run on the H100."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    B, Sq, N, H = q.shape
    Sk, K = k.shape[1], k.shape[2]
    G = N // K
    bq, bkv = block_sizes.block_q, block_sizes.block_kv
    n_kv = Sk // bkv
    stages = max(1, min(block_sizes.num_stages, n_kv))
    pair_heads = G % 2 == 0
    pingpong = block_sizes.pingpong
    dtype = q.dtype
    scale2 = sm_scale * LOG2E  # scores in log2 units, so the softmax uses exp2

    # Work tiles: (query-head unit, query block, batch row); a unit is two heads (pair_heads) or one head.
    units, qblocks = (N // 2, Sq // bq) if pair_heads else (N, Sq // (2 * bq))
    total = units * qblocks * B
    persistent = block_sizes.persistent
    # Persistent: one CTA per SM walks tiles cta, cta + n_ctas, ... so that the memory warpgroup already
    # loads the next tile's K/V while the compute warpgroups finish the current one.
    n_ctas = min(total, _num_sms()) if persistent else total
    # A separate output buffer lets the next tile's Q load start while the last output is stored, but it
    # takes the shared memory of a third K/V stage: with three stages, Q and O share one buffer.
    shared_qo = not persistent or stages >= 3
    prefetch_q = block_sizes.prefetch_q
    if prefetch_q and (not persistent or stages >= 3 or (return_lse and H >= 128)):
        raise ValueError(f"prefetch_q needs persistent=True, num_stages <= 2 and, at head_dim={H}, no lse (shared "
                         f"memory); got {block_sizes}, {return_lse=}")
    q_bufs = 2 if prefetch_q else 1

    def tile_of(t, w):
        """(batch row, query head, first query) of compute warpgroup w in tile t. Units vary fastest (the
        CTAs of one KV group run side by side); under the causal mask the last query blocks have the most
        work, so they come first and the short ones fill the tail of the schedule."""
        unit, rest = lax.rem(t, units), lax.div(t, units)
        qi, b = lax.rem(rest, qblocks), lax.div(rest, qblocks)
        if causal:
            qi = qblocks - 1 - qi
        if pair_heads:
            return b, unit * 2 + w, qi * bq
        return b, unit, (qi * 2 + w) * bq

    def kv_steps(q0):
        """K/V tiles the queries [q0, q0 + bq) see (a Python int when it does not depend on q0)."""
        if not causal:
            return n_kv
        return jnp.minimum(n_kv, lax.div(q0 + bq + bkv - 1, jnp.int32(bkv)))

    def iota(shape, dim):
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def tiles(cta, fn):
        """Runs fn(t, g) -> g over this CTA's tiles; g counts the K/V steps of the tiles before.
        (A snake order over the rounds, to even out the heaviest-first tiles between CTAs, measured
        slower at S=1024 and S=4096 on the H100: 0.44 against 0.34 ms at B16 S1024. Not used.)"""
        if not persistent:
            fn(cta, 0)  # a Python 0: the Mosaic GPU lowering takes no array constants here
            return
        pl.loop(cta, total, step=n_ctas, init_carry=jnp.int32(0))(fn)

    def body(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, o_smem, k_smem, v_smem, lse_smem,
             q_bar, k_bar, v_bar, k_free, v_free, sched):  # lse_ref, lse_smem: None without return_lse
        cta, wg = lax.axis_index("cta"), lax.axis_index("wg")

        def sync():  # rendezvous of the two compute warpgroups
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        def slot_of(g):  # K/V steps are numbered across the CTA's tiles: g picks the ring slot
            return g % stages if isinstance(g, int) else lax.rem(g, jnp.int32(stages))

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            my_o = o_smem.at[wg, 0] if shared_qo else o_smem.at[wg]  # shared: o_smem is the Q buffer

            def load_q(t, buf):
                b, head, q0 = tile_of(t, wg)
                plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), head], q_smem.at[wg, buf],
                                        q_bar.at[wg * q_bufs + buf])

            def tile(t, g):  # g: K/V steps of this CTA's earlier tiles
                b, head, q0 = tile_of(t, wg)
                steps = kv_steps(q0)
                cta_steps = kv_steps(tile_of(t, 1)[2])  # warpgroup 1 reaches furthest under the mask
                if prefetch_q:  # tile i of this CTA reads buffer i % 2 and fills the other for tile i + 1
                    i = lax.div(t - cta, jnp.int32(n_ctas))
                    buf = lax.rem(i, jnp.int32(2))
                    pl.when(i == 0)(lambda: load_q(t, buf))
                    pl.when(t + n_ctas < total)(lambda: load_q(t + n_ctas, 1 - buf))
                else:
                    buf = 0
                    if persistent and shared_qo:  # the previous tile's output may still be leaving this buffer
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    load_q(t, buf)
                my_q = q_smem.at[wg, buf]
                plgpu.barrier_wait(q_bar.at[wg * q_bufs + buf])

                row_layout = plgpu.Layout.WGMMA.reduce(1)
                o = plgpu.layout_cast(jnp.zeros((bq, H), jnp.float32), plgpu.Layout.WGMMA)
                m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
                l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout)
                if pingpong:
                    pl.when(wg == 1)(sync)  # warpgroup 1 starts one phase behind

                def step(j, carry, masked: bool):
                    o, m, l = carry
                    slot = slot_of(g + j)

                    def qk(acc):
                        plgpu.wgmma(acc, my_q, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        if pingpong:
                            sync()  # the other warpgroup may now issue its products
                        return acc[...]

                    s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    if masked:
                        s = jnp.where(iota((bq, bkv), 0) + q0 >= iota((bq, bkv), 1) + j * bkv, s, -jnp.inf)
                    # The scale enters with the subtraction (one fma per score, not a multiply and a
                    # subtract): the softmax shares the SM's issue slots with the other warpgroup's.
                    m_new = jnp.maximum(m, s.max(axis=1) * scale2)
                    alpha = jnp.exp2(m - m_new)
                    p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
                    l = l * alpha + p.sum(axis=1)
                    o = o * lax.broadcast_in_dim(alpha, o.shape, [0])
                    p = p.astype(dtype)
                    if pingpong:
                        plgpu.barrier_arrive(sched)  # softmax done
                    plgpu.barrier_wait(v_bar.at[slot])
                    if pingpong:
                        plgpu.barrier_wait(sched)  # tensor cores free of the other warpgroup's work

                    def pv(acc):
                        plgpu.wgmma(acc, p, v_smem.at[slot])
                        # wait for the next K tile while this product runs
                        pl.when(j + 1 < steps)(lambda: plgpu.barrier_wait(k_bar.at[slot_of(g + j + 1)]))

                    o = pl.run_state(pv)(plgpu.ACC.init(o))
                    plgpu.barrier_arrive(v_free.at[slot])
                    return o, m_new, l

                carry = (o, m, l)
                if causal:
                    pl.when(steps > 0)(lambda: plgpu.barrier_wait(k_bar.at[slot_of(g)]))
                    # Tiles wholly below the diagonal need no mask; the last one or two straddle it.
                    unmasked = jnp.minimum(steps, lax.div(q0 + 1, jnp.int32(bkv)))
                    carry = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), carry)
                    carry = lax.fori_loop(unmasked, steps, functools.partial(step, masked=True), carry)
                else:  # n_kv >= 1: the key length is a positive multiple of block_kv
                    plgpu.barrier_wait(k_bar.at[slot_of(g)])
                    carry = lax.fori_loop(0, steps, functools.partial(step, masked=False), carry)
                o, m, l = carry

                if causal and not pair_heads:
                    @pl.loop(steps, cta_steps)
                    def _release(j):  # tiles loaded for the other warpgroup only: release them, keep the rhythm
                        slot = slot_of(g + j)
                        # waiting keeps this warpgroup's view of each barrier's phase in step
                        plgpu.barrier_wait(k_bar.at[slot])
                        plgpu.barrier_arrive(k_free.at[slot])
                        plgpu.barrier_wait(v_bar.at[slot])
                        plgpu.barrier_arrive(v_free.at[slot])
                        if pingpong:
                            sync()
                            sync()

                if pingpong:
                    pl.when(wg == 0)(sync)  # balance warpgroup 1's opening phase

                o = o / lax.broadcast_in_dim(l, o.shape, [0])
                if persistent and not shared_qo:  # the previous tile's output may still be leaving my_o
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                my_o[...] = o.astype(dtype)
                if return_lse:
                    lse_smem.at[wg][...] = (m + jnp.log2(l)) * (1.0 / LOG2E)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(my_o, o_ref.at[b, pl.ds(q0, bq), head])
                if return_lse:
                    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, head, pl.ds(q0, bq)])
                return g + cta_steps

            tiles(cta, tile)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def tile(t, g):
                b, head, _ = tile_of(t, 0)
                kv_head = lax.div(head, jnp.int32(G))
                cta_steps = kv_steps(tile_of(t, 1)[2])

                @pl.loop(0, cta_steps)
                def _load(j):
                    slot = slot_of(g + j)
                    src = (b, pl.ds(j * bkv, bkv), kv_head)
                    reused = g + j >= stages  # a slot's first fill waits for nobody
                    pl.when(reused)(lambda: plgpu.barrier_wait(k_free.at[slot]))
                    plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_bar.at[slot])
                    pl.when(reused)(lambda: plgpu.barrier_wait(v_free.at[slot]))
                    plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_bar.at[slot])

                return g + cta_steps

            tiles(cta, tile)

    def entry(q_ref, k_ref, v_ref, o_ref, lse_ref=None):
        swizzled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))

        def scoped(q_smem, o_smem, *rest):  # o_smem None: the output goes out through the Q buffer
            body(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, q_smem if o_smem is None else o_smem, *rest)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((2, q_bufs, bq, H), dtype, **swizzled),  # [warpgroup, buffer]
            None if shared_qo else plgpu.SMEM((2, bq, H), dtype, **swizzled),
            plgpu.SMEM((stages, bkv, H), dtype, **swizzled),
            plgpu.SMEM((stages, bkv, H), dtype, **swizzled),
            plgpu.SMEM((2, bq), jnp.float32) if return_lse else None,  # 512 bytes
            plgpu.Barrier(num_barriers=2 * q_bufs),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    out_type = [jax.ShapeDtypeStruct(q.shape, dtype)]
    if return_lse:  # [B, N, Sq]: each warpgroup's 64 values are contiguous, one TMA store
        out_type.append(jax.ShapeDtypeStruct((B, N, Sq), jnp.float32))
    outs = plgpu.kernel(
        entry,
        out_type=tuple(out_type),
        grid=(n_ctas,),
        grid_names=("cta",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v)
    return (outs[0], jnp.swapaxes(outs[1], 1, 2)) if return_lse else outs[0]


def _num_sms() -> int:
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)
