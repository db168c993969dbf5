"""The reference generation loop: batched prefill, then one decode step per token over a dense KV cache.

This is the test oracle for the engine (whose paged, continuously batched output must equal it token for
token) and the simplest way to run a model. It syncs with the host every step, so it is not fast.

Shape buckets (each compiles once per model): batch rows and prompt lengths are padded to powers of two
(prompt at least 16), the cache length to the next power of two of the longest prompt + max_tokens,
capped at the model's context. `kv_cache_dtype` ("int8", "fp8") stores K/V as a quantized cache would
give them back (`jinfer.models.attention.dense_cache_attention`): the oracle of the engine's quantized pages.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.inputs import SamplingParams
from jinfer.models import llama
from jinfer.models.attention import dense_cache_attention, dense_kv_cache
from jinfer.models.config import ModelConfig
from jinfer.quant.formats import resolve_kv_cache_dtype
from jinfer.runtime.sampler import sample, step_keys


def pow2_bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("config", "kv_cache_dtype"), donate_argnames=("cache",))
def forward_step(params, tokens, positions, last_index, cache, config: ModelConfig, kv_cache_dtype=None):
    """tokens/positions: i32[B, T]; last_index: i32[B] -> (logits f32[B, V] at last_index, cache)."""
    h, cache = llama.forward(params, tokens, positions, cache, None, config=config,
                             attention=functools.partial(dense_cache_attention, kv_cache_dtype=kv_cache_dtype))
    h_last = jnp.take_along_axis(h, last_index[:, None, None], axis=1)[:, 0]
    return llama.logits_from_hidden(params, h_last, config), cache


@jax.jit
def _sample_step(logits, temperature, top_k, top_p, seeds, step):
    return sample(logits, temperature, top_k, top_p, step_keys(seeds, step))


def full_logits(params, config: ModelConfig, token_ids: Sequence[int], kv_cache_dtype: str | None = None) -> np.ndarray:
    """f32[T, V]: the logits at every position of one sequence (for parity tests), with K/V stored as
    `kv_cache_dtype` gives them back."""
    T = len(token_ids)
    cache = dense_kv_cache(config.num_layers, 1, T, config.num_kv_heads, config.head_dim,
                           jax.tree_util.tree_leaves(params)[0].dtype)
    logits, _ = _full_logits(params, jnp.asarray([token_ids], jnp.int32), cache, config,
                             resolve_kv_cache_dtype(kv_cache_dtype))
    return np.asarray(logits)[0]


@functools.partial(jax.jit, static_argnames=("config", "kv_cache_dtype"))
def _full_logits(params, tokens, cache, config, kv_cache_dtype=None):
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    h, cache = llama.forward(params, tokens, positions, cache, None, config=config,
                             attention=functools.partial(dense_cache_attention, kv_cache_dtype=kv_cache_dtype))
    return llama.logits_from_hidden(params, h, config), cache


@dataclasses.dataclass
class Generation:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"


class DenseRun:
    """One batch of requests through the dense-cache loop: `__init__` prefills, each `step()` samples one
    token for every active row (applying EOS, stop-token and length limits) and runs the next decode.
    A caller that matches stop strings on text ends a row with `stop(row)`.
    """

    def __init__(self, params, config: ModelConfig, prompts: Sequence[Sequence[int]],
                 sampling: Sequence[SamplingParams], rng: np.random.Generator | None = None,
                 eos_token_ids: Sequence[int] | None = None, kv_cache_dtype: str | None = None):
        if len(prompts) != len(sampling):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling)} SamplingParams")
        if not prompts:
            raise ValueError("prompts is empty")
        rng = rng or np.random.default_rng()
        self.params, self.config = params, config
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
        n = len(prompts)
        max_pos = config.max_position_embeddings
        lens = np.array([len(p) for p in prompts])
        self.limits = np.array([min(sp.max_tokens, max_pos - len(p)) for p, sp in zip(prompts, sampling)])
        B = pow2_bucket(n)
        T = pow2_bucket(lens.max(), 16)
        self.S = S = min(pow2_bucket(int((lens + self.limits).max())), max_pos)
        tokens = np.zeros((B, T), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
        last = np.zeros(B, np.int32)
        last[:n] = lens - 1
        self.temperature = np.zeros(B, np.float32)
        self.top_k = np.zeros(B, np.int32)
        self.top_p = np.ones(B, np.float32)
        self.seeds = np.zeros(B, np.uint32)
        for i, sp in enumerate(sampling):
            self.temperature[i], self.top_k[i], self.top_p[i] = sp.temperature, sp.top_k, sp.top_p
            self.seeds[i] = sp.seed if sp.seed is not None else rng.integers(0, 2**32)
        eos = set(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.stop_ids = [set(sp.stop_token_ids) | (set() if sp.ignore_eos else eos)
                         for sp in sampling]
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        cache = dense_kv_cache(config.num_layers, B, S, config.num_kv_heads, config.head_dim, dtype)
        self.logits, self.cache = forward_step(params, jnp.asarray(tokens), jnp.asarray(positions),
                                                jnp.asarray(last), cache, config=config,
                                                kv_cache_dtype=self.kv_cache_dtype)
        self.outputs = [Generation([], "length") for _ in range(n)]
        self.active = np.zeros(B, bool)
        self.active[:n] = True
        self.pos = np.zeros(B, np.int32)
        self.pos[:n] = lens
        self.num_steps = 0

    @property
    def done(self) -> bool:
        return not self.active.any()

    def stop(self, row: int) -> None:
        if self.active[row]:
            self.active[row] = False
            self.outputs[row].finish_reason = "stop"

    def step(self) -> list[tuple[int, int]]:
        """Samples one token per active row; returns [(row, token)] and dispatches the next forward."""
        B = len(self.active)
        new = np.asarray(_sample_step(self.logits, self.temperature, self.top_k, self.top_p, self.seeds,
                                      jnp.full(B, self.num_steps, jnp.int32)))
        emitted = []
        for i in np.flatnonzero(self.active):
            t = int(new[i])
            out = self.outputs[i]
            out.token_ids.append(t)
            emitted.append((int(i), t))
            if t in self.stop_ids[i]:
                self.stop(i)
            elif len(out.token_ids) >= self.limits[i]:
                self.active[i] = False
        self.num_steps += 1
        if not self.done:
            self.logits, self.cache = forward_step(
                self.params, jnp.asarray(new[:, None]), jnp.asarray(self.pos[:, None]),
                jnp.zeros(B, jnp.int32), self.cache, config=self.config, kv_cache_dtype=self.kv_cache_dtype)
            self.pos = np.minimum(self.pos + 1, self.S - 1)  # finished rows decode into their last slot, unread
        return emitted


def generate(params, config: ModelConfig, prompts: Sequence[Sequence[int]],
             sampling: Sequence[SamplingParams], rng: np.random.Generator | None = None,
             eos_token_ids: Sequence[int] | None = None, kv_cache_dtype: str | None = None) -> list[Generation]:
    run = DenseRun(params, config, prompts, sampling, rng, eos_token_ids, kv_cache_dtype)
    while not run.done:
        run.step()
    return run.outputs
