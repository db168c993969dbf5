"""The Pallas flash attention kernel (interpret mode on the CPU, natively with JAX_PLATFORMS=cuda) against its
`jnp` reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.kernels.flash_attention import flash_attention, flash_attention_reference
from jinfer.kernels.flash_attention.kernel import BlockSizes

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def full_precision_reference():
    """On a GPU the reference's float32 products would otherwise run in TF32 (3e-4 off); the kernel's are
    full precision already."""
    with jax.default_matmul_precision("highest"):
        yield


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(rng, B, Sq, Sk, N, K, H, dtype):
    mk = lambda *s: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
    return mk(B, Sq, N, H), mk(B, Sk, K, H), mk(B, Sk, K, H)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference(dtype, G, head_dim, causal):
    rng = np.random.default_rng(G * 1000 + head_dim)
    q, k, v = inputs(rng, 2, 33, 33, 2 * G, 2, head_dim, dtype)
    bs = BlockSizes(block_q=max(2, 16 // G), block_k=16)
    got = flash_attention(q, k, v, causal=causal, block_sizes=bs)
    assert rel(got, flash_attention_reference(q, k, v, causal=causal)) < TOL[dtype]


@pytest.mark.parametrize("Sq, Sk", [(1, 1), (1, 40), (17, 40), (16, 16)])
def test_chunk_at_an_offset_into_a_longer_context(Sq, Sk):
    rng = np.random.default_rng(Sq + Sk)
    q, k, v = inputs(rng, 2, Sq, Sk, 8, 2, 64, jnp.float32)
    off = jnp.array([Sk - Sq, max(0, Sk - Sq - 3)], jnp.int32)
    got = flash_attention(q, k, v, causal=True, q_offset=off, block_sizes=BlockSizes(block_q=4, block_k=16))
    assert rel(got, flash_attention_reference(q, k, v, causal=True, q_offset=off)) < 2e-5


def test_packed_sequences_with_segment_ids():
    rng = np.random.default_rng(7)
    q, k, v = inputs(rng, 2, 45, 45, 8, 2, 64, jnp.float32)
    seg = jnp.asarray(np.sort(rng.integers(0, 4, (2, 45)), axis=1), jnp.int32)
    got = flash_attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                          block_sizes=BlockSizes(block_q=4, block_k=16))
    want = flash_attention_reference(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    assert rel(got, want) < 2e-5
    # Independent check of the packing itself: each segment alone equals its slice of the packed result.
    s = np.asarray(seg[0])
    for sid in np.unique(s):
        idx = np.flatnonzero(s == sid)
        alone = flash_attention_reference(q[:1, idx], k[:1, idx], v[:1, idx], causal=True)
        assert rel(got[:1, idx], alone) < 2e-5


@pytest.mark.parametrize("window, softcap", [(5, None), (None, 3.0), (9, 20.0)])
def test_sliding_window_and_softcap(window, softcap):
    rng = np.random.default_rng(11)
    q, k, v = inputs(rng, 1, 40, 40, 4, 4, 64, jnp.float32)
    got = flash_attention(q, k, v, causal=True, window=window, softcap=softcap,
                          block_sizes=BlockSizes(block_q=16, block_k=16))
    assert rel(got, flash_attention_reference(q, k, v, causal=True, window=window, softcap=softcap)) < 2e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(q=(1, 4, 6, 64), k=(1, 4, 4, 64)), "multiple of KV heads"),
    (dict(q=(1, 4, 8, 64), k=(2, 4, 4, 64)), "does not match"),
    (dict(q=(1, 4, 8, 64), k=(1, 4, 4, 64), window=0), "window=0"),
])
def test_bad_inputs_are_named(kwargs, match):
    q = jnp.zeros(kwargs.pop("q"))
    k = jnp.zeros(kwargs.pop("k"))
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, k, **kwargs)
