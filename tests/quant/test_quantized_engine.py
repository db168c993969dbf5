"""The engine with quantized weights (EngineConfig.quantization) against the dense reference loop run on the
same quantized params: the same greedy tokens under preemption and prefix caching, every page returned."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jinfer.engine.config import EngineConfig
from jinfer.models import llama
from jinfer.quant.params import param_bytes, quantize_params
from jinfer.quant.qtensor import dequantize
from jinfer.runtime import reference
from jinfer.runtime.build import build_engine
from jinfer.testing.tiny import TINY, tiny_params
from tests.engine.test_engine import assert_pages_all_returned, greedy, run_workload

CONFIG = dataclasses.replace(TINY, attention_bias=True)  # every leaf kind of the layer


def engine_equals_reference(params, quantization=None, group=None, kv_cache_dtype=None):
    """Seven requests sharing a prefix through a small pool (preemption and prefix hits both happen) on an
    engine with these settings, against the dense reference on the params quantized alike, its K/V too:
    the same greedy tokens, every page returned. -> (the engine, the quantized params)."""
    cfg = EngineConfig(max_slots=4, page_size=4, num_pages=18, token_buckets=(8, 32), max_prefill_chunk=16,
                       quantization=quantization, quantization_group_size=group, kv_cache_dtype=kv_cache_dtype)
    eng = build_engine(CONFIG, params, None, cfg, seed=0)
    eng.warmup()
    rng = np.random.default_rng(2)
    shared = list(rng.integers(0, CONFIG.vocab_size, 12))
    arrivals = [(i // 2, shared + list(rng.integers(0, CONFIG.vocab_size, int(rng.integers(2, 12)))), greedy(20))
                for i in range(7)]
    outs = run_workload(eng, arrivals)
    assert eng.scheduler.num_preemptions > 0 and eng.load().prefix_hit_rate > 0

    if quantization is not None:
        params = quantize_params(params, llama.MATMUL_INPUT_AXES, quantization, group)
    want = reference.generate(params, CONFIG, [a[1] for a in arrivals], [a[2] for a in arrivals],
                              kv_cache_dtype=kv_cache_dtype)
    assert [outs[i].token_ids for i in range(len(arrivals))] == [w.token_ids for w in want]
    assert_pages_all_returned(eng)
    return eng, params


# int8 weights run through the same workload beside an fp8 KV cache (test_kv_cache_quant.py).
@pytest.mark.parametrize("method, group", [("int4", 32), ("fp8", None)])
def test_quantized_engine_equals_quantized_reference(method, group):
    params = tiny_params(1, CONFIG)
    _, quantized = engine_equals_reference(params, method, group)
    # The quantization did something: each matrix moved off the float weights by more than rounding noise.
    for name in llama.MATMUL_INPUT_AXES:
        diff = np.abs(np.asarray(dequantize(quantized["layers"][name])) - np.asarray(params["layers"][name]))
        assert 1e-4 < diff.max() < 0.5, name
    layers = sum(int(np.prod(params["layers"][n].shape)) * 4 for n in llama.MATMUL_INPUT_AXES)
    saved = param_bytes(params) - param_bytes(quantized)
    assert saved > layers * (0.6 if method == "int4" and group == 32 else 0.7)


def test_llm_quantization_arguments_change_only_what_they_give():
    from jinfer.checkpoints.load import LoadedModel
    from jinfer.entrypoints.llm import LLM
    from jinfer.quant.qtensor import QTensor
    from jinfer.testing.tiny import tiny_tokenizer

    loaded = LoadedModel(TINY, tiny_params(0), tiny_tokenizer())
    base = EngineConfig(max_slots=2, page_size=4, num_pages=16, token_buckets=(8,), quantization="int4",
                        quantization_group_size=32)
    llm = LLM(loaded, engine_config=base, warmup=False, quantization_group_size=16)
    assert (llm.engine.config.quantization, llm.engine.config.quantization_group_size) == ("int4", 16)
    w = llm.engine.runner.params["layers"][0]["w_up"]
    assert isinstance(w, QTensor) and (w.fmt, w.group_size) == ("int4", 16)
