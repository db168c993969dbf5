"""The Hopper (Mosaic GPU) flash attention kernel against the `jnp` reference.

The kernel itself needs an H100-class GPU (wgmma, TMA): those tests run on the lent GPU
(`JAX_PLATFORMS=cuda python -m pytest tests/kernels/test_flash_attention_hopper.py`; conftest picks the CPU
otherwise) and are skipped elsewhere. Which calls the
dispatcher sends to it is checked everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.kernels.flash_attention import flash_attention, flash_attention_reference
from jinfer.kernels.flash_attention.kernel_hopper import HopperBlockSizes, flash_attention_hopper, supported
from jinfer.kernels.flash_attention.tuning import is_hopper

on_hopper = pytest.mark.skipif(not is_hopper(), reason="needs a compute capability 9.0 GPU")


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inputs(seed, B, Sq, Sk, N, K, H, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, Sq, N, H), dtype), jax.random.normal(ks[1], (B, Sk, K, H), dtype),
            jax.random.normal(ks[2], (B, Sk, K, H), dtype))


def test_fast_path_scope_is_named():
    q, k, _ = inputs(0, 1, 256, 256, 8, 2, 128)
    bs = HopperBlockSizes()
    kw = dict(causal=True, q_offset=None, q_segment_ids=None, window=None, softcap=None, block_sizes=bs)
    assert supported(q, k, **kw) is None
    assert "dtype" in supported(q.astype(jnp.float32), k.astype(jnp.float32), **kw)
    assert "head_dim" in supported(q[..., :96], k[..., :96], **kw)
    assert "window" in supported(q, k, **{**kw, "window": 16})
    assert "multiple" in supported(q[:, :200], k, **kw)
    assert "multiple" in supported(q, k[:, :200], **{**kw, "causal": False})
    assert "causal" in supported(q, k[:, :128], **kw)
    # odd group: the two warpgroups take two query blocks, so the query length must cover 128 rows
    q3, k3, _ = inputs(0, 1, 192, 256, 6, 2, 64)
    assert "multiple of 128" in supported(q3, k3, **kw)


@on_hopper
@pytest.mark.parametrize("N, K", [(4, 4), (8, 4), (9, 3), (32, 8), (8, 1)])
@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bs", [HopperBlockSizes(), HopperBlockSizes(pingpong=False),
                                HopperBlockSizes(block_kv=64, num_stages=4), HopperBlockSizes(persistent=True),
                                HopperBlockSizes(persistent=True, prefetch_q=True)],
                         ids=["default", "no-pingpong", "kv64", "persistent", "prefetch-q"])
def test_matches_reference(N, K, H, causal, bs):
    q, k, v = inputs(N * H + causal, 2, 384, 384 if causal else 512, N, K, H)
    # Prefetched queries take the shared memory the lse tile would need at head dim 128: no lse there.
    with_lse = not bs.prefetch_q
    res = flash_attention_hopper(q, k, v, causal=causal, sm_scale=H ** -0.5, block_sizes=bs, return_lse=with_lse)
    out, lse = res if with_lse else (res, None)
    want, want_lse = flash_attention_reference(q, k, v, causal=causal), None
    assert rel(out, want) < 1e-2
    if not with_lse:
        return
    s = jnp.einsum("bqngh,bsnh->bqngs", q.reshape(2, 384, K, N // K, H).astype(jnp.float32),
                   k.astype(jnp.float32)) * H ** -0.5
    if causal:
        s = jnp.where((jnp.arange(384)[:, None] >= jnp.arange(k.shape[1])[None, :])[None, :, None, None], s, -jnp.inf)
    want_lse = jax.nn.logsumexp(s, axis=-1).reshape(2, 384, N)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=1e-3, rtol=1e-4)


@on_hopper
def test_long_sequences_three_stages_and_dispatch():
    S = 8192
    q, k, v = inputs(3, 1, S, S, 8, 2, 128)
    tail = slice(S - 256, S)
    want = flash_attention_reference(q[:, tail], k, v, causal=True, q_offset=jnp.array([S - 256]))
    got = flash_attention(q, k, v, causal=True)  # long enough for the table's long-sequence entry
    assert rel(got[:, tail], want) < 1e-2
    got3 = flash_attention_hopper(q, k, v, causal=True, sm_scale=128 ** -0.5,
                                  block_sizes=HopperBlockSizes(num_stages=3, persistent=True))
    assert rel(got3[:, tail], want) < 1e-2
    # options outside the fast path still work (Triton kernel)
    got_w = flash_attention(q[:, :512], k[:, :512], v[:, :512], causal=True, window=100)
    assert rel(got_w, flash_attention_reference(q[:, :512], k[:, :512], v[:, :512], causal=True, window=100)) < 1e-2


@on_hopper
@pytest.mark.parametrize("causal", [True, False])
def test_prefetched_queries_over_many_tiles_per_cta(causal):
    """~8 tiles per CTA, so every CTA fills and reads both query buffers several times."""
    B, S, N, K, H = 2, 4096, 16, 4, 128
    q, k, v = inputs(11 + causal, B, S, S, N, K, H)
    plain = flash_attention_hopper(q, k, v, causal=causal, sm_scale=H ** -0.5,
                                   block_sizes=HopperBlockSizes(persistent=True))
    got = flash_attention_hopper(q, k, v, causal=causal, sm_scale=H ** -0.5,
                                 block_sizes=HopperBlockSizes(persistent=True, prefetch_q=True))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(plain, np.float32))
    tail = slice(S - 256, S)
    want = flash_attention_reference(q[:, tail], k, v, causal=causal,
                                      q_offset=jnp.array([S - 256] * B) if causal else None)
    assert rel(got[:, tail], want) < 1e-2
    with pytest.raises(ValueError, match="prefetch_q needs persistent"):
        flash_attention_hopper(q, k, v, causal=causal, sm_scale=H ** -0.5,
                               block_sizes=HopperBlockSizes(prefetch_q=True))
