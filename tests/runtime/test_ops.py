"""The runtime's choice of the model's ops: on one GPU the Pallas norm kernel (interpret mode here) gives the
forward XLA's norm gives, stacked or per-layer params, at decode and prefill sizes, and it replaces every
RMSNorm of the step; meshes and other platforms keep XLA's ops."""

from __future__ import annotations

import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.models import llama
from jinfer.models.attention import dense_cache_attention, dense_kv_cache
from jinfer.quant.qtensor import LayerSlice
from jinfer.runtime.matmul import kernel_matmul
from jinfer.runtime.ops import kernel_norm, kernel_swiglu, model_ops
from jinfer.testing.tiny import TINY, tiny_params


def forward(params, T: int, ops: llama.ModelOps):
    c = TINY
    tokens = jax.random.randint(jax.random.key(T), (1, T), 0, c.vocab_size)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    cache = dense_kv_cache(c.num_layers, 1, T, c.num_kv_heads, c.head_dim, jnp.float32)
    fn = functools.partial(llama.forward, config=c, attention=dense_cache_attention, ops=ops)
    return fn(params, tokens, positions, cache, None)[0], jax.make_jaxpr(fn)(params, tokens, positions, cache, None)


def calls(jaxpr, name: str) -> int:
    """Call sites of a jitted function `name` or uses of primitive `name`, in jaxpr and the jaxprs it holds
    (scan and switch bodies), not counting what those calls or any kernel hold."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name or eqn.params.get("name") == name:
            n += 1
            continue
        if eqn.primitive.name == "pallas_call":
            continue
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += calls(sub, name)
    return n


@pytest.mark.parametrize("layers", ["stacked", "per_layer", "unrolled"])
@pytest.mark.parametrize("T", [1, 9])
def test_norm_kernel_forward_equals_xla(layers, T):
    params = tiny_params(5)
    if layers != "stacked":
        params = llama.unstack_layers(params)
    unroll = layers == "unrolled"
    ours, jaxpr = forward(params, T, llama.ModelOps(norm=functools.partial(kernel_norm, interpret=True),
                                                    unroll=unroll))
    ref, ref_jaxpr = forward(params, T, llama.ModelOps(unroll=unroll))
    # Two norms a layer (in the scan's body, once, or in each unrolled layer) and the final one, each the
    # kernel's; XLA's computes none.
    norms = 2 * TINY.num_layers + 1 if unroll else 3
    assert calls(jaxpr.jaxpr, "rms_norm") == norms and calls(jaxpr.jaxpr, "sqrt") == 0
    assert calls(ref_jaxpr.jaxpr, "rms_norm") == 0 and calls(ref_jaxpr.jaxpr, "sqrt") == norms
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_model_ops_by_platform():
    assert model_ops("cpu", 1) == llama.ModelOps()
    assert model_ops("gpu", 1) == llama.ModelOps(matmul=kernel_matmul, norm=kernel_norm, unroll=True,
                                                 swiglu=kernel_swiglu, fuse=True, fold_norms=True, split_parts=True)
    assert model_ops("gpu", 2) == llama.ModelOps()  # over a mesh XLA partitions its own ops, not a kernel's


@pytest.mark.parametrize("layers", ["stacked", "per_layer", "unrolled"])
@pytest.mark.parametrize("T", [1, 9])
def test_folded_norms_forward_equals_the_models(layers, T):
    """`fold_norms` then the gated activation's kernel: the forward of the unfolded model, with no RMSNorm of a
    layer left (only the final one), and each layer's gains gone from the params."""
    params = llama.fuse_projections(tiny_params(4))
    if layers != "stacked":
        params = llama.unstack_layers(params)
    unroll = layers == "unrolled"
    folded = llama.fold_norms(params)
    assert llama.is_folded(folded) and not llama.is_folded(params)
    ops = llama.ModelOps(norm=functools.partial(kernel_norm, interpret=True),
                         swiglu=functools.partial(kernel_swiglu, interpret=True), unroll=unroll)
    ours, jaxpr = forward(folded, T, ops)
    ref, _ = forward(params, T, llama.ModelOps(unroll=unroll))
    assert calls(jaxpr.jaxpr, "rms_norm") == 1
    # Once in the scan's body, or in each layer's code (unrolled, or each branch of the per-layer switch).
    assert calls(jaxpr.jaxpr, "swiglu_rms") == (1 if layers == "stacked" else TINY.num_layers)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantization", ["int4", "int8"])
