"""RoPE of a step's queries and keys and the write of its keys and values into the paged KV cache, in one launch.

Why: at batch 1 on the H200 XLA makes this three kernels a layer (the rotation of q and k, then one in-place
update each for the K and V pages), each ~1.5 us for a few kB (RESULTS.md, session 30). Here one program a
token and a part (its q heads, its k heads, its v heads) reads that part of the fused qkv product once,
rotates it (q and k), and writes it: q to the output, k and v into their pages in place (the pages are aliased
to the outputs). Heads are padded to a power of two and masked; each half of a head is its own tile, as
Triton cannot split a loaded tile.

With rows x [T, D] (a layer whose norm gain was folded into its products, `jinfer.models.llama.fold_norms`), each
program also reduces its token's row of x to the RMSNorm factor and scales what it loads by it first, in float32
rounded back, as `jinfer.models.layers.scale_rows` does: the norm launches no kernel of its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jinfer.kernels.rms_norm.kernel import row_factor


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _kernel(layer_ref, pos_ref, slot_ref, freq_ref, qkv_ref, kp_in, vp_in, *refs, N: int, K: int,
            eps: float | None):
    from jax.experimental.pallas import triton as plgpu

    x_ref, q_ref, kp_ref, vp_ref = refs if eps is not None else (None, *refs)
    del kp_in, vp_in  # aliased to kp_ref and vp_ref: written there in place
    t, part = pl.program_id(0), pl.program_id(1)
    scale = None if x_ref is None else row_factor(x_ref, t, eps)
    half = qkv_ref.shape[-1] // 2
    freqs = pos_ref[t].astype(jnp.float32) * freq_ref[...]  # [H/2]
    # In the activations' dtype op by op, as the model's expression rounds it (XLA keeps that fusion's bfloat16
    # multiplies and subtractions as they are on sm_90: rounding once in float32 would differ from it).
    dtype = qkv_ref.dtype
    cos, sin = jnp.cos(freqs).astype(dtype)[None, :], jnp.sin(freqs).astype(dtype)[None, :]

    def part_of(first: int, heads: int):
        """This token's `heads` heads from `first` of qkv, as two half tiles, and the mask of real heads."""
        hp = _pow2(heads)
        ok = (lax.broadcasted_iota(jnp.int32, (hp, half), 0) < heads) if hp != heads else None
        other = None if ok is None else 0
        first = first + 0 * t  # traced: a static start whose padded tile runs past the end is refused, masked or not
        lo = plgpu.load(qkv_ref.at[t, pl.ds(first, hp), pl.ds(0, half)], mask=ok, other=other)
        hi = plgpu.load(qkv_ref.at[t, pl.ds(first, hp), pl.ds(half, half)], mask=ok, other=other)
        if scale is not None:
            lo, hi = ((a.astype(jnp.float32) * scale).astype(dtype) for a in (lo, hi))
        return lo, hi, hp, ok

    @pl.when(part == 0)
    def _():  # q: rotated, to the output
        lo, hi, hp, ok = part_of(0, N)
        plgpu.store(q_ref.at[t, pl.ds(0, hp), pl.ds(0, half)], lo * cos - hi * sin, mask=ok)
        plgpu.store(q_ref.at[t, pl.ds(0, hp), pl.ds(half, half)], hi * cos + lo * sin, mask=ok)

    S = kp_ref.shape[3]
    layer, page, off = layer_ref[0], slot_ref[t] // S, slot_ref[t] % S

    @pl.when(part == 1)
    def _():  # k: rotated, into its page
        lo, hi, hp, ok = part_of(N, K)
        dst = kp_ref.dtype
        plgpu.store(kp_ref.at[layer, pl.ds(0, hp), page, off, pl.ds(0, half)], (lo * cos - hi * sin).astype(dst),
                    mask=ok)
        plgpu.store(kp_ref.at[layer, pl.ds(0, hp), page, off, pl.ds(half, half)], (hi * cos + lo * sin).astype(dst),
                    mask=ok)

    @pl.when(part == 2)
    def _():  # v: as it is, into its page
        lo, hi, hp, ok = part_of(N + K, K)
        dst = vp_ref.dtype
        plgpu.store(vp_ref.at[layer, pl.ds(0, hp), page, off, pl.ds(0, half)], lo.astype(dst), mask=ok)
        plgpu.store(vp_ref.at[layer, pl.ds(0, hp), page, off, pl.ds(half, half)], hi.astype(dst), mask=ok)


@functools.partial(jax.jit, static_argnames=("num_heads", "num_warps", "interpret", "eps"), donate_argnums=(5, 6))
def rope_and_store_triton(qkv, positions, inv_freq, layer, slot, k_pages, v_pages, x=None, *, num_heads: int,
                          num_warps: int, interpret: bool, eps: float | None = None):
    """qkv [T, N + 2K, H], positions and slot i32[T], inv_freq f32[H/2], layer i32[1], pages [L, K, P, S, H],
    x [T, D] with eps or neither -> (q [T, N, H], k_pages, v_pages)."""
    from jax.experimental.pallas import triton as plgpu

    T, _, H = qkv.shape
    N, K = num_heads, k_pages.shape[1]

    def whole(a):
        return pl.BlockSpec(a.shape, lambda t, p: (0,) * a.ndim)

    inputs = (layer, positions, slot, inv_freq, qkv, k_pages, v_pages, *(() if x is None else (x,)))
    outs = (jax.ShapeDtypeStruct((T, N, H), qkv.dtype), k_pages, v_pages)
    return pl.pallas_call(
        functools.partial(_kernel, N=N, K=K, eps=eps),
        grid=(T, 3),
        in_specs=[whole(a) for a in inputs],
        out_specs=[whole(a) for a in outs],
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in outs],
        input_output_aliases={5: 1, 6: 2},
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name="rope_and_store" if x is None else "rope_norm_and_store",
    )(*inputs)
