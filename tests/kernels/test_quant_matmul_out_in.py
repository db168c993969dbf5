"""The kernel on int4 / int8 weights stored "out_in" (jinfer.kernels.quant_matmul.out_in) against the plain-jnp
reference on the importers' layout (`quantized_matmul_reference`) and against einsum over jinfer.quant's own
dequantize: fresh random weights and inputs, ragged K, N and M, groups that do and do not divide K, split K,
stacked weights at a traced layer. Natively on a GPU (JAX_PLATFORMS=cuda), interpreted elsewhere (its Triton
lowering: test_quant_matmul.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.kernels.quant_matmul import quantized_matmul
from jinfer.kernels.quant_matmul.dequant import INT4_PAIRS_PTX, pair_values
from jinfer.kernels.quant_matmul.out_in import out_in_matmul_triton
from jinfer.kernels.quant_matmul.tuning import QuantMatmulBlockSizes, block_sizes_for
from jinfer.quant.qtensor import qeinsum, to_out_in
from jinfer.quant.rtn import quantize
from tests.kernels.test_quant_matmul import TOL_DEQUANTIZED, K, check, make_weight, rel  # K = 576: 4.5 groups of 128

NATIVE = jax.devices()[0].platform == "gpu"
INTERPRET = not NATIVE


def weights(rng, group, *, fmt="int4", **kw):
    """(the importers' leaf, the same weight stored out_in)."""
    w = make_weight(rng, fmt, group, **kw)
    return w, to_out_in(w)


CASES = [  # (format, M, x dtype, group size, block_n, block_k, split_k)
    ("int4", 1, jnp.bfloat16, 128, 128, 128, 1),  # the decode row; K's last group 64 long
    ("int4", 1, jnp.float32, 32, 64, 32, 3),
    ("int4", 5, jnp.bfloat16, 32, 128, 32, 2),  # a padded tile of rows
    ("int4", 16, jnp.float16, 0, 64, 64, 1),  # one group over all of K (per output channel)
    ("int4", 33, jnp.bfloat16, 64, 128, 64, 2),  # a second tile of rows holding one
    ("int4", 3, jnp.float32, 128, 64, 128, 2),
    ("int8", 1, jnp.bfloat16, 0, 128, 128, 2),  # per output channel, K = 576 ragged against the step
    ("int8", 5, jnp.float32, 128, 64, 64, 1),
    ("int8", 33, jnp.float16, 32, 128, 32, 3),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(case):
    fmt, m, dtype, group, bn, bk, split = CASES[case]
    rng = np.random.default_rng(40 + case)
    w, t = weights(rng, group, fmt=fmt, scale_dtype=(jnp.float32, jnp.float16)[case % 2])
    x = jnp.asarray(rng.normal(size=(m, K)), dtype)
    bs = QuantMatmulBlockSizes(block_m=16, block_n=bn, block_k=bk, split_k=split)
    check(quantized_matmul(x, t, block_sizes=bs, interpret=INTERPRET), x, w)


def test_default_block_sizes_and_multi_axis_weights():
    """The tuning table's sizes, through the public entry with wq-like [D, N, H] and wo-like [N, H, D] weights
    (pairs along the last input axis: D, then H), against qeinsum on the importers' layout."""
    rng = np.random.default_rng(5)
    for shape, n_in, spec, xs in (((320, 3, 32), 1, "td,dnh->tnh", (3, 320)),
                                  ((3, 32, 96), 2, "tnh,nhd->td", (2, 3, 32))):
        w = quantize(jnp.asarray(rng.normal(size=shape), jnp.float32), fmt="int4", n_in=n_in, group_size=32)
        x = jnp.asarray(rng.normal(size=xs), jnp.bfloat16)
        with jax.default_matmul_precision("highest"):
            want = qeinsum(spec, x, w)
        got = quantized_matmul(x, to_out_in(w), interpret=INTERPRET)
        assert got.shape == want.shape and rel(got, want) < TOL_DEQUANTIZED[jnp.bfloat16]


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_stacked_weight_at_traced_layer(fmt):
    rng = np.random.default_rng(11)
    w, t = weights(rng, 64, fmt=fmt, k=256, n=160, layers=3)
    x = jnp.asarray(rng.normal(size=(2, 256)), jnp.float32)
    bs = QuantMatmulBlockSizes(block_m=16, block_n=64, block_k=64, split_k=2)
    f = jax.jit(lambda x, t, layer: quantized_matmul(x, t, layer=layer, block_sizes=bs, interpret=INTERPRET))
    for layer in (0, 2):  # one compilation: the layer is traced
        check(f(x, t, jnp.int32(layer)), x, w, layer)


def _run_pairs_ptx(asm: str, pairs: np.ndarray) -> np.ndarray:
    """Emulates `INT4_PAIRS_PTX`'s instructions (mov, prmt, shr, lop3) on registers holding two bytes ($1);
    returns $0."""
    regs = {"$1": pairs.astype(np.uint32)}
    val = lambda r: regs[r] if r in regs else np.uint32(int(r, 0))  # noqa: E731
    for ins in (s.strip() for s in asm.strip("{} ").split(";") if s.strip() and not s.strip().startswith(".reg")):
        op, args = ins.split(None, 1)
        a = [v.strip() for v in args.split(",")]
        if op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "prmt.b32":
            src = (val(a[1]).astype(np.uint64) | (val(a[2]).astype(np.uint64) << np.uint64(32)))
            sel, out = int(a[3], 0), np.zeros_like(regs["$1"])
            for byte in range(4):
                pick = (sel >> (4 * byte)) & 0x7  # no sign replication (bit 3) in these selectors
                out |= (((src >> np.uint64(8 * pick)) & np.uint64(0xFF)).astype(np.uint32) << np.uint32(8 * byte))
            regs[a[0]] = out
        elif op == "shr.u32":
            regs[a[0]] = val(a[1]) >> np.uint32(int(a[2]))
        elif op == "lop3.b32":
            assert int(a[4], 0) == 0xEA, ins  # (x & y) | z
            regs[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        else:
            raise AssertionError(f"unexpected instruction {ins!r}")
    return regs["$0"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_pairs_ptx_gives_what_the_jnp_form_gives(dtype):
    """The compiled kernel's unpack (PTX the CPU cannot run, emulated here): two bytes become one register of
    two 16-bit numbers, bias + the low nibbles (first block) or the high ones (second), the first byte's in the
    low half: the bits interpret mode's jnp form gives, and bias + nibble as numbers."""
    data = np.random.default_rng(0).integers(0, 256, (4096, 2), dtype=np.uint8)
    words = data[:, 0].astype(np.uint32) | (data[:, 1].astype(np.uint32) << 8)
    via_jnp = [np.asarray(v) for v in pair_values(jnp.asarray(data), dtype)]
    bias = {jnp.bfloat16: 128.0, jnp.float16: 1024.0}[dtype]
    for half, (asm, want) in enumerate(zip(INT4_PAIRS_PTX[jnp.dtype(dtype)], via_jnp)):
        got = _run_pairs_ptx(asm, words).view(np.uint16).reshape(-1, 2).view(jnp.dtype(dtype))
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
        np.testing.assert_array_equal(want.astype(np.float32), bias + ((data >> (4 * half)) & 0xF))


def test_errors_name_the_values():
    rng = np.random.default_rng(0)
    _, t = weights(rng, 32, k=64, n=32)
    x = jnp.zeros((1, 64), jnp.bfloat16)
    bs = QuantMatmulBlockSizes(block_m=16, block_n=32, block_k=32)
    values = t.values.reshape(1, 32, 32)
    scale, offset = t.scale.reshape(1, 2, 32), t.offset.reshape(1, 2, 32)
    def call(x=x, values=values, scale=scale, offset=offset, fmt="int4", bs=bs):
        return out_in_matmul_triton(x, values, scale, offset, jnp.int32(0), fmt=fmt, group_size=32, block_sizes=bs,
                                    interpret=True)

    with pytest.raises(ValueError, match=r"x has 62 inputs .* K=64"):
        call(x=x[:, :62])
    with pytest.raises(ValueError, match=r"scale must be float32 or float16 \[1, 2, 32\]"):
        call(scale=scale[:, :1])
    with pytest.raises(ValueError, match="block_k >= 32"):
        call(bs=dataclasses.replace(bs, block_k=16))
    with pytest.raises(ValueError, match="path='mma'"):
        call(bs=dataclasses.replace(bs, path="fma"))
    with pytest.raises(ValueError, match="fmt='fp8': the out_in kernel reads int4 and int8"):
        call(fmt="fp8")
    with pytest.raises(ValueError, match="x has 64 inputs .* K=32"):  # int4's bytes read as int8 values
        call(fmt="int8", values=values.astype(jnp.int8), offset=None)


def test_block_sizes_for_out_in():
    for fmt in ("int4", "int8"):
        bs = block_sizes_for(1, 4096, 14336, fmt, "NVIDIA H200", 128, layout="out_in")
        assert bs.path == "mma" and bs.block_k == 128 and bs.split_k > 1
    assert block_sizes_for(64, 4096, 4096, "int4", "NVIDIA H200", 32, layout="out_in").block_k == 32
