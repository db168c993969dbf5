"""The Mosaic TPU flash attention kernel, run in Pallas' TPU interpret mode on the CPU, against the `jnp`
reference (out) and a log-sum-exp worked out here with `jnp` (lse). Combinations are pairwise, not full
products, to keep the file fast on a small CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.kernels.flash_attention import flash_attention_reference
from jinfer.kernels.flash_attention.kernel_tpu import TPUBlockSizes, flash_attention_tpu
from jinfer.kernels.flash_attention.reference import attention_mask

# the GPU kernel tests' tolerances and inputs
from tests.kernels.test_flash_attention_kernel import TOL, inputs, rel


@functools.partial(jax.jit, static_argnames=("causal", "window", "softcap"))
def reference(q, k, v, q_offset, q_segment_ids, kv_segment_ids, *, causal, window, softcap):
    return flash_attention_reference(q, k, v, causal=causal, q_offset=q_offset, q_segment_ids=q_segment_ids,
                                     kv_segment_ids=kv_segment_ids, window=window, softcap=softcap)


@functools.partial(jax.jit, static_argnames=("causal", "window", "softcap"))
def reference_lse(q, k, q_offset, q_segment_ids, kv_segment_ids, *, causal, window, softcap):
    """f32[B, Sq, N]: log-sum-exp of each query's visible scaled, capped scores; -inf if it sees none."""
    B, Sq, N, H = q.shape
    Sk, K = k.shape[1], k.shape[2]
    qg = q.reshape(B, Sq, K, N // K, H).astype(jnp.float32)
    s = jnp.einsum("BQKGH,BSKH->BQKGS", qg, k.astype(jnp.float32), precision="highest") * H ** -0.5
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    mask = attention_mask(B, Sq, Sk, causal=causal, q_offset=q_offset, q_segment_ids=q_segment_ids,
                          kv_segment_ids=kv_segment_ids, window=window)
    s = jnp.where(mask[:, :, None, None, :], s, -jnp.inf)
    m = s.max(axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return (jnp.log(jnp.exp(s - m).sum(axis=-1)) + m[..., 0]).reshape(B, Sq, N)


def run_and_check(q, k, v, *, tol, block_sizes=TPUBlockSizes(), causal=True, q_offset=None, q_segment_ids=None,
                  kv_segment_ids=None, window=None, softcap=None):
    """Runs the kernel and checks out and lse against the references; returns out."""
    out, lse = flash_attention_tpu(q, k, v, q_offset, q_segment_ids, kv_segment_ids, causal=causal,
                                   window=window, softcap=softcap, sm_scale=None, block_sizes=block_sizes,
                                   interpret=True)
    opts = dict(causal=causal, window=window, softcap=softcap)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:3] and lse.dtype == jnp.float32
    assert rel(out, reference(q, k, v, q_offset, q_segment_ids, kv_segment_ids, **opts)) < tol
    want = np.asarray(reference_lse(q, k, q_offset, q_segment_ids, kv_segment_ids, **opts))
    got = np.asarray(lse)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=50 * tol, rtol=0)
    return out


# Pairwise over (G, head_dim) x dtype x causal: every pair of values appears in some case.
@pytest.mark.parametrize("G, head_dim, dtype, causal", [
    (1, 64, jnp.float32, True), (1, 128, jnp.bfloat16, True), (1, 256, jnp.float32, False),
    (4, 64, jnp.bfloat16, False), (4, 128, jnp.float32, True), (4, 256, jnp.bfloat16, False),
    (8, 64, jnp.float32, False), (8, 128, jnp.bfloat16, False), (8, 256, jnp.float32, True),
])
def test_matches_reference(G, head_dim, dtype, causal):
    rng = np.random.default_rng(G * 1000 + head_dim)
    q, k, v = inputs(rng, 1, 150, 150, 2 * G, 2, head_dim, dtype)
    run_and_check(q, k, v, tol=TOL[dtype], causal=causal, block_sizes=TPUBlockSizes(block_q=32, block_k=128))


@pytest.mark.parametrize("Sq, Sk, window", [(1, 1, None), (1, 200, None), (37, 200, None), (37, 200, 50)])
def test_chunk_at_an_offset_into_a_longer_context(Sq, Sk, window):
    rng = np.random.default_rng(Sq + Sk)
    q, k, v = inputs(rng, 2, Sq, Sk, 8, 2, 64, jnp.float32)
    off = jnp.array([Sk - Sq, max(0, Sk - Sq - 90)], jnp.int32)
    run_and_check(q, k, v, tol=2e-5, q_offset=off, window=window, block_sizes=TPUBlockSizes(block_q=8))


def test_packed_sequences_with_segment_ids():
    rng = np.random.default_rng(7)
    q, k, v = inputs(rng, 2, 141, 141, 8, 2, 64, jnp.float32)
    seg = jnp.asarray(np.sort(rng.integers(0, 4, (2, 141)), axis=1), jnp.int32)
    got = run_and_check(q, k, v, tol=2e-5, q_segment_ids=seg, kv_segment_ids=seg,
                        block_sizes=TPUBlockSizes(block_q=16))
    # Independent check of the packing itself: each segment alone equals its slice of the packed result.
    s = np.asarray(seg[0])
    for sid in np.unique(s):
        idx = np.flatnonzero(s == sid)
        alone = reference(q[:1, idx], k[:1, idx], v[:1, idx], None, None, None, causal=True, window=None, softcap=None)
        assert rel(got[:1, idx], alone) < 2e-5


