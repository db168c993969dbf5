"""The Pallas TPU (Mosaic) ragged paged attention kernel, run in TPU interpret mode on the CPU, against the
`jnp` reference and a dense attention rebuilt from the pages. Unused pages and unfetched VMEM hold NaN.
Quantized pages (int8 / fp8 values, a float32 scale per token and head) too."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from jinfer.kernels.paged_attention.kernel_tpu import TPUBlockSizes, ragged_paged_attention_tpu
from jinfer.kernels.paged_attention.query_layout import query_blocks
from jinfer.quant.kv import QuantizedKV
from tests.kernels.test_paged_attention_kernel import dense_from_pages, make_case, quantize_case, rel, run_reference

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
PAD = 3  # padding token rows past the last real one, as the engine's token buckets leave


def case_lengths(name, ps):
    """(kv_lens, q_lens) of one step, around the page size."""
    if name == "decode":  # kv_len 1, page_size - 1, page_size, page_size + 1, several pages
        return [1, ps - 1, ps, ps + 1, 3 * ps + 2], [1] * 5
    if name == "mixed":  # whole odd prefill, idle slot, odd chunk at an offset, decodes, chunk ending on a
        # page boundary, a two-token chunk inside the first page
        return [ps + 1, 0, 3 * ps - 1, 5, ps, 2 * ps, 3], [ps + 1, 0, ps + 3, 1, 1, ps - 1, 2]
    return [2 * ps + 5, 3, 7], [2 * ps + 5, 3, 2]  # odd: prefills only


def run_tpu(c, layer, bs, interpret=True, **overrides):
    """Pads q with PAD token rows, lays the query blocks out as the engine does and runs the kernel;
    `overrides` replace named arguments (the refusal tests). Returns the padded case and the output."""
    pad = np.random.default_rng(0).normal(size=(PAD,) + c["q"].shape[1:])
    c = {**c, "q": jnp.concatenate([c["q"], jnp.asarray(pad, c["q"].dtype)])}
    T = c["q"].shape[0]
    nb = -(-T // bs.block_q) + len(c["kv_len"])
    blocks, (tb, tr) = query_blocks(c["q_start"], c["q_len"], bs.block_q, nb, T)
    args = dict(q=c["q"], k=c["k"], v=c["v"], layer=jnp.int32(layer), page_table=jnp.asarray(c["page_table"]),
                kv_len=jnp.asarray(c["kv_len"]), query_len=jnp.asarray(c["q_len"]),
                blocks=tuple(map(jnp.asarray, blocks)), tok_block=jnp.asarray(tb), tok_row=jnp.asarray(tr),
                num_blocks=nb)
    args.update(overrides)
    nb = args.pop("num_blocks")
    return c, ragged_paged_attention_tpu(*args.values(), num_blocks=nb, block_sizes=bs, interpret=interpret)


# Pairwise over dtype x GQA x page size x step kind (decode, mixed, odd prefills), then more; block sizes
# vary so the page loop runs 1 to 4 steps, and a slot's chunk spans several query blocks.
COMBOS = [
    (jnp.float32, 1, 8, "decode", TPUBlockSizes(block_q=8, pages_per_block=1), 1),
    (jnp.bfloat16, 1, 16, "mixed", TPUBlockSizes(block_q=8, pages_per_block=2), 1),
    (jnp.bfloat16, 4, 8, "mixed", TPUBlockSizes(block_q=4, pages_per_block=1), 1),
    (jnp.float32, 4, 16, "decode", TPUBlockSizes(), 0),
    (jnp.float32, 8, 8, "mixed", TPUBlockSizes(block_q=2, pages_per_block=3), 1),
    (jnp.bfloat16, 8, 16, "decode", TPUBlockSizes(block_q=8, pages_per_block=2), 1),
    (jnp.bfloat16, 1, 8, "odd", TPUBlockSizes(block_q=4, pages_per_block=1), 1),
    (jnp.float32, 4, 16, "odd", TPUBlockSizes(block_q=8, pages_per_block=3), 1),
    (jnp.float32, 8, 8, "odd", TPUBlockSizes(block_q=8, pages_per_block=1), 1),
    (jnp.float32, 3, 8, "mixed", TPUBlockSizes(block_q=8, pages_per_block=2), 1),  # a group not a power of 2
]


@pytest.mark.parametrize("dtype,G,page_size,kind,bs,layer", COMBOS,
                         ids=[f"{jnp.dtype(d).name}-G{g}-ps{p}-{k}" for d, g, p, k, _, _ in COMBOS])
def test_kernel_matches_reference_and_dense(dtype, G, page_size, kind, bs, layer):
    rng = np.random.default_rng([G, page_size, len(kind)])
    kv_lens, q_lens = case_lengths(kind, page_size)
    c = make_case(rng, kv_lens=kv_lens, q_lens=q_lens, K=2, G=G, H=128, page_size=page_size, dtype=dtype)
    T = c["T"]
    c, got = run_tpu(c, layer, bs)
    paged = {**c, "k": np.asarray(c["k"]), "v": np.asarray(c["v"])}
    # Each oracle jitted whole: one compile instead of one per op and slot shape (a third of the time).
    with jax.default_matmul_precision("highest"):
        want = jax.jit(lambda: run_reference(c, layer))()
        dense = jax.jit(lambda: dense_from_pages(paged, layer))()
    assert not np.isnan(np.asarray(want[:T], np.float32)).any(), "the reference read a NaN page"
    assert rel(got[:T], want[:T]) < TOL[dtype]
    assert rel(got[:T], dense) < TOL[dtype]
    assert not np.asarray(got[T:], np.float32).any()  # padding tokens come back as zeros


# (storage format, dtype, G, page size, step kind, block sizes): the scales' DMAs beside the pages' over 1 to 3
# page-loop steps, a slot's chunk over several query blocks.
QUANTIZED = [
    ("int8", jnp.float32, 4, 8, "mixed", TPUBlockSizes(block_q=4, pages_per_block=2)),
    ("fp8", jnp.bfloat16, 1, 16, "decode", TPUBlockSizes(block_q=8, pages_per_block=1)),
    ("int8", jnp.bfloat16, 8, 8, "odd", TPUBlockSizes(block_q=2, pages_per_block=3)),
]


@pytest.mark.parametrize("fmt,dtype,G,page_size,kind,bs", QUANTIZED,
                         ids=[f"{f}-{jnp.dtype(d).name}-G{g}-ps{p}-{k}" for f, d, g, p, k, _ in QUANTIZED])
def test_kernel_reads_quantized_pages(fmt, dtype, G, page_size, kind, bs):
    rng = np.random.default_rng([G, page_size, len(kind), 8])
    kv_lens, q_lens = case_lengths(kind, page_size)
    c, seen = quantize_case(make_case(rng, kv_lens=kv_lens, q_lens=q_lens, K=2, G=G, H=128, page_size=page_size,
                                      dtype=dtype), fmt)
    T = c["T"]
    c, got = run_tpu(c, 1, bs)
    paged = {**seen, "k": np.asarray(seen["k"], np.float32), "v": np.asarray(seen["v"], np.float32)}
    with jax.default_matmul_precision("highest"):
        want = jax.jit(lambda: run_reference(c, 1))()
        dense = jax.jit(lambda: dense_from_pages(paged, 1))()
    assert not np.isnan(np.asarray(want[:T], np.float32)).any(), "the reference read a NaN scale"
    assert rel(got[:T], want[:T]) < TOL[dtype]
    assert rel(got[:T], dense) < TOL[dtype]
    assert not np.asarray(got[T:], np.float32).any()


def test_no_queries_at_all():
    c = make_case(np.random.default_rng(3), kv_lens=[0, 0], q_lens=[0, 0], K=2, G=4, H=128, page_size=8,
                  dtype=jnp.float32)
    _, out = run_tpu(c, 1, TPUBlockSizes(block_q=4, pages_per_block=1))
    assert out.shape == (1 + PAD, 8, 128) and not np.asarray(out).any()


@pytest.mark.parametrize("fmt", [None, "int8"])
def test_double_buffering_is_race_free(fmt):
    """The interpreter's race detector sees each DMA as its own thread: a copy into the buffer being read
    would be reported. Copies run only at their wait (its default), so a missing wait returns NaN (for
    quantized pages, of their scales too)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter  # noqa: PLC2701

    c = make_case(np.random.default_rng(7), kv_lens=[40, 9], q_lens=[6, 1], K=1, G=4, H=128, page_size=8,
                  dtype=jnp.float32, spare_pages=1)
    if fmt is not None:
        c, _ = quantize_case(c, fmt)
    c, got = run_tpu(c, 1, TPUBlockSizes(block_q=8, pages_per_block=1),
                     interpret=pltpu.InterpretParams(detect_races=True))
    assert not tpu_interpreter.races.races_found
    assert rel(got[:c["T"]], jax.jit(lambda: run_reference(c, 1))()[:c["T"]]) < TOL[jnp.float32]


