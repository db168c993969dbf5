"""The PyTorch peer of benchmarks/torch_peer.py computes the same model as jinfer: its static-cache decode
equals its own full forward, and given jinfer's weights its logits equal jinfer's dense reference (Llama-3
rope scaling included), so the benchmark compares the speed of equal work."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.torch_peer import TINY, Llama, cached_vs_full  # noqa: E402


def load_jinfer_params(model: Llama, params) -> Llama:
    """jinfer's einsum layouts (wq [L, D, N, H], w_gate [L, D, F], lm_head [D, V], ...) into torch's
    Linear layout [out, in], Q/K/V and gate/up fused."""
    c = model.c
    p = {k: np.asarray(v, np.float32) for k, v in params["layers"].items()}

    def t(a):
        return torch.from_numpy(np.array(a, np.float32))  # a writable copy

    D = c.hidden_size
    for i, blk in enumerate(model.layers):
        qkv = [p[n][i].reshape(D, -1).T for n in ("wq", "wk", "wv")]
        blk.wqkv.copy_(t(np.concatenate(qkv)))
        blk.wo.copy_(t(p["wo"][i].reshape(-1, D).T))
        blk.w13.copy_(t(np.concatenate([p["w_gate"][i].T, p["w_up"][i].T])))
        blk.w2.copy_(t(p["w_down"][i].T))
        blk.attn_norm.copy_(t(p["attn_norm"][i]))
        blk.mlp_norm.copy_(t(p["mlp_norm"][i]))
    model.embed.copy_(t(np.asarray(params["embed"])))
    model.final_norm.copy_(t(np.asarray(params["final_norm"])))
    if not c.tie_word_embeddings:
        model.lm_head.copy_(t(np.asarray(params["lm_head"]).T))
    return model


def test_cached_decode_equals_full_forward():
    torch.manual_seed(0)
    model = Llama(TINY, max_len=40, dtype=torch.float32).init_random_(0)
    tokens = torch.randint(0, TINY.vocab_size, (3, 20))
    got, want = cached_vs_full(model, tokens, prefix=4)  # caches start random: stale slots must be masked
    assert got.shape == want.shape == (3, 17, TINY.vocab_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_jinfer(tied):
    import jax
    import jax.numpy as jnp

    from jinfer.models import llama
    from jinfer.runtime import reference

    config = dataclasses.replace(TINY, tie_word_embeddings=tied)
    params = llama.init_params(config, jax.random.key(0), jnp.float32)
    model = load_jinfer_params(Llama(config, max_len=32, dtype=torch.float32), params)
    ids = list(np.random.default_rng(0).integers(0, config.vocab_size, 24))
    want = reference.full_logits(params, config, ids)  # f32[T, V]
    model.setup_caches(1)
    full = model(torch.tensor([ids]), torch.arange(len(ids)), prefill=True, last_only=False)[0].numpy()
    cached, _ = cached_vs_full(model, torch.tensor([ids]), prefix=1)
    scale = np.abs(want).max()
    assert scale > 1.0  # logits large enough that a wrong rotation or grouping would show
    np.testing.assert_allclose(full, want, atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(cached[0].numpy(), want, atol=1e-4 * scale, rtol=0)
