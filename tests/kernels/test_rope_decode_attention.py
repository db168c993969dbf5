"""The decode kernel that rotates, writes and attends in one launch (`rope_decode_attention_triton`, interpreted
on the CPU, native on a GPU) against its two independent halves in plain jnp: `rope_and_store_reference` then
`ragged_paged_attention_reference`. Fresh random inputs; each slot's new position NaN in the pages beforehand
(the kernel must take that key from the product, not the page); float32 and bfloat16; GQA 1:1, 3:1 (padded
to 4) and 4:1; context splits and none; the unmasked-steps variant; idle slots and padding tokens; a layer
other than 0. With folded norms, the kernel scaling q, k, v by each token's RMSNorm factor against
`layers.scale_rows` before the same halves. Also through the engine's attention callable for a decode step, and
its errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.attention.backend import PagedMeta, make_paged_attention
from jinfer.attention.pallas import PallasBackend
from jinfer.kernels.paged_attention import ragged_paged_attention_reference
from jinfer.kernels.paged_attention.kernel import BlockSizes, rope_decode_attention_triton
from jinfer.kernels.paged_attention.query_layout import query_blocks
from jinfer.kernels.rope_kv import rope_and_store_reference
from jinfer.models.layers import scale_rows
from tests.kernels.test_paged_attention_kernel import make_case
from tests.kernels.test_rope_kv import inv_freq

NATIVE = jax.devices()[0].platform == "gpu"
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
LAYER = 1


def decode_case(rng, *, kv_lens, K, G, H, page_size, dtype, pad_tokens):
    """Slots decoding one token each at position kv_len - 1 (kv_len 0: idle), its page slot still NaN, plus
    `pad_tokens` padding tokens (their K/V go to the reserved page 0)."""
    q_lens = [int(n > 0) for n in kv_lens]
    c = make_case(rng, kv_lens=kv_lens, q_lens=q_lens, K=K, G=G, H=H, page_size=page_size, dtype=dtype)
    k, v = np.array(c["k"], np.float32), np.array(c["v"], np.float32)
    live = [s for s, n in enumerate(kv_lens) if n]
    pos = np.asarray([kv_lens[s] - 1 for s in live] + [0] * pad_tokens, np.int32)
    slot = np.zeros(len(pos), np.int32)
    for i, s in enumerate(live):
        pg, off = c["page_table"][s, pos[i] // page_size], pos[i] % page_size
        k[:, :, pg, off] = v[:, :, pg, off] = np.nan  # not written yet: the kernel writes it
        slot[i] = pg * page_size + off
    T = len(pos)
    N = K * G
    qkv = jnp.asarray(rng.normal(size=(T, N + 2 * K, H)), dtype)
    q_start = np.concatenate([[0], np.cumsum(q_lens)[:-1]]).astype(np.int32)
    return dict(c, k=jnp.asarray(k, dtype), v=jnp.asarray(v, dtype), qkv=qkv, pos=jnp.asarray(pos),
                slot=jnp.asarray(slot), q_start=q_start, N=N, T=T, live=len(live))


def expected(c, freqs, x=None, eps=None):
    """(out of the live tokens, k_pages, v_pages): rotate and write every live token, then attend; with x [T, D]
    the product first scaled by its rows' RMSNorm factors."""
    n = c["live"]
    qkv = c["qkv"] if x is None else scale_rows(c["qkv"][None], x[None], eps)[0]
    q, kp, vp = rope_and_store_reference(qkv[:n], c["pos"][:n], freqs, c["k"], c["v"], LAYER, c["slot"][:n],
                                         num_heads=c["N"])
    with jax.default_matmul_precision("highest"):
        out = ragged_paged_attention_reference(
            q, kp, vp, jnp.asarray(c["page_table"]), jnp.asarray(c["kv_len"]), jnp.asarray(c["q_start"]),
            jnp.asarray(c["q_len"]), max_query_len=1, layer=jnp.int32(LAYER))
    return out, kp, vp


def run(c, freqs, bs, x=None, eps=None):
    nb = min(c["T"], len(c["kv_len"]))  # the backend's decode blocks: one a row with a token
    blocks, (tb, tr) = query_blocks(c["q_start"], c["q_len"], bs.block_q, nb, c["T"])
    fn = jax.jit(lambda qkv, kp, vp: rope_decode_attention_triton(
        qkv, freqs, c["slot"], kp, vp, jnp.int32(LAYER), jnp.asarray(c["page_table"]), jnp.asarray(c["kv_len"]),
        jnp.asarray(c["q_len"]), tuple(map(jnp.asarray, blocks)), jnp.asarray(tb), jnp.asarray(tr), x,
        num_heads=c["N"], num_blocks=nb, block_sizes=bs, interpret=not NATIVE, eps=eps))
    return fn(c["qkv"], c["k"], c["v"])


