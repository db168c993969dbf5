"""The Pallas ragged paged attention kernel (interpret mode on the CPU) against the `jnp` reference, and
the reference against a dense attention rebuilt from the pages. Unused pages hold NaN: a stray read fails.
Quantized pages (int8 / fp8 with a scale per token and head) too, their unused scales NaN."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.kernels.flash_attention import flash_attention_reference
from jinfer.kernels.paged_attention import ragged_paged_attention_reference
from jinfer.kernels.paged_attention.blocked import blocked_paged_attention, blocked_prefill_attention
from jinfer.kernels.paged_attention.kernel import BlockSizes, ragged_paged_attention_triton
from jinfer.kernels.paged_attention.query_layout import query_blocks
from jinfer.quant.kv import QuantizedKV, dequantize_kv, quantize_kv

# The same tests run natively on a GPU (JAX_PLATFORMS=cuda), interpreted elsewhere.
NATIVE = jax.devices()[0].platform == "gpu"
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def make_case(rng, *, kv_lens, q_lens, K, G, H, page_size, dtype, layers=2, spare_pages=5):
    """Scattered pages for each slot in a NaN-filled pool; returns everything both functions need."""
    S = len(kv_lens)
    need = [-(-n // page_size) for n in kv_lens]
    max_pages = max(max(need), 1) + 1
    P = sum(need) + spare_pages + 1
    order = rng.permutation(np.arange(1, P))
    page_table = np.zeros((S, max_pages), np.int32)
    k = np.full((layers, K, P, page_size, H), np.nan, np.float32)
    v = np.full((layers, K, P, page_size, H), np.nan, np.float32)
    used = 0
    for s, n in enumerate(need):
        page_table[s, :n] = order[used:used + n]
        used += n
        for i in range(kv_lens[s]):  # only written positions get numbers; the rest of each page stays NaN
            pg, off = page_table[s, i // page_size], i % page_size
            k[:, :, pg, off] = rng.normal(size=(layers, K, H))
            v[:, :, pg, off] = rng.normal(size=(layers, K, H))
    q_start = np.concatenate([[0], np.cumsum(q_lens)[:-1]]).astype(np.int32)
    T = int(sum(q_lens))
    q = rng.normal(size=(max(T, 1), K * G, H))
    return dict(q=jnp.asarray(q, dtype), k=jnp.asarray(k, dtype), v=jnp.asarray(v, dtype), page_table=page_table,
                kv_len=np.asarray(kv_lens, np.int32), q_start=q_start, q_len=np.asarray(q_lens, np.int32), T=T)


def quantize_case(c, fmt):
    """The case with its pages quantized (`fmt` "int8" / "fp8"); unused positions get a NaN scale (and NaN fp8
    values), so a stray read still fails. Also returns the dequantized pages, what attention should see."""
    out, seen = dict(c), {}
    for name in ("k", "v"):
        x = c[name]
        unused = jnp.isnan(x).any(axis=-1)
        values, scale = quantize_kv(jnp.nan_to_num(x), fmt)
        seen[name] = dequantize_kv(values, scale, x.dtype)
        out[name] = QuantizedKV(jnp.where(unused[..., None], jnp.nan, values) if fmt == "fp8" else values,
                                jnp.where(unused, jnp.nan, scale))
    return out, {**c, **seen}


def dense_from_pages(c, layer):
    """Per slot: plain attention over the slot's K/V read back from its pages (an independent path)."""
    outs = []
    ps = c["k"].shape[3]
    for s in range(len(c["kv_len"])):
        n, ql = int(c["kv_len"][s]), int(c["q_len"][s])
        if ql == 0:
            continue
        idx = np.arange(n)
        pages, offs = c["page_table"][s, idx // ps], idx % ps
        k = c["k"][layer][:, pages, offs].transpose(1, 0, 2)[None]  # [1, n, K, H]
        v = c["v"][layer][:, pages, offs].transpose(1, 0, 2)[None]
        q = c["q"][c["q_start"][s]:c["q_start"][s] + ql][None]
        outs.append(flash_attention_reference(q, k, v, causal=True, q_offset=jnp.array([n - ql]))[0])
    return jnp.concatenate(outs) if outs else jnp.zeros((0,) + c["q"].shape[1:], c["q"].dtype)


def run_kernel(c, layer, bs):
    T = c["q"].shape[0]
    nb = -(-T // bs.block_q) + len(c["kv_len"])
    blocks, (tb, tr) = query_blocks(c["q_start"], c["q_len"], bs.block_q, nb, T)
    return ragged_paged_attention_triton(
        c["q"], c["k"], c["v"], jnp.int32(layer), jnp.asarray(c["page_table"]), jnp.asarray(c["kv_len"]),
        jnp.asarray(c["q_len"]), tuple(map(jnp.asarray, blocks)), jnp.asarray(tb), jnp.asarray(tr), num_blocks=nb,
        block_sizes=bs, interpret=not NATIVE)


def run_reference(c, layer):
    # float32 products in full precision (a GPU would otherwise use TF32 here, 3e-4 off)
    with jax.default_matmul_precision("highest"):
        return ragged_paged_attention_reference(
            c["q"], c["k"], c["v"], jnp.asarray(c["page_table"]), jnp.asarray(c["kv_len"]),
            jnp.asarray(c["q_start"]), jnp.asarray(c["q_len"]), max_query_len=max(1, int(c["q_len"].max())),
            layer=jnp.int32(layer))


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


CASES = [
    # (kv_lens, q_lens): decode, edge lengths around the page size, a chunk at an offset, idle slots
    ([1, 7, 8, 9, 16, 17], [1, 1, 1, 1, 1, 1]),
    ([13, 0, 30, 5], [13, 0, 4, 1]),
    ([31, 2], [31, 1]),
]
# For the CPU's blocked attention also steps of hundreds of tokens, which it splits into query blocks,
# and contexts shorter than one block of keys (the decode path's first block then takes a quarter size).
BLOCKED_CASES = CASES + [([150, 70, 9, 40], [140, 70, 9, 1]), ([5, 9, 3], [1, 2, 1])]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("page_size", [4, 8])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference(dtype, G, page_size, case):
    rng = np.random.default_rng(hash((G, page_size, case)) % 2**32)
    kv_lens, q_lens = CASES[case]
    c = make_case(rng, kv_lens=kv_lens, q_lens=q_lens, K=2, G=G, H=32, page_size=page_size, dtype=dtype)
    layer = 1
    want = run_reference(c, layer)
    assert not np.isnan(np.asarray(want[:c["T"]], np.float32)).any(), "the reference read a NaN page"
    splits = 3 if max(q_lens) == 1 else 1
    ppb = max(2, 16 // page_size) if NATIVE and dtype == jnp.bfloat16 else 2  # the GPU's 16-key minimum
    # Pages of 8 also run the steps every query sees without masks (BlockSizes.unmasked_steps): a NaN past
    # kv_len in such a step would reach the output.
    bs = BlockSizes(block_q=max(2, 16 // G) if G < 16 else 1, pages_per_block=ppb, num_splits=splits,
                    unmasked_steps=page_size == 8)
    got = run_kernel(c, layer, bs)
    assert rel(got[:c["T"]], want[:c["T"]]) < TOL[dtype]


# (storage format, dtype, G, page size, case): decode with context splits, mixed chunks, odd prefills
QUANTIZED = [("int8", jnp.float32, 4, 4, 0), ("fp8", jnp.bfloat16, 1, 8, 1), ("int8", jnp.bfloat16, 8, 8, 2)]


@pytest.mark.parametrize("fmt,dtype,G,page_size,case", QUANTIZED,
                         ids=[f"{f}-{jnp.dtype(d).name}-G{g}-ps{p}-case{c}" for f, d, g, p, c in QUANTIZED])
def test_kernel_reads_quantized_pages(fmt, dtype, G, page_size, case):
    """Against the reference reading the same quantized pages, and the reference against the float attention
    over the dequantized pages (an independent dequantization: the pages rebuilt whole, then read as floats)."""
    rng = np.random.default_rng([G, page_size, case])
    kv_lens, q_lens = CASES[case]
    c, seen = quantize_case(make_case(rng, kv_lens=kv_lens, q_lens=q_lens, K=2, G=G, H=32, page_size=page_size,
                                      dtype=dtype), fmt)
    want = run_reference(c, 1)
    T = c["T"]
    assert not np.isnan(np.asarray(want[:T], np.float32)).any(), "the reference read a NaN scale"
    assert rel(want[:T], run_reference(seen, 1)[:T]) < TOL[dtype]
    splits = 3 if max(q_lens) == 1 else 1
    ppb = max(2, 16 // page_size) if NATIVE and dtype == jnp.bfloat16 else 2
    got = run_kernel(c, 1, BlockSizes(block_q=max(2, 16 // G), pages_per_block=ppb, num_splits=splits,
                                      unmasked_steps=page_size == 8))
    assert rel(got[:T], want[:T]) < TOL[dtype]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("layout", ["slots", "slots-wide", "prefill"])
@pytest.mark.parametrize("case", range(len(BLOCKED_CASES)))
def test_blocked_jnp_attention_matches_reference(dtype, G, layout, case):
    """The engine's CPU attention (blocks of pages, online softmax, trip count from the longest sequence):
    decode steps with one row of queries per slot (pages of 4, one per block, or four, of which the first
    block takes the quarter sizes that hold the longest context); prefill steps with the step's
    own tokens in dense products (by blocks of queries when there are many) and the earlier keys per query
    block (pages of 8, three), two blocks at a time over the blocks that have earlier keys."""
    check_blocked(dtype, G, layout, case)


@pytest.mark.parametrize("fmt,dtype,G,layout,case", [("int8", jnp.float32, 4, "slots-wide", 0),
                                                     ("fp8", jnp.bfloat16, 1, "prefill", 3),
                                                     ("int8", jnp.bfloat16, 4, "prefill", 1)])
def test_blocked_jnp_attention_reads_quantized_pages(fmt, dtype, G, layout, case):
    check_blocked(dtype, G, layout, case, fmt)


def check_blocked(dtype, G, layout, case, fmt=None):
    rng = np.random.default_rng(hash((G, layout, case)) % 2**32)
    kv_lens, q_lens = BLOCKED_CASES[case]
    page_size, ppb = {"slots": (4, 1), "slots-wide": (4, 4), "prefill": (8, 3)}[layout]
    c = make_case(rng, kv_lens=kv_lens, q_lens=q_lens, K=2, G=G, H=32, page_size=page_size, dtype=dtype)
    seen = c  # the pages as attention sees them (this step's K/V come from there)
    if fmt is not None:
        c, seen = quantize_case(c, fmt)
    want = run_reference(c, 1)
    args = (c["q"], c["k"], c["v"], jnp.asarray(c["page_table"]), jnp.asarray(c["kv_len"]))
    with jax.default_matmul_precision("highest"):
        if layout.startswith("slots"):
            got = blocked_paged_attention(*args, jnp.asarray(c["q_start"]), jnp.asarray(c["q_len"]),
                                          jnp.int32(1), max_query_len=max(1, int(c["q_len"].max())),
                                          pages_per_block=ppb)
        else:
            T, bq = c["q"].shape[0], 3
            blocks, _ = query_blocks(c["q_start"], c["q_len"], bq, -(-T // bq) + len(kv_lens), T)
            slot = np.zeros(T, np.int32)
            pos = np.zeros(T, np.int32)
            for s, (n, ql) in enumerate(zip(kv_lens, q_lens)):
                slot[c["q_start"][s]:c["q_start"][s] + ql] = s
                pos[c["q_start"][s]:c["q_start"][s] + ql] = np.arange(n - ql, n)
            valid = np.arange(T) < c["T"]
            page, off = c["page_table"][slot, pos // page_size], pos % page_size
            k_new, v_new = (jnp.where(valid[:, None, None], x[1][:, page, off].transpose(1, 0, 2), 0)
                            for x in (seen["k"], seen["v"]))  # this step's K/V, as the model hands them over
            got = blocked_prefill_attention(c["q"], k_new, v_new, *args[1:], jnp.asarray(c["q_start"]),
                                            jnp.asarray(c["q_len"]), jnp.asarray(slot), jnp.asarray(valid),
                                            tuple(map(jnp.asarray, blocks)), jnp.int32(1), block_q=bq,
                                            pages_per_block=ppb, prefix_group=2)
    assert not np.isnan(np.asarray(got, np.float32)).any()
    assert rel(got[:c["T"]], want[:c["T"]]) < TOL[dtype]
    assert not np.asarray(got[c["T"]:], np.float32).any()  # rows no slot owns stay zero


@pytest.mark.parametrize("head_dim", [64, 128])
def test_reference_matches_dense_attention_rebuilt_from_pages(head_dim):
    rng = np.random.default_rng(head_dim)
    c = make_case(rng, kv_lens=[5, 23, 16], q_lens=[5, 3, 1], K=2, G=4, H=head_dim, page_size=8, dtype=jnp.float32)
    got = run_reference(c, 0)[:c["T"]]
    with jax.default_matmul_precision("highest"):  # as run_reference: no TF32 on a GPU
        want = dense_from_pages({**c, "k": np.asarray(c["k"]), "v": np.asarray(c["v"])}, 0)
    assert rel(got, want) < 1e-5


def test_no_queries_at_all():
    rng = np.random.default_rng(3)
    c = make_case(rng, kv_lens=[0, 0], q_lens=[0, 0], K=2, G=4, H=32, page_size=4, dtype=jnp.float32)
    out = run_kernel(c, 0, BlockSizes(block_q=4, pages_per_block=1, num_splits=1))
    assert out.shape == c["q"].shape


@pytest.mark.skipif(not NATIVE, reason="a limit of the native GPU kernel; interpret mode has none")
def test_too_few_keys_per_step_for_16_bit_products_is_refused():
    rng = np.random.default_rng(5)
    c = make_case(rng, kv_lens=[9], q_lens=[1], K=2, G=4, H=32, page_size=4, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="pages_per_block=2 x page_size=4"):
        run_kernel(c, 0, BlockSizes(block_q=4, pages_per_block=2, num_splits=1))


def test_too_few_rows_for_the_matrix_units_is_refused():
    rng = np.random.default_rng(4)
    c = make_case(rng, kv_lens=[3], q_lens=[1], K=2, G=2, H=32, page_size=4, dtype=jnp.float32)
    with pytest.raises(ValueError, match="block_q=2 x padded group size 2"):
        run_kernel(c, 0, BlockSizes(block_q=2, pages_per_block=1, num_splits=1))


def test_the_public_function_picks_the_kernel_by_block_sizes():
    """`ragged_paged_attention`: the platform's kernel by default; the GPU (Triton) or TPU (Mosaic) kernel when
    its block sizes are given (interpreted where it cannot run natively); anything else is refused."""
    from jinfer.kernels.paged_attention import ragged_paged_attention
    from jinfer.kernels.paged_attention.kernel_tpu import TPUBlockSizes

    rng = np.random.default_rng(5)
    c = make_case(rng, kv_lens=[13, 0, 30, 5], q_lens=[13, 0, 4, 1], K=2, G=4, H=32, page_size=8, dtype=jnp.float32)
    want = run_reference(c, 1)
    T = c["q"].shape[0]
    sizes = [None, BlockSizes(block_q=4, pages_per_block=2)]
    if not NATIVE:  # TPU interpret mode wants a CPU device, which JAX_PLATFORMS=cuda leaves out
        sizes.append(TPUBlockSizes(block_q=8, pages_per_block=2))
    for bs in sizes:
        bq = (bs or BlockSizes()).block_q  # None on a CPU or GPU: the Triton kernel's defaults
        nb = -(-T // bq) + len(c["kv_len"])
        blocks, (tb, tr) = query_blocks(c["q_start"], c["q_len"], bq, nb, T)
        args = (c["q"], c["k"], c["v"], jnp.int32(1), jnp.asarray(c["page_table"]), jnp.asarray(c["kv_len"]),
                jnp.asarray(c["q_len"]), tuple(map(jnp.asarray, blocks)), jnp.asarray(tb), jnp.asarray(tr))
        got = ragged_paged_attention(*args, num_blocks=nb, block_sizes=bs)
        assert rel(got[:c["T"]], want[:c["T"]]) < TOL[jnp.float32], bs
    with pytest.raises(ValueError, match="block_sizes must be BlockSizes"):
        ragged_paged_attention(*args, num_blocks=nb, block_sizes=(8, 2))
    if not NATIVE:
        with pytest.raises(ValueError, match="cannot run natively on cpu"):
            ragged_paged_attention(*args, num_blocks=nb, block_sizes=BlockSizes(), interpret=False)


def test_decode_tuning_is_keyed_by_device_kind():
    from jinfer.kernels.paged_attention.tuning import gpu_block_sizes

    h100, _ = gpu_block_sizes(8, 32, 64, 16, "NVIDIA H100 80GB HBM3")
    h200, _ = gpu_block_sizes(8, 32, 64, 16, "NVIDIA H200")
    assert (h100.num_stages, h200.num_stages) == (2, 1)
    assert dataclasses.replace(h100, num_stages=1) == h200  # everything else stays the H100's rule