@pytest.mark.parametrize("dtype,page_size,fmt", [(jnp.float32, 8, None), (jnp.bfloat16, 16, None),
                                                 (jnp.bfloat16, 32, "int8")], ids=["f32", "bf16", "bf16-int8"])
def test_lowers_to_mosaic_for_tpu(dtype, page_size, fmt):
    """The native path at real sizes (GQA 4, head dim 128, default blocks) lowers to a Mosaic TPU call.
    Mosaic's own layout passes run only on a TPU, so this catches Pallas-level lowering errors alone."""
    sd, i32 = jax.ShapeDtypeStruct, jnp.int32
    T, N, K, H, L, P, S, nb = 64, 16, 4, 128, 2, 64, 4, 12

    def f(*args):
        return ragged_paged_attention_tpu(*args, num_blocks=nb, block_sizes=TPUBlockSizes(), interpret=False)

    pages = sd((L, K, P, page_size, H), dtype)
    if fmt is not None:  # int8 pages: 32-row tiles, so pages of 32
        pages = QuantizedKV(sd((L, K, P, page_size, H), jnp.int8), sd((L, K, P, page_size), jnp.float32))
    exp = export.export(jax.jit(f), platforms=["tpu"])(
        sd((T, N, H), dtype), pages, pages, sd((), i32), sd((S, 16), i32), sd((S,), i32), sd((S,), i32),
        tuple(sd((nb,), i32) for _ in range(4)), sd((T,), i32), sd((T,), i32))
    assert "tpu_custom_call" in exp.mlir_module()


