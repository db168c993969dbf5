"""The int4 matmul on weights stored "out_in" (`jinfer.quant.qtensor.to_out_in`): values u8[L, N, K // 2], byte j
of row n holding inputs 2j (low nibble) and 2j + 1 (high) of output n, as a Pallas kernel (GPU Triton lowering;
the CPU runs it in interpret mode). out [M, N] = x [M, K] @ W.

Why a second layout (`kernel.py` reads int4 as importers store it, packed along the outputs): there, a weight
tile reaches the matrix units' layout through shared memory one byte a load, and the "fma" path spends three
float32 instructions a weight; both are bound by instruction issue at about 0.3 of the H200's copy bandwidth
(RESULTS.md). Here each output's inputs lie contiguous, so the tile is the *first* operand of the product
(out^T [block_n, block_m] = W^T tile @ x^T, Hopper's matrix unit taking it from registers), the two inputs of a
byte are neighbours in it, and one PTX block (`dequant.INT4_PAIRS_PTX`) turns two bytes into the 16-bit pairs
the unit reads: about one instruction a weight. The tiles stream through shared memory in `num_stages`
asynchronous copies, so the loads of later steps are in flight while a step computes. Compiled offline for
sm_90 (`benchmarks/sass_profile.py`), the main loop at block_n 128, block_k 128, 4 warps spends 3.3
instructions a weight (the "fma" path 4.7, "mma" 4.4; a third of it is x's per-step sums and the scales) at
127 registers a thread; not yet timed on a GPU.

Each K step covers block_k inputs inside one group: the low nibbles multiply x's even inputs and the high ones
its odd inputs (x's tile split in registers), and the step's product is scaled by its group:

    acc += (q_lo @ x_even^T + q_hi @ x_odd^T) * scale[g] + (offset[g] - bias * scale[g]) * rowsum(x_t)

with the tiles holding bias + nibble (bias 128 in bfloat16, 1024 in float16, 0 in float32). Edges of K, N and
M are masked (a masked byte reads 0, and its x lanes read 0 too, so it adds nothing); split_k > 1 gives each of
split_k programs a contiguous share of K and a float32 partial that the wrapper sums. Stacked weights are read
in place through the layer index.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jinfer.kernels.quant_matmul.common import both, i32, iota, launch, load, split_range
from jinfer.kernels.quant_matmul.dequant import INT4_PAIRS_PTX, MMA_INT4_BIAS, pair_values
from jinfer.kernels.quant_matmul.tuning import QuantMatmulBlockSizes
from jinfer.kernels.quant_matmul.validate import check_block_sizes, check_out_in_inputs


def _kernel(
    layer_ref,  # i32[1]
    x_ref,  # [M, K]
    v_ref,  # u8[L, N, K // 2] (int4) | i8[L, N, K]
    s_ref,  # f32 | f16 [L, G, N]
    *refs,  # int4: off_ref like s_ref; then o_ref [S, M, N]
    fmt: str, group_size: int, num_steps: int, steps_per_split: int, block_m: int, block_n: int, block_k: int,
    ptx: bool,
):
    packed = fmt == "int4"
    off_ref, o_ref = refs if packed else (None, *refs)
    i, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    M, K = x_ref.shape
    N = v_ref.shape[1]
    m0, n0 = i * block_m, j * block_n
    bk_stored = block_k // 2 if packed else block_k  # stored columns a step: bytes of pairs, or inputs
    layer = layer_ref[0]
    row_ok = (m0 + iota(block_m) < M) if M % block_m else None  # [bm]
    col_ok = (n0 + iota(block_n) < N) if N % block_n else None  # [bn]
    dtype = x_ref.dtype
    bias = MMA_INT4_BIAS.get(jnp.dtype(dtype), 0.0) if packed else 0.0
    # float32 activations get full-precision products (Triton would otherwise round them to tf32).
    prec = lax.Precision.HIGHEST if dtype == jnp.float32 else None

    def dot(w, x):  # [bn, c] x [bm, c] -> [bn, bm], float32
        return jnp.dot(w, x.T, precision=prec, preferred_element_type=jnp.float32)

    def step(s, acc):
        k0 = s * block_k
        k_ok = (k0 + iota(block_k) < K) if K % block_k else None  # [bk]
        c_ok = (s * bk_stored + iota(bk_stored) < v_ref.shape[2]) if K % block_k else None  # [bk_stored]
        q = load(v_ref.at[layer, pl.ds(n0, block_n), pl.ds(s * bk_stored, bk_stored)],
                 both(None if col_ok is None else col_ok[:, None], None if c_ok is None else c_ok[None, :]))
        x = load(x_ref.at[pl.ds(m0, block_m), pl.ds(k0, block_k)],
                 both(None if row_ok is None else row_ok[:, None], None if k_ok is None else k_ok[None, :]))
        g = k0 // group_size if group_size else i32(0)
        sc = load(s_ref.at[layer, g, pl.ds(n0, block_n)], col_ok).astype(jnp.float32)
        if not packed:  # int8: Triton's cast to x's dtype is exact (PRMT and a packed add, no conversion unit)
            return acc + dot(q.astype(dtype), x) * sc[:, None]
        lo, hi = pair_values(q, dtype, ptx=ptx)  # [bn, bk / 2] each: the even inputs' and the odd ones'
        xe, xo = jnp.unstack(x.reshape(block_m, bk_stored, 2), axis=-1)  # x's even and odd inputs
        off = load(off_ref.at[layer, g, pl.ds(n0, block_n)], col_ok).astype(jnp.float32)
        xsum = jnp.sum(xe.astype(jnp.float32), axis=1) + jnp.sum(xo.astype(jnp.float32), axis=1)  # [bm]
        return acc + (dot(lo, xe) + dot(hi, xo)) * sc[:, None] + (off - bias * sc)[:, None] * xsum[None, :]

    first, last = split_range(split, steps_per_split, num_steps)
    acc = lax.fori_loop(first, last, step, jnp.zeros((block_n, block_m), jnp.float32))
    mask = both(None if row_ok is None else row_ok[:, None], None if col_ok is None else col_ok[None, :])
    plgpu.store(o_ref.at[split, pl.ds(m0, block_m), pl.ds(n0, block_n)], acc.T.astype(o_ref.dtype),
                mask=None if mask is None else jnp.broadcast_to(mask, (block_m, block_n)))


def split_plan(K: int, bs: QuantMatmulBlockSizes) -> tuple[int, int, int]:
    """(K steps, steps per split, splits): split_k programs share K's steps, none left without a step."""
    steps = pl.cdiv(K, bs.block_k)
    per_split = pl.cdiv(steps, min(bs.split_k, steps))
    return steps, per_split, pl.cdiv(steps, per_split)


