"""silu(r * gate) * (r * up) with each row's RMSNorm factor r reduced in the same launch (GPU Triton lowering; the
CPU runs it in interpret mode).

Why: with a layer's norm gains folded into its products (`jinfer.models.llama.fold_norms`), the gate/up product
reads the layer's unnormalized rows, and the norm is a factor a row that its reader applies. Here the reader is
the activation, which was a kernel launch anyway: the MLP's RMSNorm costs no launch (at batch 1 on the H200 it
was ~1.9 us a layer for 8 kB; RESULTS.md, session 36). Grid (rows, F / block_f): each program loads its row of x
whole (D rounded up to a power of two, masked), reduces its mean square in float32, then scales, activates and
multiplies its block_f columns of the gate and up halves. The gate/up product may come as the partial products
of a split-K quantized matmul, which the kernel sums in float32 as it loads them: XLA's sum of them would be a
launch of its own between the two kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jinfer.kernels.rms_norm.kernel import row_factor


@dataclasses.dataclass(frozen=True)
class SwigluBlockSizes:
    block_f: int = 1024  # output columns a program (a power of two); F = 14336 is 14 programs a row
    num_warps: int = 4


def default_block_sizes(rows: int) -> SwigluBlockSizes:
    """Narrow blocks for decode rows (more programs for few rows); wide ones for prefill chunks, where each
    program's reload of its row of x (F / block_f loads of D values a row, from L2) would outweigh the gate
    and up columns it reads: 4 reloads a row of F = 14336 instead of 14. Not yet timed on a GPU."""
    return SwigluBlockSizes() if rows <= 64 else SwigluBlockSizes(block_f=4096, num_warps=8)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _kernel(x_ref, gu_ref, o_ref, *, eps: float, F: int, block_f: int):
    from jax.experimental.pallas import triton as plgpu

    row, j = pl.program_id(0), pl.program_id(1)
    r = row_factor(x_ref, row, eps)
    f0 = j * block_f
    ok = None if F % block_f == 0 else f0 + lax.broadcasted_iota(jnp.int32, (block_f,), 0) < F
    other = None if ok is None else 0

    def summed(c0):  # the gate's or the up product's block, its partials summed in float32
        parts = [plgpu.load(gu_ref.at[jnp.int32(p), row, pl.ds(c0, block_f)], mask=ok, other=other).astype(jnp.float32)
                 for p in range(gu_ref.shape[0])]
        return functools.reduce(lambda a, b: a + b, parts)

    gate, up = summed(f0) * r, summed(F + f0) * r
    out = gate / (1.0 + jnp.exp(-gate)) * up
    plgpu.store(o_ref.at[row, pl.ds(f0, block_f)], out.astype(o_ref.dtype), mask=ok)


@functools.partial(jax.jit, static_argnames=("eps", "block_sizes", "interpret", "out_dtype"))
def swiglu_triton(gate_up: jax.Array, x: jax.Array, *, eps: float, block_sizes: SwigluBlockSizes,
                  interpret: bool, out_dtype=None) -> jax.Array:
    """gate_up [S, M, 2F] (S partial products, summed), x [M, D] -> [M, F] in out_dtype (None: gate_up's)."""
    from jax.experimental.pallas import triton as plgpu

    _, M, F2 = gate_up.shape
    F = F2 // 2
    block_f = min(block_sizes.block_f, _pow2(F))

    def whole(a):
        return pl.BlockSpec(a.shape, lambda i, j: (0,) * a.ndim)

    out = jax.ShapeDtypeStruct((M, F), out_dtype or gate_up.dtype)
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps, F=F, block_f=block_f),
        grid=(M, pl.cdiv(F, block_f)),
        in_specs=[whole(x), whole(gate_up)],
        out_specs=whole(out),
        out_shape=out,
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=block_sizes.num_warps, num_stages=1),
        name="swiglu_rms",
    )(x, gate_up)
