"""Engines built from a model's params: the host-side Engine with its device-side Runner.

`make_engine` is what the entry points call: one Engine, or a DataParallelEngine of replicas when the
config asks for several. The KV pool's size, when the config leaves it open, comes from the device's free
memory after the weights.
"""

from __future__ import annotations

import dataclasses

import jax

from jinfer.engine.config import EngineConfig
from jinfer.engine.data_parallel import DataParallelEngine
from jinfer.engine.engine import Engine
from jinfer.models import llama
from jinfer.models.config import ModelConfig
from jinfer.quant.kv import kv_token_bytes
from jinfer.runtime.runner import Runner


def resolve_num_pages(engine_config: EngineConfig, model_config: ModelConfig, device=None) -> int:
    if engine_config.num_pages is not None:
        return engine_config.num_pages
    stats = (device or jax.local_devices()[0]).memory_stats()
    if not stats or "bytes_limit" not in stats:
        return engine_config.cpu_default_pages
    c = model_config
    # Quantized pages (kv_cache_dtype) hold ~2x the tokens of bfloat16 in the same bytes, less their scales.
    page_bytes = engine_config.page_size * kv_token_bytes(c.num_layers, c.num_kv_heads, c.head_dim,
                                                          engine_config.dtype, engine_config.kv_cache_dtype)
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return max(2, int(free * engine_config.memory_fraction // page_bytes))


def draft_cost(spec, target: ModelConfig, draft: ModelConfig | None) -> float:
    """What drafting one token costs relative to a decode step of the target, as the share of weights it reads:
    nothing for prompt lookup, the first m layers and the LM head for early exit, the draft's own for a draft."""
    if spec.method == "ngram":
        return 0.0
    total = llama.num_params(target)
    if spec.method == "early_exit":
        m, L = spec.draft_layers(target.num_layers), target.num_layers
        layers = total - target.vocab_size * target.hidden_size * (1 if target.tie_word_embeddings else 2)
        return (m * layers / L + target.vocab_size * target.hidden_size) / (layers + target.vocab_size * target.hidden_size)
    return llama.num_params(draft) / total if draft is not None else 0.0


def build_engine(model_config: ModelConfig, params, tokenizer, engine_config: EngineConfig | None = None,
                 attention_backend=None, seed: int | None = None, devices=None, drafter=None,
                 draft_model=None) -> Engine:
    """One engine on `devices` (default: the first tensor_parallel local devices); fields the config leaves
    None take the defaults of the devices' platform. `drafter`: a device proposer for the speculative config
    other than the one its method names (`jinfer.runtime.spec.drafters`); `draft_model`: (config, params) of the
    draft model of method "draft"."""
    cfg = (engine_config or EngineConfig()).resolve((devices[0] if devices else jax.local_devices()[0]).platform)
    spec = cfg.speculative
    if spec is not None and spec.draft_cost is None:
        cfg = dataclasses.replace(cfg, speculative=dataclasses.replace(
            spec, draft_cost=draft_cost(spec, model_config, None if draft_model is None else draft_model[0])))
    num_pages = resolve_num_pages(cfg, model_config, None if devices is None else devices[0])
    runner = Runner(model_config, cfg, params, num_pages, attention_backend, devices, drafter=drafter,
                    draft_model=draft_model)
    return Engine(model_config, runner, tokenizer, cfg, num_pages, seed=seed)


def make_engine(model_config: ModelConfig, params, tokenizer, engine_config: EngineConfig | None = None,
                attention_backend=None, seed: int | None = None, devices=None, draft_model=None):
    """An Engine, or a DataParallelEngine of `data_parallel` replicas, each on its own `tensor_parallel`
    devices of `devices` (default: this host's), when the config asks for several."""
    cfg = engine_config or EngineConfig()
    dp, tp = cfg.data_parallel, cfg.tensor_parallel
    if dp == 1:
        return build_engine(model_config, params, tokenizer, cfg, attention_backend, seed=seed, devices=devices,
                            draft_model=draft_model)
    devices = list(jax.local_devices() if devices is None else devices)
    if dp * tp > len(devices):
        raise ValueError(f"data_parallel={dp} x tensor_parallel={tp} needs {dp * tp} devices; "
                         f"{len(devices)} are available")
    return DataParallelEngine([
        build_engine(model_config, params, tokenizer, cfg, attention_backend, seed=None if seed is None else seed + r,
                     devices=devices[r * tp:(r + 1) * tp], draft_model=draft_model)
        for r in range(dp)])