@pytest.mark.parametrize("layers", ["stacked", "unrolled"])
def test_folded_quantized_forward_equals_the_unfolded(quantization, layers):
    """Quantized products take their gains as input scales: the forward through the quantized matmul kernel
    (interpreted) and the gated activation's kernel equals the unfolded quantized model's through XLA."""
    from jinfer.quant.params import quantize_params

    params = quantize_params(llama.fuse_projections(tiny_params(5)), llama.MATMUL_INPUT_AXES | llama.FUSED_INPUT_AXES,
                             quantization, None)
    if layers != "stacked":
        params = llama.unstack_layers(params)
    unroll = layers == "unrolled"
    folded = llama.fold_norms(params)
    assert llama.is_folded(folded)
    ops = llama.ModelOps(matmul=functools.partial(kernel_matmul, interpret=True),
                         norm=functools.partial(kernel_norm, interpret=True),
                         swiglu=functools.partial(kernel_swiglu, interpret=True), unroll=unroll, split_parts=True)
    ours, jaxpr = forward(folded, 1, ops)
    ref, _ = forward(params, 1, llama.ModelOps(unroll=unroll))
    assert calls(jaxpr.jaxpr, "rms_norm") == 1
    # The gate/up product's partials reach the activation's kernel unsummed (one split at this K; the kernels'
    # own tests sum several).
    w = folded["layers"]["w_gate_up"] if layers == "stacked" else folded["layers"][0]["w_gate_up"]
    x = jnp.ones((1, 1, TINY.hidden_size), jnp.float32)
    parts = kernel_matmul("BTD,DF->BTF", x, w if layers != "stacked" else LayerSlice(w, jnp.int32(0)),
                          interpret=True, parts=True)
    assert parts.shape == (1, 1, 1, 2 * TINY.intermediate_size)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_split_gate_up_partials_reach_the_activation():
    """At a width where the gate/up product runs split-K at one row (K = 576: five groups of 128, so five
    programs share K), the folded int4 forward with the partials summed by the activation's kernel equals the
    unfolded model's through XLA."""
    import dataclasses

    from jinfer.quant.params import quantize_params

    c = dataclasses.replace(TINY, hidden_size=576, intermediate_size=1536, num_heads=4, head_dim=144)
    params = quantize_params(llama.fuse_projections(tiny_params(6, c)), llama.MATMUL_INPUT_AXES
                             | llama.FUSED_INPUT_AXES, "int4", None)
    folded = llama.fold_norms(params)
    ops = llama.ModelOps(matmul=functools.partial(kernel_matmul, interpret=True),
                         swiglu=functools.partial(kernel_swiglu, interpret=True), split_parts=True)
    x = jax.random.normal(jax.random.key(1), (1, 1, c.hidden_size))
    parts = kernel_matmul("BTD,DF->BTF", x, LayerSlice(folded["layers"]["w_gate_up"], jnp.int32(0)), interpret=True,
                          parts=True)
    assert parts.shape[0] > 1
    tokens, positions = jnp.array([[7]]), jnp.zeros((1, 1), jnp.int32)
    cache = dense_kv_cache(c.num_layers, 1, 1, c.num_kv_heads, c.head_dim, jnp.float32)
    run = functools.partial(llama.forward, config=c, attention=dense_cache_attention)
    ours = run(folded, tokens, positions, cache, None, ops=ops)[0]
    ref = run(params, tokens, positions, cache, None)[0]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_fold_norms_leaves_what_it_cannot_fold():
    """Unfused products and biased q/k/v keep their norms (the bias comes after the factor)."""
    plain = tiny_params(4)
    assert llama.fold_norms(plain) is not plain and not llama.is_folded(llama.fold_norms(plain))
    fused = llama.fuse_projections(plain)
    biased = {**fused, "layers": {**fused["layers"], "bq": jnp.zeros((TINY.num_layers, TINY.num_heads,
                                                                         TINY.head_dim))}}
    assert not llama.is_folded(llama.fold_norms(biased))


def _engine_tokens(monkeypatch, ops, backend, prompts, speculative=None, quantization=None):
    """Greedy tokens of an engine built with `ops` as the runtime's model ops, and its verify steps."""
    from jinfer.engine.config import EngineConfig
    from jinfer.inputs import SamplingParams
    from jinfer.runtime import runner
    from jinfer.runtime.build import build_engine
    from jinfer.testing.tiny import tiny_tokenizer
    from tests.engine.test_engine import run_workload

    monkeypatch.setattr(runner, "model_ops", lambda platform, n: ops)
    cfg = EngineConfig(max_slots=4, page_size=8, num_pages=32, token_buckets=(16,), decode_buckets=(4,),
                       max_prefill_chunk=8, decode_steps=4, per_layer_weights=False, speculative=speculative,
                       quantization=quantization)
    eng = build_engine(TINY, tiny_params(12), tiny_tokenizer(), cfg, attention_backend=backend, seed=0)
    assert llama.is_folded(eng.runner.params) == ops.fold_norms
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = run_workload(eng, [(i, p, sp) for i, p in enumerate(prompts)]).values()
    return [o.token_ids for o in outs], sum(o.metrics.spec_verify_steps for o in outs)