def close(got, want, dtype):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=TOL[dtype],
                               atol=TOL[dtype])  # NaN where both are NaN


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("splits,unmasked", [(1, False), (4, False), (4, True)])
def test_matches_rope_and_store_then_attention(dtype, G, splits, unmasked):
    rng = np.random.default_rng(G * 10 + splits + unmasked)
    K, H, ps = 2, 64, 8
    c = decode_case(rng, kv_lens=[1, 7, 8, 9, 0, 17, 40], K=K, G=G, H=H, page_size=ps, dtype=dtype, pad_tokens=2)
    Gp = 1 << (G - 1).bit_length()
    bs = BlockSizes(block_q=max(1, 16 // Gp), pages_per_block=2, num_splits=splits, unmasked_steps=unmasked)
    freqs = inv_freq(H)
    out, kp, vp = run(c, freqs, bs)
    want_out, want_k, want_v = expected(c, freqs)
    assert out.shape == (c["T"], c["N"], H) and out.dtype == dtype and kp.dtype == dtype
    close(out[:c["live"]], want_out, dtype)
    # Every page but the reserved page 0 (padding tokens' writes): the new keys and values in place, the rest
    # (NaN included) untouched.
    close(kp[:, :, 1:], want_k[:, :, 1:], dtype)
    close(vp[:, :, 1:], want_v[:, :, 1:], dtype)
    assert not np.isnan(np.asarray(out[:c["live"]], np.float32)).any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("D,splits", [(96, 1), (128, 4)])
def test_folded_norm_rows_match_scaled_product(dtype, D, splits):
    """Each token's q, k and v scaled by its row's RMSNorm factor (D a power of two and not: the row is loaded
    masked), whatever the row's scale: the factor is not 1 anywhere."""
    rng = np.random.default_rng(D + splits)
    K, G, H, ps = 2, 4, 64, 8
    c = decode_case(rng, kv_lens=[3, 9, 0, 26], K=K, G=G, H=H, page_size=ps, dtype=dtype, pad_tokens=1)
    x = jnp.asarray(rng.normal(size=(c["T"], D)) * rng.uniform(0.2, 5.0, size=(c["T"], 1)), dtype)
    bs = BlockSizes(block_q=4, pages_per_block=2, num_splits=splits)
    freqs, eps = inv_freq(H), 1e-5
    out, kp, vp = run(c, freqs, bs, x, eps)
    want_out, want_k, want_v = expected(c, freqs, x, eps)
    unscaled, _, _ = expected(c, freqs)
    assert not np.allclose(np.asarray(want_out, np.float32), np.asarray(unscaled, np.float32), atol=0.05)
    close(out[:c["live"]], want_out, dtype)
    close(kp[:, :, 1:], want_k[:, :, 1:], dtype)
    close(vp[:, :, 1:], want_v[:, :, 1:], dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_one_split_writes_each_tokens_row(dtype):
    """One split and a block a token (idle slots' padding tokens take the empty blocks): the kernel writes the
    output token-major itself, with no gather of the blocks' rows after it; padding tokens' rows are zeros."""
    rng = np.random.default_rng(11)
    K, G, H, ps = 2, 4, 64, 8
    c = decode_case(rng, kv_lens=[5, 0, 12, 30, 0, 1], K=K, G=G, H=H, page_size=ps, dtype=dtype, pad_tokens=2)
    assert c["T"] == len(c["kv_len"])  # the decode layout: as many blocks as tokens
    bs = BlockSizes(block_q=4, pages_per_block=2, num_splits=1)
    freqs = inv_freq(H)
    out, kp, vp = run(c, freqs, bs)
    want_out, want_k, want_v = expected(c, freqs)
    close(out[:c["live"]], want_out, dtype)
    np.testing.assert_array_equal(np.asarray(out[c["live"]:], np.float32), 0.0)
    close(kp[:, :, 1:], want_k[:, :, 1:], dtype)
    nb = c["T"]
    blocks, (tb, tr) = query_blocks(c["q_start"], c["q_len"], bs.block_q, nb, c["T"])
    jaxpr = jax.make_jaxpr(lambda qkv, kp, vp: rope_decode_attention_triton(
        qkv, freqs, c["slot"], kp, vp, jnp.int32(LAYER), jnp.asarray(c["page_table"]), jnp.asarray(c["kv_len"]),
        jnp.asarray(c["q_len"]), tuple(map(jnp.asarray, blocks)), jnp.asarray(tb), jnp.asarray(tr), num_heads=c["N"],
        num_blocks=nb, block_sizes=bs, interpret=not NATIVE))(c["qkv"], c["k"], c["v"])
    assert "gather" not in str(jaxpr).split("pallas_call")[-1]  # nothing reorders the kernel's rows after it


def test_the_engines_decode_attention_takes_the_fused_kernel():
    """`make_paged_attention` at width 1 on the Pallas backend: one `rope_` attention launch and no separate
    RoPE-and-store kernel, with the outputs of the unfused path (width-1 steps through `rope_and_store`)."""
    rng = np.random.default_rng(5)
    K, G, H, ps = 2, 4, 64, 8
    dtype = jnp.float32
    c = decode_case(rng, kv_lens=[5, 12, 0, 30], K=K, G=G, H=H, page_size=ps, dtype=dtype, pad_tokens=1)
    backend = PallasBackend(decode=BlockSizes(block_q=4, pages_per_block=2, num_splits=2), interpret=not NATIVE)
    T, N = c["T"], c["N"]
    meta = PagedMeta(token_row=jnp.zeros(T, jnp.int32), token_valid=jnp.ones(T, bool),
                     page_table=jnp.asarray(c["page_table"]), kv_len=jnp.asarray(c["kv_len"]),
                     query_start=jnp.asarray(c["q_start"]), query_len=jnp.asarray(c["q_len"]), kv_slot=c["slot"],
                     backend=backend.step_metadata(c["q_start"], c["q_len"], T, 1))
    q, k, v = (c["qkv"][None, :, a:b] for a, b in ((0, N), (N, N + K), (N + K, N + 2 * K)))
    freqs = inv_freq(H)

    # Folded norms: the callable takes each token's row of the layer input x and scales q, k, v by its factor.
    x = jnp.asarray(rng.normal(size=(1, T, 48)) * 3.0, dtype)

    def attend(fused: bool, rows):
        fn = make_paged_attention(1, dataclasses.replace(backend) if fused else _Unfused(**vars(backend)))
        assert fn.scales_rows
        return jax.jit(lambda kp, vp: fn(q, k, v, kp, vp, jnp.int32(LAYER), c["pos"][None], meta, freqs, **rows))

    for rows, name in (({}, "rope_ragged"), ({"rows": (x, 1e-6)}, "rope_norm_ragged")):
        fused = attend(True, rows)
        text = str(jax.make_jaxpr(fused)(c["k"], c["v"]))
        assert f"{name}_paged_attention" in text and "rope_and_store" not in text
        (out, kp, vp), (want, want_k, want_v) = fused(c["k"], c["v"]), attend(False, rows)(c["k"], c["v"])
        close(out[0, :c["live"]], want[0, :c["live"]], dtype)
        close(kp[:, :, 1:], want_k[:, :, 1:], dtype)
        close(vp[:, :, 1:], want_v[:, :, 1:], dtype)


@dataclasses.dataclass(frozen=True)
class _Unfused(PallasBackend):
    rope_decode = False


def test_errors_name_the_shapes():
    rng = np.random.default_rng(0)
    c = decode_case(rng, kv_lens=[3], K=2, G=2, H=64, page_size=8, dtype=jnp.float32, pad_tokens=0)
    bs = BlockSizes(block_q=8, pages_per_block=2)
    with pytest.raises(ValueError, match="num_heads=3"):
        rope_decode_attention_triton(c["qkv"], inv_freq(64), c["slot"], c["k"], c["v"], 0,
                                     jnp.asarray(c["page_table"]), jnp.asarray(c["kv_len"]), jnp.asarray(c["q_len"]),
                                     tuple(map(jnp.asarray, query_blocks(c["q_start"], c["q_len"], 8, 1, 1)[0])),
                                     jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), num_heads=3, num_blocks=1,
                                     block_sizes=bs, interpret=True)
    with pytest.raises(ValueError, match="width=4"):
        PallasBackend().rope_attend(c["qkv"], inv_freq(64), c["k"], c["v"], 0, None, 4)