def kernel_name(fmt: str, bs: QuantMatmulBlockSizes, splits: int) -> str:
    """The compiled kernel's name, which profiles tell variants apart by."""
    return (f"quantized_matmul_{fmt}_out_in_m{bs.block_m}n{bs.block_n}k{bs.block_k}w{bs.num_warps}s{bs.num_stages}"
            f"a{int(bs.ptx)}x{splits}")


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "block_sizes", "interpret", "sum_splits"))
def out_in_matmul_triton(
    x: jax.Array,  # [M, K] f32 | bf16 | f16 (int4: K even)
    values: jax.Array,  # int4: u8[L, N, K // 2]; int8: i8[L, N, K]
    scale: jax.Array,  # f32 | f16 [L, G, N], G = ceil(K / group_size)
    offset: jax.Array | None,  # like scale (int4), else None
    layer: jax.Array,  # i32[]: which of the L weights
    *,
    fmt: str,
    group_size: int,
    block_sizes: QuantMatmulBlockSizes,
    interpret: bool,
    sum_splits: bool = True,
) -> jax.Array:  # [M, N] in x's dtype; sum_splits=False: the splits' partials [S, M, N] (float32 where S > 1)
    check_out_in_inputs(x, values, scale, offset, layer, fmt=fmt, group_size=group_size)
    check_block_sizes(block_sizes, fmt=fmt, group_size=group_size)
    bs = block_sizes
    M, K = x.shape
    N = values.shape[1]
    if bs.path != "mma" or bs.block_k < 32:
        raise ValueError(f"out_in takes path='mma' with block_k >= 32 (int4: two products of block_k // 2 inputs); "
                         f"got path={bs.path!r}, block_k={bs.block_k}")
    steps, per_split, splits = split_plan(K, bs)
    out_dtype = x.dtype if splits == 1 else jnp.float32
    operands = (jnp.reshape(layer, (1,)).astype(jnp.int32), x, values, scale, *(() if offset is None else (offset,)))

    kernel = functools.partial(_kernel, fmt=fmt, group_size=group_size, num_steps=steps, steps_per_split=per_split,
                               block_m=bs.block_m, block_n=bs.block_n, block_k=bs.block_k,
                               ptx=bs.ptx and not interpret and jnp.dtype(x.dtype) in INT4_PAIRS_PTX)
    out = launch(kernel, operands, jax.ShapeDtypeStruct((splits, M, N), out_dtype),
                 (pl.cdiv(M, bs.block_m), pl.cdiv(N, bs.block_n), splits), bs, interpret=interpret,
                 name=kernel_name(fmt, bs, splits))
    if not sum_splits:
        return out
    return (out.sum(axis=0) if splits > 1 else out[0]).astype(x.dtype)