BAD = [
    ("kv_len", lambda c: {"kv_len": jnp.asarray(c["kv_len"][:-1])}),
    ("tok_row", lambda c: {"tok_row": jnp.zeros(2, jnp.int32)}),
    ("v_pages.shape", lambda c: {"v": c["v"][:, :, :-1]}),
    ("dtypes differ", lambda c: {"k": c["k"].astype(jnp.bfloat16)}),
    ("page_table", lambda c: {"page_table": jnp.asarray(c["page_table"], jnp.float32)}),
    ("num_blocks=2", lambda c: {"num_blocks": 2}),
]


@pytest.mark.parametrize("field,bad", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_naming_the_field(field, bad):
    c = make_case(np.random.default_rng(4), kv_lens=[9, 3], q_lens=[2, 1], K=2, G=2, H=128, page_size=8,
                  dtype=jnp.float32)
    with pytest.raises(ValueError, match=re.escape(field)):
        run_tpu(c, 0, TPUBlockSizes(block_q=4, pages_per_block=1), **bad(c))


def test_native_tpu_needs_tile_aligned_pages():
    c = make_case(np.random.default_rng(5), kv_lens=[9], q_lens=[1], K=2, G=2, H=128, page_size=8,
                  dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="page_size=8 must be a multiple of 16"):
        run_tpu(c, 0, TPUBlockSizes(), interpret=False)
