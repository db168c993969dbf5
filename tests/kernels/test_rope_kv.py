"""The Pallas RoPE-and-store kernel (interpret mode on the CPU, native on a GPU) against the jnp reference and
against the model's own rotation (`apply_rope`) and page write (`store_tokens`), on fresh random inputs: float32
and bfloat16, head counts on and off a power of two (GQA 4:1 and 3:1, SmolLM2's 9 and 3), one token and several
in distinct pages, the pages' other slots (NaN) untouched, a layer at a traced index, and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.kernels.rope_kv import rope_and_store, rope_and_store_reference
from jinfer.models.config import ModelConfig
from jinfer.models.layers import apply_rope, rope_inv_freq, scale_rows
from jinfer.quant.kv import store_tokens

NATIVE = jax.devices()[0].platform == "gpu"
INTERPRET = not NATIVE
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}  # the kernel's cos / sin may differ from XLA's by an ulp
L, P, S = 3, 8, 4


def inputs(rng, dtype, N, K, H, T):
    qkv = jnp.asarray(rng.normal(size=(T, N + 2 * K, H)), dtype)
    positions = jnp.asarray(rng.integers(0, 9000, T), jnp.int32)
    pages = [jnp.full((L, K, P, S, H), jnp.nan, dtype) for _ in range(2)]
    slot = jnp.asarray(rng.permutation(P * S)[:T], jnp.int32)
    return qkv, positions, pages, slot


def inv_freq(H):
    c = ModelConfig(vocab_size=8, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=8,
                    head_dim=H, rope_theta=500000.0)
    return jnp.asarray(rope_inv_freq(c))


def close(a, b, dtype):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=TOL[dtype], atol=TOL[dtype])  # NaN where both are NaN


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("N,K,H", [(8, 2, 64), (9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("T", [1, 5])
def test_against_reference_and_the_models_ops(dtype, N, K, H, T):
    rng = np.random.default_rng(N * 100 + T)
    qkv, pos, (kp, vp), slot = inputs(rng, dtype, N, K, H, T)
    freqs = inv_freq(H)
    run = jax.jit(lambda qkv, kp, vp, layer: rope_and_store(qkv, pos, freqs, kp, vp, layer, slot, num_heads=N,
                                                            interpret=INTERPRET))
    q, k_pages, v_pages = run(qkv, kp, vp, jnp.int32(1))
    ref = rope_and_store_reference(qkv, pos, freqs, kp, vp, 1, slot, num_heads=N)
    for got, want in zip((q, k_pages, v_pages), ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        close(got, want, dtype)
    # The model's own ops: apply_rope on [B, T, heads, H], store_tokens at (page, offset).
    q_m = apply_rope(qkv[None, :, :N], pos[None], np.asarray(freqs))[0]
    k_m = apply_rope(qkv[None, :, N:N + K], pos[None], np.asarray(freqs))[0]
    close(q, q_m, dtype)
    close(k_pages, store_tokens(kp, 1, slot // S, slot % S, k_m), dtype)
    close(v_pages, store_tokens(vp, 1, slot // S, slot % S, qkv[:, N + K:]), dtype)
    written = np.zeros((L, K, P, S), bool)
    written[1, :, np.asarray(slot) // S, np.asarray(slot) % S] = True
    assert np.isnan(np.asarray(k_pages, np.float32)[~written]).all()  # nothing else written
    assert not np.isnan(np.asarray(v_pages, np.float32)[written]).any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("D", [96, 128])
def test_folded_norm_rows_scale_the_product_first(dtype, D):
    """With x and eps (folded norms), the reference of `scale_rows(qkv, x, eps)`: each token's row of x
    reduced to its factor (rows of different scales; D a power of two and not)."""
    rng = np.random.default_rng(D)
    N, K, H, T = 8, 2, 64, 5
    qkv, pos, (kp, vp), slot = inputs(rng, dtype, N, K, H, T)
    x = jnp.asarray(rng.normal(size=(T, D)) * rng.uniform(0.1, 8.0, size=(T, 1)), dtype)
    freqs, eps = inv_freq(H), 1e-6
    run = jax.jit(lambda qkv, kp, vp: rope_and_store(qkv, pos, freqs, kp, vp, 2, slot, x, num_heads=N,
                                                     interpret=INTERPRET, eps=eps))
    got = run(qkv, kp, vp)
    want = rope_and_store_reference(scale_rows(qkv[None], x[None], eps)[0], pos, freqs, kp, vp, 2, slot,
                                    num_heads=N)
    for g, w in zip(got, want):
        close(g, w, dtype)
    assert "rope_norm_and_store" in str(jax.make_jaxpr(run)(qkv, kp, vp))


def test_errors_name_the_shapes():
    rng = np.random.default_rng(0)
    qkv, pos, (kp, vp), slot = inputs(rng, jnp.float32, 4, 2, 16, 2)
    with pytest.raises(ValueError, match=r"num_heads=5 query heads and the pages' K=2"):
        rope_and_store(qkv, pos, inv_freq(16), kp, vp, 0, slot, num_heads=5, interpret=True)
    with pytest.raises(ValueError, match=r"slot \(3,\) must be \[2\]"):
        rope_and_store(qkv, pos, inv_freq(16), kp, vp, 0, jnp.zeros(3, jnp.int32), num_heads=4, interpret=True)
    with pytest.raises(ValueError, match=r"x of shape \(2, 8\) and eps=None go together"):
        rope_and_store(qkv, pos, inv_freq(16), kp, vp, 0, slot, jnp.zeros((2, 8)), num_heads=4, interpret=True)


@pytest.mark.skipif(NATIVE, reason="the CPU-only check of what interpret mode skips")
def test_triton_lowering_writes_the_pages_in_place():
    """On the CPU, the Triton lowering itself (interpret mode skips it): one kernel, the pages aliased to its
    outputs (written in place, not copied), SmolLM2's head counts (off a power of two)."""
    N, K, H = 9, 3, 64
    pages = jax.ShapeDtypeStruct((30, K, 64, 16, H), jnp.bfloat16)
    traced = jax.jit(lambda qkv, pos, kp, vp, layer, slot: rope_and_store(
        qkv, pos, inv_freq(H), kp, vp, layer, slot, num_heads=N, interpret=False), donate_argnums=(2, 3)).trace(
        jax.ShapeDtypeStruct((2, N + 2 * K, H), jnp.bfloat16), jax.ShapeDtypeStruct((2,), jnp.int32), pages, pages,
        jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32))
    try:
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:  # jax >= 0.11 asks for a GPU (its compute capability) to lower for one
        pytest.skip(f"this jax cannot lower for a GPU without one: {e}")
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "output_operand_aliases" in text and "dynamic_update_slice" not in text