def _one_gpu_forms():
    """The one-GPU model ops and attention backend, interpreted."""
    from jinfer.attention.pallas import pallas_backend

    ops = llama.ModelOps(matmul=functools.partial(kernel_matmul, interpret=True),
                         norm=functools.partial(kernel_norm, interpret=True),
                         swiglu=functools.partial(kernel_swiglu, interpret=True), unroll=True, fuse=True,
                         fold_norms=True, split_parts=True)
    return ops, pallas_backend(TINY.num_kv_heads, TINY.num_heads, 4, 8, interpret=True)


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_folded_norms_engine_gives_the_plain_engines_tokens(monkeypatch, quantization):
    """The one-GPU forms, interpreted on the CPU: products fused, their norm gains folded in, the Pallas attention
    backend (its fused decode kernel and its RoPE-and-store kernel each scale q, k, v by the norm factor) and the
    gated activation's kernel, layers unrolled; greedy tokens equal the plain engine's, through prefill chunks,
    decode blocks and a preemption-free mix of both. int4: the fused products quantized, the gains their input
    scales, decode products through the quantized matmul kernel."""
    prompts = [[5, 9, 5, 17, 33], [1, 2, 3], list(range(40, 59))]
    assert (_engine_tokens(monkeypatch, *_one_gpu_forms(), prompts, quantization=quantization)
            == _engine_tokens(monkeypatch, llama.ModelOps(), None, prompts, quantization=quantization))


@pytest.mark.parametrize("method", ["ngram", "early_exit"])
def test_folded_norms_engine_speculates_exactly(monkeypatch, method):
    """Verify steps (k + 1 rows a request through RoPE-and-store, folded norms) and the early-exit drafter (the
    target's first layer, unrolled and folded) on the one-GPU forms: greedy tokens equal the plain engine's
    without speculation, with verify steps taken."""
    prompts = [[5, 9, 5, 17, 33, 5, 9, 5, 17, 33, 5, 9], [1, 2, 3, 1, 2, 3, 1, 2], list(range(40, 59))]
    spec = dict(method=method, num_speculative_tokens=3, adaptive=False, disable_by_batch_size=8,
                **({"prompt_lookup_min": 1} if method == "ngram" else {"early_exit_layers": 1}))
    tokens, verify_steps = _engine_tokens(monkeypatch, *_one_gpu_forms(), prompts, spec)
    assert verify_steps > 0
    assert tokens == _engine_tokens(monkeypatch, llama.ModelOps(), None, prompts)[0]


def test_quantized_weights_take_their_gains_as_input_scales():
    """`prepare_weights` quantizes the fused weights first, then folds the gains: into a float weight's numbers,
    into a quantized one's input scale (its stored numbers those of the unfolded quantization: rounded with a gain
    in them, int4 lost twice the perplexity on SmolLM2, RESULTS.md session 37)."""
    from jinfer.engine.config import EngineConfig
    from jinfer.quant.qtensor import dequantize
    from jinfer.runtime.runner import prepare_weights

    params = tiny_params(13)
    ops = llama.ModelOps(unroll=True, fuse=True, fold_norms=True)
    fused = llama.fuse_projections(params)["layers"]
    for quantization in ("int8", "int4", "fp8"):
        kept = prepare_weights(params, EngineConfig(quantization=quantization), ops._replace(fold_norms=False), True)
        folded = prepare_weights(params, EngineConfig(quantization=quantization), ops, fuse=True)
        assert llama.is_folded(folded) and not llama.is_folded(kept)
        for name, norm in (("wqkv", "attn_norm"), ("w_gate_up", "mlp_norm")):
            w, q = folded["layers"][name], kept["layers"][name]
            np.testing.assert_array_equal(np.asarray(w.values), np.asarray(q.values))
            gain = np.asarray(fused[norm], np.float32)
            np.testing.assert_allclose(np.asarray(w.input_scale), 1 / gain, rtol=1e-7)
            want = gain.reshape(*gain.shape, *(1,) * (q.values.ndim - gain.ndim)) * np.asarray(dequantize(q))
            np.testing.assert_allclose(np.asarray(dequantize(w)), want, rtol=1e-5, atol=1e-6)
    prepared = prepare_weights(params, EngineConfig(), ops, fuse=True)
    assert llama.is_folded(prepared)
    gain = np.asarray(params["layers"]["mlp_norm"])[:, :, None]
    want = gain * np.asarray(llama.fuse_projections(params)["layers"]["w_gate_up"])
    np.testing.assert_allclose(np.asarray(prepared["layers"]["w_gate_up"]), want, rtol=1e-6)
