"""The runner: device state and the compiled step functions of the engine.

It owns the params, the paged KV cache, the last token each slot sampled, and the per-slot penalty
counts, all on the device. `dispatch(plan)` pads a StepPlan's inputs to its bucket and launches the one
jitted step for that bucket with them and the attention backend's metadata, both pytrees (state donated,
so XLA updates the cache in place); it returns at once with device arrays, and `fetch()` later brings the
sampled tokens to the host. `import_kv` writes K/V computed elsewhere (a long prompt's ring-attention
prefill) into a request's pages before its first step.

Buckets: token counts pad up to one of EngineConfig.token_buckets; the query width per slot is 1 for
decode-only steps and min(bucket, max_prefill_chunk) otherwise. `warmup()` compiles all of them, and
`num_compilations` counts traces so a test can prove serving never compiles again.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.attention.backend import AttentionBackend, PagedMeta, make_paged_attention, paged_kv_cache
from jinfer.engine.config import EngineConfig
from jinfer.engine.step_plan import SamplingInputs, SlotInputs, StepInputs, StepPlan, TokenInputs
from jinfer.models import llama
from jinfer.models.config import ModelConfig
from jinfer.runtime.sampler import apply_penalties, sample, step_keys

# The host engine defines the plan's groups as plain dataclasses (it never imports jax); registered here,
# every field a traced array, they cross the jit boundary as they are.
for _cls in (TokenInputs, SlotInputs, SamplingInputs, StepInputs):
    jax.tree_util.register_dataclass(_cls)


@dataclasses.dataclass
class StepOutput:
    """Device arrays of one dispatched step; `fetch` copies what the host needs."""

    sampled: jax.Array  # i32[S]
    logprob: jax.Array  # f32[S]: of the sampled token
    top_ids: jax.Array  # i32[S, max_logprobs]
    top_logprobs: jax.Array  # f32[S, max_logprobs]
    want_logprobs: bool

    def fetch(self):
        if not self.want_logprobs:
            return np.asarray(self.sampled), None
        sampled, lp, ids, lps = jax.device_get((self.sampled, self.logprob, self.top_ids, self.top_logprobs))
        return sampled, (lp, ids, lps)


def _initial_state(c: ModelConfig, S: int, num_pages: int, page_size: int, dtype):
    """(KV pages, last sampled token i32[S], output token counts i32[S, V], prompt token mask bool[S, V])."""
    kv = paged_kv_cache(c.num_layers, num_pages, page_size, c.num_kv_heads, c.head_dim, dtype)
    return kv, jnp.zeros(S, jnp.int32), jnp.zeros((S, c.vocab_size), jnp.int32), jnp.zeros((S, c.vocab_size), bool)


def _import_impl(kv, k, v, page, offset):
    """k, v: [L, m, K, H]; page, offset: i32[m] (padding rows hold an out-of-range page, which the scatter
    drops)."""
    k_pages, v_pages = kv
    # Pages are [L, K, P, page_size, H]; the two index arrays side by side put n where they stand: [L, K, n, H].
    k_pages = k_pages.at[:, :, page, offset].set(jnp.swapaxes(k, 1, 2).astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[:, :, page, offset].set(jnp.swapaxes(v, 1, 2).astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages


def _seed_impl(output_counts, prompt_mask, slot, tokens, is_output):
    """The penalty state of a slot's new occupant whose leading tokens (i32[max_model_len], padded with the
    out-of-range id V, which the scatters drop) the step will not compute."""
    output_counts = output_counts.at[slot].set(0).at[slot, tokens].add(is_output.astype(jnp.int32), mode="drop")
    prompt_mask = prompt_mask.at[slot].set(False).at[slot, tokens].max(~is_output, mode="drop")
    return output_counts, prompt_mask


class Runner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, params, num_pages: int,
                 attention_backend: AttentionBackend | None = None, devices=None):
        from jinfer.attention.select import default_backend
        from jinfer.runtime import sharding

        self.model_config = model_config
        self.config = engine_config
        dtype = jnp.dtype(engine_config.dtype)
        # The default device, or a (model=tensor_parallel) mesh over `devices` (default: this host's), whose
        # shardings jit propagates through the step.
        tp = engine_config.tensor_parallel
        self.mesh = sharding.make_mesh(model=tp, devices=devices) if tp > 1 or devices is not None else None
        if self.mesh is None:
            self.params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
        else:  # each device receives its shard only, then casts it
            self.params = jax.tree_util.tree_map(lambda x: x.astype(dtype),
                                                 sharding.shard_params(params, model_config, self.mesh))
        self.max_model_len = engine_config.context_len(model_config.max_position_embeddings)
        self.max_pages_per_seq = -(-self.max_model_len // engine_config.page_size)
        c, S = model_config, engine_config.max_slots
        self.attention = attention_backend or default_backend(c.num_kv_heads, c.num_heads, S, engine_config.page_size)
        make_state = functools.partial(_initial_state, c, S, num_pages, engine_config.page_size, dtype)
        out_shardings = None
        if self.mesh is not None:
            # Pinned, so the donated state comes back as it went in (no recompile), and created in place: the
            # KV pool is never whole on one device.
            kv = sharding.kv_cache_sharding((c.num_layers, c.num_kv_heads, num_pages, engine_config.page_size,
                                             c.head_dim), self.mesh)
            rep = sharding.replicated(self.mesh)
            out_shardings = ((kv, kv), rep, rep, rep, rep)
            make_state = jax.jit(make_state, out_shardings=out_shardings[:4])
        state = make_state()
        if self.mesh is None:
            # Committed to the device from the start: a K/V import (placed there explicitly) would otherwise
            # turn uncommitted state into committed, and every jitted function would compile once more.
            state = jax.device_put(state, jax.local_devices()[0])
        self.kv, self.last_sampled, self.output_counts, self.prompt_mask = state
        self.num_compilations = 0
        self._step = jax.jit(self._step_impl, static_argnames=("max_query_len",), donate_argnums=(1, 2, 3, 4),
                             out_shardings=out_shardings)
        self._import = jax.jit(_import_impl, donate_argnums=(0,),
                               out_shardings=None if out_shardings is None else out_shardings[0])
        self._seed = jax.jit(_seed_impl, donate_argnums=(0, 1),
                             out_shardings=None if out_shardings is None else out_shardings[2:4])

    # ---- shapes --------------------------------------------------------------------------------

    def bucket(self, num_tokens: int) -> int:
        for b in self.config.token_buckets:
            if num_tokens <= b:
                return b
        raise ValueError(f"a step of {num_tokens} tokens exceeds the largest bucket {self.config.token_buckets[-1]}")

    def query_width(self, bucket: int, max_query_len: int) -> int:
        return 1 if max_query_len <= 1 else min(bucket, self.config.max_prefill_chunk)

    def all_shapes(self) -> list[tuple[int, int]]:
        return sorted({(b, self.query_width(b, q)) for b in self.config.token_buckets for q in (1, 2)})

    # ---- the step ------------------------------------------------------------------------------

    def _step_impl(self, params, kv, last_sampled, output_counts, prompt_mask, inputs: StepInputs, attn_meta, *,
                   max_query_len):
        self.num_compilations += 1  # runs only while tracing, i.e. once per compiled shape
        c = self.model_config
        S = last_sampled.shape[0]
        tok, slots, sp = inputs.tokens, inputs.slots, inputs.sampling
        valid, slot = tok.valid, tok.slot
        tokens = jnp.where(tok.from_prev, last_sampled[slot], tok.ids)
        # Penalty state: a token counts once it enters the cache (prompt tokens, then each generated
        # token as it is fed back), so a recomputed (preempted) request rebuilds the same counts.
        reset = slots.reset[:, None]
        output_counts = jnp.where(reset, 0, output_counts)
        prompt_mask = jnp.where(reset, False, prompt_mask)
        out_tok = valid & tok.is_output
        output_counts = output_counts.at[slot, tokens].add(out_tok.astype(jnp.int32))
        prompt_mask = prompt_mask.at[slot, tokens].max(valid & ~tok.is_output)

        meta = PagedMeta(token_slot=slot, token_valid=valid, page_table=slots.page_table, kv_len=slots.kv_len,
                         query_start=slots.query_start, query_len=slots.query_len, backend=attn_meta)
        attention = make_paged_attention(max_query_len, self.attention)
        h, kv = llama.forward(params, tokens[None], tok.positions[None], kv, meta, config=c, attention=attention)
        last = jnp.maximum(slots.query_start + slots.query_len - 1, 0)
        logits = llama.logits_from_hidden(params, h[0, last], c)  # f32[S, V]

        logprobs = jax.nn.log_softmax(logits, axis=-1)
        penalized = apply_penalties(logits, output_counts, prompt_mask, sp.repetition_penalty, sp.presence_penalty,
                                    sp.frequency_penalty)
        keys = step_keys(sp.seed, slots.gen_index)
        new = sample(penalized, sp.temperature, sp.top_k, sp.top_p, keys, sp.min_p)
        last_sampled = jnp.where(slots.sample, new, last_sampled)
        n = self.config.max_logprobs
        top_lp, top_ids = jax.lax.top_k(logprobs, n) if n else (jnp.zeros((S, 0)), jnp.zeros((S, 0), jnp.int32))
        chosen = jnp.take_along_axis(logprobs, new[:, None], axis=-1)[:, 0]
        return kv, last_sampled, output_counts, prompt_mask, (new, chosen, top_ids, top_lp)

    def _step_inputs(self, plan: StepPlan, bucket: int, width: int):
        """(the plan's StepInputs, tokens padded to `bucket`; the attention backend's metadata)."""
        inputs = plan.inputs()
        pad = bucket - plan.num_tokens
        tokens = jax.tree_util.tree_map(lambda a: np.concatenate([a, np.zeros(pad, a.dtype)]), inputs.tokens)
        attn_meta = self.attention.step_metadata(plan.slots.query_start, plan.slots.query_len, bucket, width)
        return dataclasses.replace(inputs, tokens=tokens), attn_meta

    def _launch(self, plan: StepPlan, bucket: int, width: int):
        inputs, attn_meta = self._step_inputs(plan, bucket, width)
        self.kv, self.last_sampled, self.output_counts, self.prompt_mask, out = self._step(
            self.params, self.kv, self.last_sampled, self.output_counts, self.prompt_mask, inputs, attn_meta,
            max_query_len=width)
        return out

    def dispatch(self, plan: StepPlan, want_logprobs: bool = False) -> StepOutput:
        bucket = self.bucket(plan.num_tokens)
        return StepOutput(*self._launch(plan, bucket, self.query_width(bucket, plan.max_query_len)),
                          want_logprobs=want_logprobs)

    def import_kv(self, k, v, pages, slot: int, n: int) -> None:
        """Writes the K/V of positions 0..n-1 of the request now in `slot` (k, v: [L, m, K, H] with m >= n
        rows, on any devices; rows past n are a length bucket's padding) into its `pages` (enough for n
        tokens). The engine seeds the slot's penalty state separately (`seed_penalty_state`).

        Dispatched like a step (cache donated, no host sync), so it lands after the step in flight and
        before the next; one compile per distinct m."""
        c, ps = self.model_config, self.config.page_size
        m = k.shape[1] if k.ndim == 4 else -1
        want = (c.num_layers, m, c.num_kv_heads, c.head_dim)
        if m < n or tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"imported K/V have shapes k={tuple(k.shape)}, v={tuple(v.shape)}; expected "
                             f"[L, m, K, H] = {(want[0], f'm>={n}', *want[2:])}")
        if len(pages) * ps < n:
            raise ValueError(f"{len(pages)} pages of {ps} cannot hold {n} imported tokens")
        pos = np.arange(n)
        page = np.full(m, self.kv[0].shape[2], np.int32)  # i32[m]: past the pool, dropped
        page[:n] = np.asarray(pages, np.int32)[pos // ps]
        offset = np.zeros(m, np.int32)
        offset[:n] = pos % ps
        if self.mesh is None:
            target = self.kv[0].sharding
        else:
            from jinfer.runtime import sharding

            target = sharding.kv_import_sharding(want, self.mesh)
        k, v = jax.device_put((k, v), target)
        self.kv = self._import(self.kv, k, v, page, offset)

    def seed_penalty_state(self, slot: int, token_ids, num_prompt: int) -> None:
        """Sets the penalty state of the request now in `slot` to its first len(token_ids) tokens (the
        prompt's first `num_prompt`, then generated ones), whose KV came from the prefix cache or an import
        instead of from a step: a step counts only the tokens it computes."""
        n, V = len(token_ids), self.model_config.vocab_size
        ids = np.full(self.max_model_len, V, np.int32)
        ids[:n] = token_ids
        is_output = np.arange(self.max_model_len) >= num_prompt
        self.output_counts, self.prompt_mask = self._seed(self.output_counts, self.prompt_mask, np.int32(slot),
                                                          ids, is_output)

    def warmup(self) -> None:
        """Compiles every (bucket, query width) step with an all-padding plan, which touches no page."""
        empty = StepPlan.empty(self.config.max_slots, self.max_pages_per_seq)
        for bucket, width in self.all_shapes():
            self._launch(empty, bucket, width)
        self.seed_penalty_state(0, [], 0)  # no occupant yet: leaves slot 0 cleared
        jax.block_until_ready((self.kv, self.prompt_mask))
