"""The quantized KV cache (EngineConfig.kv_cache_dtype): the engine against the dense reference loop that
quantizes K/V the same way (greedy tokens equal) under preemption and prefix caching, alone and with
quantized weights; the per-token-per-head quantization itself; the pool's bytes per token measured from its
arrays and the pool sizing that follows from them; bad values refused by name."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.attention.backend import paged_kv_cache
from jinfer.engine.config import EngineConfig
from jinfer.quant.kv import QuantizedKV, dequantize_kv, kv_token_bytes, quantize_kv, round_trip_kv
from jinfer.runtime import reference
from jinfer.runtime.build import resolve_num_pages
from jinfer.testing.tiny import TINY, tiny_params
from tests.engine.test_engine import greedy
from tests.quant.test_quantized_engine import CONFIG, engine_equals_reference


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantize_kv_is_per_token_per_head_and_round_trips_within_half_a_step(fmt):
    rng = np.random.default_rng(0)
    # Vectors of very different sizes (an outlier token costs only its own precision), one all zero.
    x = rng.normal(size=(3, 5, 64)) * np.array([1e-3, 1.0, 300.0])[:, None, None]
    x[1, 2] = 0
    values, scale = quantize_kv(jnp.asarray(x, jnp.float32), fmt)
    top = {"int8": 127, "fp8": 448}[fmt]
    assert values.dtype == {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[fmt] and scale.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(scale), np.abs(x).max(-1) / top, rtol=1e-6)
    back = np.asarray(dequantize_kv(values, scale, jnp.float32))
    err = np.abs(back - x) / np.asarray(scale)[..., None].clip(1e-30)
    # int8: half a step; fp8 (3 mantissa bits): half a step of the largest binade, 16 units of the scale.
    assert err.max() <= (0.5 if fmt == "int8" else 16) * (1 + 1e-5)
    assert not back[1, 2].any() and np.isfinite(back).all()
    assert (np.abs(np.asarray(values, np.float32)).max(-1)[np.abs(x).max(-1) > 0] == top).all()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_the_oracles_round_trip_gives_what_stored_pages_give_back(fmt):
    """The reference's K/V (quantized and dequantized inside one jit) equal values stored in the format and read
    back in another jit, as the engine's pages are. On the GPU, XLA folded float8's pair of converts away inside
    one jit (fp8 KV matched 21/24 before the barrier in `round_trip_kv`); on the CPU it never did."""
    x = jax.random.normal(jax.random.key(3), (4, 8, 64), jnp.float32) * 3
    values, scale = jax.jit(quantize_kv, static_argnums=1)(x, fmt)
    stored = jax.jit(dequantize_kv, static_argnums=2)(values, scale, jnp.float32)
    oracle = jax.jit(round_trip_kv, static_argnums=1)(x, fmt)
    np.testing.assert_array_equal(np.asarray(oracle), np.asarray(stored))


@pytest.mark.parametrize("kv, weights", [("int8", None), ("fp8_e4m3", "int8")])
def test_engine_with_quantized_kv_equals_the_reference_that_quantizes_kv_alike(kv, weights):
    eng, params = engine_equals_reference(tiny_params(1, CONFIG), weights, kv_cache_dtype=kv)
    k_pages = eng.runner.kv[0]
    L, K, H = CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim
    assert isinstance(k_pages, QuantizedKV) and k_pages.fmt == eng.config.kv_cache_dtype
    assert k_pages.values.shape == (L, K, 18, 4, H) and k_pages.scale.shape == (L, K, 18, 4)
    prompts, sampling = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]], [greedy(4)] * 2
    # The reference's quantization does something (the prompts' logits move off the float cache's by more
    # than rounding), and the engine's pages hold nothing but 8-bit values and their scales.
    diff = np.abs(np.asarray(reference.DenseRun(params, CONFIG, prompts, sampling, kv_cache_dtype=kv).logits)
                  - np.asarray(reference.DenseRun(params, CONFIG, prompts, sampling).logits)).max()
    assert 1e-4 < diff < 0.5, diff


def test_pool_bytes_per_token_measured_from_the_arrays():
    """int8 / fp8 pages take H + 4 bytes per token and head (values and a float32 scale) where bfloat16 takes 2H
    and float32 4H; the pool sized from a memory budget holds that many more tokens."""
    L, K, H, P, ps = TINY.num_layers, TINY.num_kv_heads, TINY.head_dim, 6, 4
    measured = {}
    for dtype, kv in (("float32", None), ("bfloat16", None), ("bfloat16", "int8"), ("float32", "fp8")):
        pool = paged_kv_cache(L, P, ps, K, H, jnp.dtype(dtype), kv)
        nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(pool))
        measured[kv or dtype] = nbytes / (P * ps)
        assert measured[kv or dtype] == kv_token_bytes(L, K, H, dtype, kv)
    assert measured == {"float32": 2 * L * K * 4 * H, "bfloat16": 2 * L * K * 2 * H,
                        "int8": 2 * L * K * (H + 4), "fp8": 2 * L * K * (H + 4)}

    class Device:  # a device with memory statistics (the CPU reports none)
        def memory_stats(self):
            return {"bytes_limit": 1 << 30, "bytes_in_use": 0}

    config = dataclasses.replace(TINY, head_dim=128)
    pages = {kv or dtype: resolve_num_pages(EngineConfig(dtype=dtype, kv_cache_dtype=kv), config, Device())
             for dtype, kv in (("float32", None), ("bfloat16", None), ("bfloat16", "int8"))}
    assert abs(pages["int8"] / pages["bfloat16"] - 256 / 132) < 1e-3  # 1.94x the tokens of bfloat16
    assert abs(pages["int8"] / pages["float32"] - 512 / 132) < 1e-3  # 3.88x those of float32


@pytest.mark.parametrize("value", ["int4", "float16", 8])
def test_bad_kv_cache_dtype_is_refused_by_name(value):
    with pytest.raises(ValueError, match=f"EngineConfig.kv_cache_dtype={value!r}"):
        EngineConfig(kv_cache_dtype=value)
    with pytest.raises(ValueError, match=f"kv_cache_dtype={value!r}"):
        reference.DenseRun(tiny_params(), TINY, [[1]], [greedy(1)], kv_cache_dtype=value)


def test_spellings_and_the_command_line():
    from jinfer.entrypoints.cli import build_parser

    assert [EngineConfig(kv_cache_dtype=x).kv_cache_dtype for x in (None, "auto", "int8", "fp8", "fp8_e4m3")] == \
        [None, None, "int8", "fp8", "fp8"]
    parser = build_parser()
    for argv in (["generate", "hi"], ["batch", "in.jsonl", "out.jsonl"], ["serve"]):
        assert parser.parse_args(argv + ["--kv-cache-dtype", "fp8_e4m3"]).kv_cache_dtype == "fp8_e4m3"
        assert parser.parse_args(argv).kv_cache_dtype is None
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "hi", "--kv-cache-dtype", "int4"])


def test_llm_kv_cache_dtype_overrides_only_that_field():
    from jinfer.checkpoints.load import LoadedModel
    from jinfer.entrypoints.llm import LLM
    from jinfer.testing.tiny import tiny_tokenizer

    loaded = LoadedModel(TINY, tiny_params(0), tiny_tokenizer())
    base = EngineConfig(max_slots=2, page_size=4, num_pages=16, token_buckets=(8,), quantization="int8")
    llm = LLM(loaded, engine_config=base, warmup=False, kv_cache_dtype="fp8_e4m3")
    assert (llm.engine.config.quantization, llm.engine.config.kv_cache_dtype) == ("int8", "fp8")
    assert llm.engine.runner.kv[1].values.dtype == jnp.float8_e4m3fn
