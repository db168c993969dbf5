"""The Pallas quantized matmul (interpret mode on the CPU, native on a GPU) against the jnp reference and
against `einsum` with jinfer.quant's own `dequantize`, on weights quantized by the project's RTN quantizer:
both paths ("mma": M around the 16-row tile; "fma": one row and a few), every format, per-channel and grouped
scales (K = 576: a short last group of 128), N off the block, float32 and bfloat16 activations, float16 and
float32 scales, a stacked weight read at a traced layer, multi-axis weights and an input scale through the
public entry."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.kernels.quant_matmul import quantized_matmul, quantized_matmul_reference
from jinfer.kernels.quant_matmul.tuning import QuantMatmulBlockSizes, block_sizes_for
from jinfer.quant.qtensor import QTensor, dequantize, qeinsum, to_out_in
from jinfer.quant.rtn import quantize

# The same tests run natively on a GPU (JAX_PLATFORMS=cuda), interpreted elsewhere.
NATIVE = jax.devices()[0].platform == "gpu"
INTERPRET = not NATIVE
# Relative (norm) error: against the reference, which multiplies the same float32 numbers in another order;
# against einsum(dequantize(w, x.dtype)), which rounds the weight to x's dtype first.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}
TOL_DEQUANTIZED = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2, jnp.float16: 3e-3}
K, N = 576, 192  # N: 1.5 blocks of 128 columns (int4: 96 bytes, 1.5 blocks of 64)


def make_weight(rng, fmt, group_size, *, k=K, n=N, layers=None, scale_dtype=jnp.float32) -> QTensor:
    shape = (k, n) if layers is None else (layers, k, n)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    qt = quantize(w, fmt=fmt, n_in=1, group_size=group_size, lead=0 if layers is None else 1)
    cast = None if qt.offset is None else qt.offset.astype(scale_dtype)
    return dataclasses.replace(qt, scale=qt.scale.astype(scale_dtype), offset=cast)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(out, x, w: QTensor, layer=None):
    """`out` against the reference and against einsum with jinfer.quant's dequantize, for one layer."""
    if layer is not None:
        w = jax.tree.map(lambda a: a[layer], w)
    dtype = jnp.dtype(x.dtype).type
    ref = quantized_matmul_reference(x, w.values, w.scale, w.offset, fmt=w.fmt, group_size=w.group_size)
    with jax.default_matmul_precision("highest"):
        deq = jnp.einsum("mk,kn->mn", x, dequantize(w, x.dtype))
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel(out, ref) < TOL[dtype], rel(out, ref)
    assert rel(out, deq) < TOL_DEQUANTIZED[dtype], rel(out, deq)