def test_queries_that_see_no_key_give_zeros_and_neg_inf_lse():
    rng = np.random.default_rng(3)
    q, k, v = inputs(rng, 1, 24, 40, 4, 4, 64, jnp.bfloat16)
    q_seg = jnp.asarray(np.repeat([[0, 1, 5]], 8, axis=1), jnp.int32)  # segment 5 has no keys
    kv_seg = jnp.asarray(np.repeat([[0, 1]], 20, axis=1), jnp.int32)
    out = run_and_check(q, k, v, tol=TOL[jnp.bfloat16], causal=False, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                        block_sizes=TPUBlockSizes(block_q=8))
    assert not np.asarray(out[:, 16:], np.float32).any()


@pytest.mark.parametrize("causal, window, softcap", [(True, 5, None), (True, 40, 20.0), (False, 60, 3.0)])
def test_sliding_window_and_softcap(causal, window, softcap):
    rng = np.random.default_rng(11)
    q, k, v = inputs(rng, 1, 300, 300, 6, 2, 64, jnp.float32)  # G = 3: a group size that is no power of two
    run_and_check(q, k, v, tol=2e-5, causal=causal, window=window, softcap=softcap,
                  block_sizes=TPUBlockSizes(block_q=64, block_k=128))


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_sizes=TPUBlockSizes(block_q=12)), "block_q=12"),
    (dict(block_sizes=TPUBlockSizes(block_k=64)), "block_k=64"),
    (dict(block_sizes=TPUBlockSizes(block_q=0)), "block_q=0"),
    (dict(q=(1, 4, 6, 64)), "N=6"),
    (dict(k=(2, 4, 4, 64)), "k.shape"),
    (dict(q_offset=jnp.zeros((2,), jnp.int32)), "q_offset.shape"),
    (dict(q_segment_ids=jnp.zeros((1, 5), jnp.int32), kv_segment_ids=jnp.zeros((1, 4), jnp.int32)),
     "q_segment_ids.shape"),
    (dict(window=0), "window=0"),
])
def test_bad_inputs_are_named(kwargs, match):
    q = jnp.zeros(kwargs.pop("q", (1, 4, 8, 64)))
    k = jnp.zeros(kwargs.pop("k", (1, 4, 4, 64)))
    args = dict(q_offset=None, q_segment_ids=None, kv_segment_ids=None, causal=True, window=None, softcap=None,
                sm_scale=None, block_sizes=TPUBlockSizes(), interpret=True) | kwargs
    with pytest.raises(ValueError, match=match):
        flash_attention_tpu(q, k, k, **args)


@pytest.fixture
def tpu_lowering(monkeypatch):
    """Lets Pallas lower for TPU on this CPU host by describing the host as a TPU v5e. Mosaic's own compiler
    does not run, but Pallas' checks do: block shapes against the (8, 128) tiling, supported primitives."""
    from jax._src.pallas.mosaic import tpu_info  # noqa: PLC2701 - no public API gives the TPU generation
    from jax.experimental.pallas import tpu as pltpu

    if not isinstance(getattr(tpu_info, "registry", None), dict):
        pytest.skip("this jax has no TPU info registry to describe the host with")
    kind = jax.devices()[0].device_kind
    monkeypatch.setitem(tpu_info.registry, kind, lambda: pltpu.get_tpu_info_for_chip(pltpu.ChipVersion.TPU_V5E, 1))


@pytest.mark.parametrize("dtype, Sq, Sk, G, H, segments, window", [
    (jnp.bfloat16, 4096, 4096, 4, 128, False, None), (jnp.bfloat16, 1, 1, 8, 256, True, None),
    (jnp.float32, 37, 200, 1, 64, True, 16),
])
def test_lowers_for_tpu(tpu_lowering, dtype, Sq, Sk, G, H, segments, window):
    B, K = 2, 2
    q = jax.ShapeDtypeStruct((B, Sq, K * G, H), dtype)
    k = jax.ShapeDtypeStruct((B, Sk, K, H), dtype)
    seg = lambda S: jax.ShapeDtypeStruct((B, S), jnp.int32) if segments else None  # noqa: E731
    f = functools.partial(flash_attention_tpu, causal=True, window=window, softcap=None, sm_scale=None,
                          block_sizes=TPUBlockSizes(), interpret=False)
    lowered = jax.jit(f).trace(q, k, k, jax.ShapeDtypeStruct((B,), jnp.int32), seg(Sq), seg(Sk))
    assert "tpu_custom_call" in lowered.lower(lowering_platforms=("tpu",)).as_text()


def test_the_dispatcher_takes_the_tpu_kernel_for_tpu_block_sizes():
    """`flash_attention` with TPU block sizes runs this kernel (interpreted off a TPU), lse included."""
    from jinfer.kernels.flash_attention import flash_attention

    rng = np.random.default_rng(7)
    q, k, v = inputs(rng, 2, 40, 40, 8, 2, 64, jnp.float32)
    out, lse = flash_attention(q, k, v, causal=True, block_sizes=TPUBlockSizes(block_q=8, block_k=128),
                               return_lse=True)
    assert rel(out, reference(q, k, v, None, None, None, causal=True, window=None, softcap=None)) < TOL[jnp.float32]
    want = reference_lse(q, k, None, None, None, causal=True, window=None, softcap=None)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want), atol=1e-4, rtol=0)
