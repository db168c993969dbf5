"""RMSNorm of a layer in one launch, its gain read in place from the stacked [L, D] array.

Why a kernel: at batch 1 XLA makes a layer's RMSNorm a reduction, a multiply and (for the scan's slice of the
gain) a dynamic slice, three launches of ~1.5 us each on the H200 for 8 kB of data (RESULTS.md, session 30);
for 16 rows and more it fuses the norm into one Triton kernel but still slices the gain apart. One program a
row: the row is loaded once (D rounded up to a power of two, masked), its mean square reduced in float32, and
the normalized row, cast to x's dtype, multiplied by the layer's gain.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class RMSNormBlockSizes:
    num_warps: int = 4  # one row of D values over these warps; D = 4096 is 32 float32 values a thread


def load_row(ref, *index):
    """The row ref[*index] [D] whole: D rounded up to a power of two, masked (zeros past D) -> (values
    [block_d], the mask or None)."""
    from jax.experimental.pallas import triton as plgpu

    D = ref.shape[-1]
    block_d = 1 << (D - 1).bit_length()
    ok = None if block_d == D else lax.broadcasted_iota(jnp.int32, (block_d,), 0) < D
    return plgpu.load(ref.at[*index, pl.ds(0, block_d)], mask=ok, other=None if ok is None else 0), ok


def row_factor(x_ref, row, eps: float):
    """The RMSNorm factor (float32) of row `row` of x_ref [R, D], 1 / sqrt(mean(x^2) + eps): what the kernels
    that read a folded norm's product (`jinfer.models.llama.fold_norms`) scale it by."""
    x = load_row(x_ref, row)[0].astype(jnp.float32)
    return lax.rsqrt(jnp.sum(x * x) / x_ref.shape[-1] + eps)


def check_rows(x, eps, T: int) -> None:
    """A folded norm's rows as a kernel takes them: x [T, D] and eps, both or neither."""
    if (x is None) != (eps is None) or (x is not None and (x.ndim != 2 or x.shape[0] != T)):
        raise ValueError(f"x of shape {None if x is None else x.shape} and eps={eps} go together (both or "
                         f"neither), x as [T={T}, D]")


def _kernel(*refs, eps: float, D: int):
    from jax.experimental.pallas import triton as plgpu

    # A plain [D] gain comes without a layer index: its address then waits on no load.
    layer_ref, x_ref, g_ref, o_ref = refs if len(refs) == 4 else (None, *refs)
    row = pl.program_id(0)
    x, ok = load_row(x_ref, row)
    g, _ = load_row(g_ref) if layer_ref is None else load_row(g_ref, layer_ref[0])
    block_d = x.shape[0]
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.sum(x32 * x32) / D + eps)
    out = (g.astype(o_ref.dtype) * normed.astype(x_ref.dtype).astype(o_ref.dtype)).astype(o_ref.dtype)
    plgpu.store(o_ref.at[row, pl.ds(0, block_d)], out, mask=ok)


@functools.partial(jax.jit, static_argnames=("eps", "block_sizes", "interpret"))
def rms_norm_triton(x: jax.Array, gain: jax.Array, layer: jax.Array | None, *, eps: float,
                    block_sizes: RMSNormBlockSizes, interpret: bool) -> jax.Array:
    """x [M, D], gain [L, D] with layer i32[1], or [D] with None -> [M, D] in the dtype of gain * x."""
    from jax.experimental.pallas import triton as plgpu

    M, D = x.shape
    out_dtype = jnp.result_type(gain.dtype, x.dtype)

    def whole(a):
        return pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)

    inputs = (x, gain) if layer is None else (layer, x, gain)

    return pl.pallas_call(
        functools.partial(_kernel, eps=eps, D=D),
        grid=(M,),
        in_specs=[whole(a) for a in inputs],
        out_specs=whole(jax.ShapeDtypeStruct((M, D), out_dtype)),
        out_shape=jax.ShapeDtypeStruct((M, D), out_dtype),
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=block_sizes.num_warps, num_stages=1),
        name="rms_norm",
    )(*inputs)