CASES = [  # (fmt, group_size): per channel, groups of 32 (block_k 32), 128 (K = 576: the last group 64 long)
    (fmt, g) for fmt in ("int8", "int4", "fp8") for g in (0, 32, 128)
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference(dtype, case):
    fmt, g = CASES[case]
    i = case + (dtype == jnp.bfloat16)
    m = (1, 5, 16, 33)[i % 4]  # one row, a padded tile, one whole tile, a second tile of one row
    rng = np.random.default_rng(case * 2 + (dtype == jnp.bfloat16))
    w = make_weight(rng, fmt, g, scale_dtype=(jnp.float32, jnp.float16)[i % 2])
    x = jnp.asarray(rng.normal(size=(m, K)), dtype)
    # block_n 128 leaves N = 192 a ragged last block (64: none); block_k 128 with no groups leaves K = 576 a
    # ragged last step; split_k 2 sums two partials.
    bs = QuantMatmulBlockSizes(block_m=16, block_n=(128, 64)[i // 2 % 2], block_k=min(g or 128, 128),
                               split_k=1 + i % 2)
    check(quantized_matmul(x, w, block_sizes=bs, interpret=INTERPRET), x, w)


FMA_CASES = [(fmt, g) for fmt in ("int8", "int4", "fp8") for g in (0, 128)]


@pytest.mark.parametrize("case", range(len(FMA_CASES)))
def test_fma_path_matches_reference(case):
    """The CUDA-core path: one row (per-group scales deferred to the group's sums) and three (with groups,
    scaled in the tile), K = 576 ragged against the 2-step chunk and the last group of 128, N = 192 against
    block_n 128 (int4: 64 bytes of 128 columns), split_k 1 and 2, loads in the loop and prefetched."""
    fmt, g = FMA_CASES[case]
    rng = np.random.default_rng(100 + case)
    w = make_weight(rng, fmt, g, scale_dtype=(jnp.float32, jnp.float16)[case % 2])
    for m, dtype in ((1, (jnp.float32, jnp.bfloat16)[case % 2]), (3, (jnp.bfloat16, jnp.float32)[case % 2])):
        x = jnp.asarray(rng.normal(size=(m, K)), dtype)
        bs = QuantMatmulBlockSizes(block_n=128, block_k=32, path="fma", unroll=2, split_k=1 + (m + case) % 2,
                                   prefetch=m == 3)
        check(quantized_matmul(x, w, block_sizes=bs, interpret=INTERPRET), x, w)


def test_default_block_sizes():
    """The tuning table's sizes for the shape (not the test's hand-picked ones) at K and N off their blocks."""
    rng = np.random.default_rng(7)
    w = make_weight(rng, "int4", 128, k=320, n=96)
    x = jnp.asarray(rng.normal(size=(3, 320)), jnp.bfloat16)
    check(quantized_matmul(x, w, interpret=INTERPRET), x, w)


@pytest.mark.parametrize("path", ["mma", "fma"])
@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_stacked_weight_at_traced_layer(fmt, path):
    rng = np.random.default_rng(11)
    w = make_weight(rng, fmt, 64, k=256, n=160, layers=3)
    x = jnp.asarray(rng.normal(size=(4 if path == "mma" else 1, 256)), jnp.float32)
    bs = QuantMatmulBlockSizes(block_m=16, block_n=64, block_k=64 if path == "mma" else 32, split_k=2, path=path)
    f = jax.jit(lambda x, w, layer: quantized_matmul(x, w, layer=layer, block_sizes=bs, interpret=INTERPRET))
    outs = [f(x, w, jnp.int32(layer)) for layer in (0, 2)]  # one compilation: the layer is traced
    for layer, out in zip((0, 2), outs):
        check(out, x, w, layer)
    assert rel(outs[0], outs[1]) > 0.1


LOWERED = [(fmt, path, "in_out") for fmt in ("int8", "int4", "fp8") for path in ("mma", "fma")] + [
    ("int4", "mma", "out_in"), ("int8", "mma", "out_in")]  # the outputs-first kernel (out_in.py), PTX included


@pytest.mark.skipif(NATIVE, reason="the GPU compiles the kernel in every other test")
@pytest.mark.parametrize("fmt,path,layout", LOWERED)
def test_lowers_to_triton_reading_the_stacked_weight_in_place(fmt, path, layout):
    """On the CPU, the Triton lowering itself (what interpret mode skips): it must accept every load, cast and
    store, and the stacked weight must reach the kernel whole (no slice or gather of a layer before it)."""
    w = jax.eval_shape(lambda: (to_out_in if layout == "out_in" else lambda q: q)(
        make_weight(np.random.default_rng(0), fmt, 64, k=576, n=192, layers=4)))
    x = jax.ShapeDtypeStruct((5 if path == "mma" else 2, 576), jnp.bfloat16)
    bs = QuantMatmulBlockSizes(block_n=128, block_k=64, split_k=2, path=path)
    traced = jax.jit(lambda x, w, layer: quantized_matmul(x, w, layer=layer, block_sizes=bs, interpret=False)
                     ).trace(x, w, jax.ShapeDtypeStruct((), jnp.int32))
    try:
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:  # jax >= 0.11 asks for a GPU (its compute capability) to lower for one
        pytest.skip(f"this jax cannot lower for a GPU without one: {e}")
    assert "__gpu$xla.gpu.triton" in text
    assert "dynamic_slice" not in text and "gather" not in text


def test_multi_axis_weight_and_input_scale():
    """wo-like [N, H, D] (two contracted axes) and wq-like [D, N, H] (two output axes, int4 packed along H),
    through the public entry, against qeinsum; the second with an input scale that x is divided by."""
    rng = np.random.default_rng(3)
    wo = quantize(jnp.asarray(rng.normal(size=(3, 64, 160)), jnp.float32), fmt="int8", n_in=2, group_size=64)
    x = jnp.asarray(rng.normal(size=(2, 3, 3, 64)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        want = qeinsum("btnh,nhd->btd", x, wo)
    got = quantized_matmul(x, wo, interpret=INTERPRET)
    assert got.shape == (2, 3, 160) and rel(got, want) < TOL[jnp.float32]

    wq = quantize(jnp.asarray(rng.normal(size=(160, 3, 64)), jnp.float32), fmt="int4", n_in=1, group_size=32)
    wq = dataclasses.replace(wq, input_scale=jnp.asarray(rng.uniform(0.5, 2.0, size=(160,)), jnp.float32))
    x = jnp.asarray(rng.normal(size=(5, 160)), jnp.bfloat16)
    with jax.default_matmul_precision("highest"):
        want = qeinsum("td,dnh->tnh", x, wq)
    got = quantized_matmul(x, wq, interpret=INTERPRET)
    assert got.shape == (5, 3, 64) and rel(got, want) < TOL_DEQUANTIZED[jnp.bfloat16]


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("split_k", [1, 3])
def test_unsummed_splits_sum_to_the_product(layout, split_k):
    """sum_splits=False: the split_k programs' partial products [S, ..., N], which sum to the product (float32
    partials where S > 1), for a reader that sums them itself."""
    rng = np.random.default_rng(split_k)
    stored = make_weight(rng, "int4", 32)
    w = to_out_in(stored) if layout == "out_in" else stored
    x = jnp.asarray(rng.normal(size=(2, 1, K)), jnp.float32)
    path = "mma" if layout == "out_in" else "fma"
    bs = QuantMatmulBlockSizes(block_n=128, block_k=32, split_k=split_k, path=path, num_stages=1)
    parts = quantized_matmul(x, w, block_sizes=bs, interpret=INTERPRET, sum_splits=False)
    assert parts.shape == (split_k, 2, 1, N) and parts.dtype == jnp.float32
    check(parts.sum(axis=0).reshape(2, N), x.reshape(2, K), stored)
    whole = quantized_matmul(x, w, block_sizes=bs, interpret=INTERPRET)
    np.testing.assert_allclose(np.asarray(parts.sum(axis=0)), np.asarray(whole), rtol=1e-6, atol=1e-5)


def test_no_rows():
    w = make_weight(np.random.default_rng(0), "int8", 0, k=64, n=32)
    assert quantized_matmul(jnp.zeros((0, 64), jnp.bfloat16), w, interpret=INTERPRET).shape == (0, 32)


def test_errors_name_the_values():
    rng = np.random.default_rng(0)
    w = make_weight(rng, "int4", 64, k=128, n=64)
    x = jnp.ones((2, 128), jnp.float32)
    with pytest.raises(ValueError, match="act='int8'"):
        w8 = quantize(jnp.ones((128, 64)), fmt="int8", n_in=1)
        quantized_matmul(x, dataclasses.replace(w8, act="int8"), interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"trailing 1 axes \(100,\)"):
        quantized_matmul(jnp.ones((2, 100)), w, interpret=INTERPRET)
    with pytest.raises(ValueError, match="pass layer"):
        quantized_matmul(x, w, layer=0, interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_k=128 must divide group_size=64"):
        quantized_matmul(x, w, block_sizes=QuantMatmulBlockSizes(block_k=128), interpret=INTERPRET)
    with pytest.raises(ValueError, match="block_n=16 must be a power of two >= 32"):
        quantized_matmul(x, w, block_sizes=QuantMatmulBlockSizes(block_n=16, block_k=64), interpret=INTERPRET)
    with pytest.raises(ValueError, match="path='fma' takes at most 8 rows of x"):
        quantized_matmul(jnp.ones((9, 128)), w, block_sizes=QuantMatmulBlockSizes(block_k=64, path="fma"),
                         interpret=INTERPRET)
    with pytest.raises(ValueError, match="path='gemv' must be 'mma' or 'fma'"):
        quantized_matmul(x, w, block_sizes=QuantMatmulBlockSizes(block_k=64, path="gemv"), interpret=INTERPRET)


def test_block_sizes_for():
    bs = block_sizes_for(1, 4096, 1024, "int4", "NVIDIA H200", group_size=32)
    assert bs.block_k == 32 and bs.path == "fma"
    assert bs.split_k > 1  # a few column blocks alone would leave most of the 132 multiprocessors idle
    assert block_sizes_for(16, 4096, 4096, "int8", "NVIDIA H200").path == "mma"
    assert block_sizes_for(64, 4096, 4096, "fp8", "NVIDIA H200", group_size=32).block_k == 32
    big = block_sizes_for(256, 4096, 14336, "int8", "NVIDIA H200")
    assert big.path == "mma" and big.block_m >= 16 and big.split_k <= 2  # 2 M blocks x 112 N blocks fill it


def _run_ptx(asm: str, words: np.ndarray) -> list[np.ndarray]:
    """Emulates `dequant.INT4_PTX`'s instructions (mov, shl, shr, lop3) on 32-bit words ($4); returns $0-$3."""
    regs, out = {"$4": words.astype(np.uint32)}, {}
    for ins in (s.strip() for s in asm.strip("{} ").split(";") if s.strip() and not s.strip().startswith(".reg")):
        op, args = ins.split(None, 1)
        a = [v.strip() for v in args.split(",")]
        val = lambda r: regs[r] if r in regs else np.uint32(int(r, 0))  # noqa: E731
        if op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op in ("shl.b32", "shr.u32"):
            regs[a[0]] = (val(a[1]) << np.uint32(int(a[2]))) if op == "shl.b32" else (val(a[1]) >> np.uint32(int(a[2])))
        elif op == "lop3.b32":
            x, y, z, lut = val(a[1]), val(a[2]), val(a[3]), int(a[4], 0)
            assert lut == 0xEA, ins  # (x & y) | z
            out[a[0]] = regs[a[0]] = (x & y) | z
        else:
            raise AssertionError(f"unexpected instruction {ins!r}")
    return [out[f"${i}"] for i in range(4)]


def test_int4_ptx_unpacks_each_nibble_to_one_plus_it_over_16():
    """The compiled kernel's int4 unpack (PTX: the CPU cannot run it, so its instructions are emulated here): byte
    i of a word gives 1 + low nibble / 16 (the first block) and 1 + high nibble / 16 (the second), as the jnp
    form that interpret mode runs."""
    from jinfer.kernels.quant_matmul.dequant import INT4_PTX, fma_values

    words = np.random.default_rng(0).integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    data = words.view(np.uint8).reshape(-1, 4)  # little-endian: byte i of each word
    jnp_lo, jnp_hi = (np.asarray(f) for f in fma_values(jnp.asarray(data), "int4"))
    for half, (asm, via_jnp) in enumerate(zip(INT4_PTX, (jnp_lo, jnp_hi))):
        got = np.stack([r.view(np.float32) for r in _run_ptx(asm, words)], axis=1)
        want = 1 + ((data >> (4 * half)) & 0xF).astype(np.float32) / 16
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(via_jnp, want)
