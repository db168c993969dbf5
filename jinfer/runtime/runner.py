"""The runner: device state and the compiled step functions of the engine.

It owns the params, the paged KV cache and the per-slot state (the last token each slot sampled, its
penalty counts), all on the device. `dispatch(plan)` pads a StepPlan's inputs to its bucket and launches
the one jitted step for that shape with them and the attention backend's metadata, both pytrees (state
donated, so XLA updates the cache in place); it returns at once with device arrays, and `fetch()` later
brings the sampled tokens to the host. `import_kv` writes K/V computed elsewhere (a long prompt's
ring-attention prefill) into a request's pages before its first step.

The compiled set (`all_shapes`), named by `StepShape`: one decode block per EngineConfig.decode_buckets entry
(R rows, one token each, up to decode_steps steps), one prefill step per token_buckets entry (T tokens,
max_slots rows, chunks of up to min(T, max_prefill_chunk) tokens) and, with speculative decoding, one verify
step per decode bucket (R rows of k + 1 tokens; `jinfer.runtime.spec.verify`); on the GPU, each decode, prefill
and verify shape also as a greedy and a sampled step without runtime branches (`StepShape.plain`; with
speculation, plain decode blocks also of one step). `warmup()` compiles all of them, and
`num_compilations` counts traces so a test can prove serving never compiles again.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.attention.backend import AttentionBackend, paged_kv_cache
from jinfer.engine.config import EngineConfig
from jinfer.engine.step_plan import (
    ROW_PADDING,
    TOKEN_PADDING,
    RowInputs,
    SamplingInputs,
    StepInputs,
    StepPlan,
    TokenInputs,
)
from jinfer.grammar.params import mask_words
from jinfer.inputs import MAX_LOGIT_BIAS
from jinfer.models import llama
from jinfer.models.config import ModelConfig
from jinfer.quant.kv import store_kv
from jinfer.quant.params import cast_params, quantize_params
from jinfer.runtime.matmul import kernel_layout, kernel_matmul
from jinfer.runtime.ops import model_ops
from jinfer.runtime.spec.drafters import Drafter, DraftModel, DraftModelDrafter, EarlyExitDrafter
from jinfer.runtime.spec.verify import verify_step
from jinfer.runtime.step import SlotState, StepResult, decode_block, prefill_step

# The host engine defines the plan's groups as plain dataclasses (it never imports jax); registered here,
# every field a traced array, they cross the jit boundary as they are.
for _cls in (TokenInputs, RowInputs, SamplingInputs, StepInputs):
    jax.tree_util.register_dataclass(_cls)


class StepShape(NamedTuple):
    """One compiled step: `decode` block of `rows` rows (tokens == rows, width 1), a prefill step of
    `tokens` tokens over `rows` = max_slots rows with chunks of up to `width` tokens, or a `verify` step of
    `rows` rows of up to `width` = k + 1 tokens (tokens = rows x width). On the GPU the decode and prefill
    shapes come in three: the general step, and a `plain` greedy and sampled one for the steps that need no
    logit processor or logprobs (verify shapes too). A plain decode block runs exactly `steps` steps (a general
    one stops when its rows do): with speculation, each plain decode shape is also compiled with `steps` = 1,
    for the blocks of one token that follow a missed lookup."""

    decode: bool
    tokens: int
    rows: int
    width: int
    verify: bool = False
    plain: str | None = None  # "greedy" / "sampled": the step without runtime branches (StepPlan.plain_sampler)
    steps: int = 0  # a decode block's most steps (0: the engine's decode_steps)


@dataclasses.dataclass
class StepOutput:
    """Device arrays of one dispatched step; `fetch` copies what the host needs."""

    result: StepResult  # N steps x R rows
    want_logprobs: bool
    want_prompt_logprobs: bool = False

    def fetch(self):
        """(tokens i32[N, R], (logprob, top ids, top logprobs) or None, (prompt logprob, rank, top ids, top
        logprobs) per token or None): only what the plan asked for leaves the device."""
        r = self.result
        lp = plp = None
        if self.want_logprobs:
            lp = tuple(jax.device_get((r.logprob, r.top_ids, r.top_logprobs)))
        if self.want_prompt_logprobs:
            plp = tuple(jax.device_get(_prompt_fields(r)))
        return np.asarray(r.tokens), lp, plp


def _prompt_fields(r: StepResult) -> tuple:
    return r.prompt_logprob, r.prompt_rank, r.prompt_top_ids, r.prompt_top_logprobs


def _import_impl(kv, k, v, page, offset):
    """k, v: [L, m, K, H]; page, offset: i32[m] (padding rows hold an out-of-range page, which the scatter
    drops). Quantized pages quantize them as a step's write does (`store_kv`)."""
    k_pages, v_pages = kv
    # Pages are [L, K, P, page_size, H]; the two index arrays side by side put n where they stand: [L, K, n, H].
    index = (slice(None), slice(None), page, offset)
    k_pages = store_kv(k_pages, index, jnp.swapaxes(k, 1, 2), mode="drop")
    v_pages = store_kv(v_pages, index, jnp.swapaxes(v, 1, 2), mode="drop")
    return k_pages, v_pages


def _seed_impl(state: SlotState, slot, tokens, is_output) -> SlotState:
    """The penalty state of a slot's new occupant whose leading tokens (i32[max_model_len], padded with the
    out-of-range id V, which the scatters drop) the step will not compute."""
    counts = state.output_counts.at[slot].set(0).at[slot, tokens].add(is_output.astype(jnp.int32), mode="drop")
    mask = state.prompt_mask.at[slot].set(False).at[slot, tokens].max(~is_output, mode="drop")
    return dataclasses.replace(state, output_counts=counts, prompt_mask=mask)


def _bias_impl(state: SlotState, slot, ids, values) -> SlotState:
    """The logit bias of a slot's new occupant: ids i32[MAX_LOGIT_BIAS] (padded with the out-of-range id V,
    which the scatter drops), values f32[MAX_LOGIT_BIAS]."""
    bias = state.logit_bias.at[slot].set(0.0).at[slot, ids].set(values, mode="drop")
    return dataclasses.replace(state, logit_bias=bias)


def _bucket(n: int, buckets: tuple[int, ...], what: str, field: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} {what} exceed the largest of EngineConfig.{field}={buckets}")


def prepare_weights(params, engine_config: EngineConfig, ops: llama.ModelOps, fuse: bool):
    """The checkpoint's params as the runner's steps read them, before the cast to the engine's dtype: with `fuse`
    (`ops.fuse`, one GPU) the products that share an input fused (five products a layer become two), quantized as
    configured from the checkpoint's own precision, then their norm gains folded in where `ops` reduce the norm
    factor themselves (`llama.fold_norms`: into a float weight's numbers, a quantized one's input scale)."""
    if fuse:
        params = llama.fuse_projections(params)
    if engine_config.quantization not in (None, "gguf"):  # "gguf": the loader kept the file's blocks
        params = quantize_params(params, llama.MATMUL_INPUT_AXES | llama.FUSED_INPUT_AXES, engine_config.quantization,
                                 engine_config.quantization_group_size)
    if fuse and ops.fold_norms:
        params = llama.fold_norms(params)
    return params


class Runner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, params, num_pages: int,
                 attention_backend: AttentionBackend | None = None, devices=None, drafter: Drafter | None = None,
                 draft_model: tuple[ModelConfig, dict] | None = None):
        """`drafter`: the device proposer of a speculative config (default: the one its method names; host
        proposers need none); `draft_model`: (config, params) of the draft for method "draft"."""
        from jinfer.attention.select import default_backend
        from jinfer.attention.sharded import shard_over_heads
        from jinfer.runtime import sharding

        if not engine_config.resolved:
            raise ValueError("the Runner needs a resolved EngineConfig (EngineConfig.resolve(platform))")
        self.model_config = model_config
        self.config = engine_config
        dtype = jnp.dtype(engine_config.dtype)
        # The default device, or a (model=tensor_parallel) mesh over `devices` (default: this host's), whose
        # shardings jit propagates through the step.
        tp = engine_config.tensor_parallel
        self.mesh = sharding.make_mesh(model=tp, devices=devices) if tp > 1 or devices is not None else None
        platform = jax.devices()[0].platform
        self.ops = model_ops(platform, 1 if self.mesh is None else self.mesh.size)
        params = prepare_weights(params, engine_config, self.ops, fuse=self.mesh is None and self.ops.fuse)
        if self.mesh is None:
            self.params = cast_params(params, dtype)
        else:  # each device receives its shard only, then casts it
            self.params = cast_params(sharding.shard_params(params, model_config, self.mesh), dtype)
        self.max_model_len = engine_config.context_len(model_config.max_position_embeddings)
        self.max_pages_per_seq = -(-self.max_model_len // engine_config.page_size)
        c, S = model_config, engine_config.max_slots
        self.attention = shard_over_heads(
            attention_backend or default_backend(c.num_kv_heads, c.num_heads, S, engine_config.page_size), self.mesh,
            c.num_kv_heads)
        if self.ops.matmul is kernel_matmul:
            self.params = kernel_layout(self.params, jax.devices()[0].device_kind)
        if engine_config.per_layer_weights or self.ops.unroll:
            self.params = llama.unstack_layers(self.params)
        # The GPU reads each runtime branch's predicate on the host (a round trip that also holds the host
        # until the step ends); the CPU and TPU do not. There, steps that need no branch compile without any.
        self.plain_steps = platform == "gpu"
        kv_shape = (c.num_layers, num_pages, engine_config.page_size, c.num_kv_heads, c.head_dim)

        def make_state():
            return paged_kv_cache(*kv_shape, dtype, engine_config.kv_cache_dtype), SlotState.zeros(S, c.vocab_size)

        out_shardings = None
        if self.mesh is not None:
            # Pinned, so the donated state comes back as it went in (no recompile), and created in place: the
            # KV pool is never whole on one device. A quantized pool's values and scales split alike.
            pool = jax.eval_shape(make_state)[0]
            kv = jax.tree_util.tree_map(lambda x: sharding.kv_cache_sharding(x.shape, self.mesh), pool)
            rep = sharding.replicated(self.mesh)
            out_shardings = (kv, rep, rep)
            make_state = jax.jit(make_state, out_shardings=out_shardings[:2])
        state = make_state()
        if self.mesh is None:
            # Committed to the device from the start: a K/V import (placed there explicitly) would otherwise
            # turn uncommitted state into committed, and every jitted function would compile once more.
            state = jax.device_put(state, jax.local_devices()[0])
        self.kv, self.state = state
        self.num_compilations = 0
        spec = engine_config.speculative
        self.draft_params = self.draft_kv = None
        if drafter is None and spec is not None and spec.method == "early_exit":
            drafter = EarlyExitDrafter(spec.draft_layers(model_config.num_layers))
        if drafter is None and spec is not None and spec.method == "draft":
            drafter = self._init_draft(draft_model, num_pages, dtype)
        self.drafter = drafter
        if out_shardings is not None:
            out_shardings = (*out_shardings[:2], None, out_shardings[2])  # no draft pool with a mesh
        self._step = jax.jit(self._step_impl, static_argnames=("shape",), donate_argnums=(1, 2, 4),
                             out_shardings=out_shardings)
        self._import = jax.jit(_import_impl, donate_argnums=(0,),
                               out_shardings=None if out_shardings is None else out_shardings[0])
        self._seed = jax.jit(_seed_impl, donate_argnums=(0,),
                             out_shardings=None if out_shardings is None else out_shardings[1])
        self._bias = jax.jit(_bias_impl, donate_argnums=(0,),
                             out_shardings=None if out_shardings is None else out_shardings[1])

    def _init_draft(self, draft_model, num_pages: int, dtype) -> DraftModelDrafter:
        """The draft model's params and its KV pool: as many pages as the target's, of the same size."""
        from jinfer.attention.select import default_backend

        if draft_model is None:
            raise ValueError("speculative_config method 'draft' needs the draft model (Runner(draft_model=...))")
        if self.mesh is not None:
            raise ValueError("speculative_config method 'draft' runs on one device; with tensor_parallel > 1 use "
                             "'early_exit' or 'ngram'")
        dc, dparams = draft_model
        if dc.vocab_size != self.model_config.vocab_size:
            raise ValueError(f"speculative_config.model has a vocabulary of {dc.vocab_size} tokens; the target's "
                             f"has {self.model_config.vocab_size}: a draft must share the target's vocabulary")
        cfg = self.config
        dparams = cast_params(dparams, dtype)
        if self.ops.matmul is kernel_matmul:
            dparams = kernel_layout(dparams, jax.devices()[0].device_kind)
        if cfg.per_layer_weights or self.ops.unroll:
            dparams = llama.unstack_layers(dparams)
        kv = paged_kv_cache(dc.num_layers, num_pages, cfg.page_size, dc.num_kv_heads, dc.head_dim, dtype,
                            cfg.kv_cache_dtype)
        self.draft_params, self.draft_kv = jax.device_put((dparams, kv), jax.local_devices()[0])
        return DraftModelDrafter(dc, default_backend(dc.num_kv_heads, dc.num_heads, cfg.max_slots, cfg.page_size))

    # ---- shapes --------------------------------------------------------------------------------

    def shape_for(self, plan: StepPlan) -> StepShape:
        cfg = self.config
        plain = plan.plain_sampler if self.plain_steps else None
        if plan.verify:
            rows = _bucket(plan.num_rows, cfg.decode_buckets, "rows of a verify step", "decode_buckets")
            W = cfg.speculative.num_speculative_tokens + 1
            return StepShape(False, rows * W, rows, W, verify=True, plain=plain)
        if plan.decode:
            rows = _bucket(plan.num_rows, cfg.decode_buckets, "rows of a decode block", "decode_buckets")
            # A plain block computes all its steps: one that feeds a single token has a shape of its own.
            steps = 1 if plain and cfg.speculative is not None and plan.max_steps == 1 else 0
            return StepShape(True, rows, rows, 1, plain=plain, steps=steps)
        tokens = _bucket(plan.num_tokens, cfg.token_buckets, "tokens of a step", "token_buckets")
        return StepShape(False, tokens, cfg.max_slots, min(tokens, cfg.max_prefill_chunk), plain=plain)

    def all_shapes(self) -> list[StepShape]:
        cfg = self.config
        shapes = ([StepShape(True, r, r, 1) for r in cfg.decode_buckets]
                  + [StepShape(False, t, cfg.max_slots, min(t, cfg.max_prefill_chunk)) for t in cfg.token_buckets])
        if cfg.speculative is not None:
            W = cfg.speculative.num_speculative_tokens + 1
            shapes += [StepShape(False, r * W, r, W, verify=True) for r in cfg.decode_buckets]
        if self.plain_steps:
            shapes += [s._replace(plain=p) for p in ("greedy", "sampled") for s in list(shapes)]
            if cfg.speculative is not None:
                shapes += [s._replace(steps=1) for s in shapes if s.plain and s.decode]
        return shapes

    # ---- the step ------------------------------------------------------------------------------

    def _step_impl(self, params, kv, state, draft_params, draft_kv, inputs: StepInputs, attn_meta, *,
                   shape: StepShape):
        """-> (kv, state, draft_kv, StepResult)."""
        self.num_compilations += 1  # runs only while tracing, i.e. once per compiled shape
        attn_meta, draft_meta = attn_meta
        draft = None if draft_params is None else DraftModel(draft_params, draft_kv)
        # A drafter that keeps no cache of its own has nothing to do outside verify steps.
        follows = isinstance(self.drafter, DraftModelDrafter)
        kw = dict(config=self.model_config, backend=self.attention, max_logprobs=self.config.max_logprobs,
                  ops=self.ops)
        if shape.verify:
            step = verify_step(params, kv, state, inputs, attn_meta, width=shape.width, drafter=self.drafter,
                               draft=draft, draft_meta=draft_meta, plain=shape.plain, **kw)
        else:
            if follows:
                kw.update(drafter=self.drafter, draft=draft, draft_meta=draft_meta)
            if shape.decode:
                step = decode_block(params, kv, state, inputs, attn_meta, max_steps=shape.steps or self.config.decode_steps,
                                    plain=shape.plain, **kw)
            else:
                step = prefill_step(params, kv, state, inputs, attn_meta, width=shape.width, plain=shape.plain, **kw)
        kv, state, out, draft = step
        return kv, state, None if draft is None else draft.kv, out

    def _step_inputs(self, plan: StepPlan, shape: StepShape):
        """(the plan's StepInputs padded to `shape`; the attention backend's metadata)."""
        inputs = plan.inputs()
        pad_t = shape.tokens - plan.num_tokens
        pad_r = shape.rows - plan.num_rows

        def pad_tokens(name, a):
            return np.concatenate([a, np.full(pad_t, TOKEN_PADDING.get(name, 0), a.dtype)])

        tokens = TokenInputs(**{f.name: pad_tokens(f.name, getattr(inputs.tokens, f.name))
                                for f in dataclasses.fields(TokenInputs)})

        def pad_rows(name, a):
            fill = self.config.max_slots if name == "slot" else ROW_PADDING.get(name, 0)
            return np.concatenate([a, np.full((pad_r, *a.shape[1:]), fill, a.dtype)])

        rows = RowInputs(**{f.name: pad_rows(f.name, getattr(inputs.rows, f.name))
                            for f in dataclasses.fields(RowInputs)})
        sampling = SamplingInputs(**{k: np.concatenate([getattr(inputs.sampling, k),
                                                        np.full(pad_r, SamplingInputs.NEUTRAL[k], t)])
                                     for k, t in SamplingInputs.DTYPES.items()})
        attn_meta = self.attention.step_metadata(rows.query_start, rows.query_len, shape.tokens, shape.width)
        # The drafter's: of its one-token steps in a verify step, or a draft model's of this step's layout.
        draft_backend = self.drafter.backend if isinstance(self.drafter, DraftModelDrafter) else self.attention
        draft_meta = None
        if shape.verify:
            R = shape.rows
            draft_meta = draft_backend.step_metadata(np.arange(R, dtype=np.int32), np.ones(R, np.int32), R, 1)
        elif isinstance(self.drafter, DraftModelDrafter):
            draft_meta = draft_backend.step_metadata(rows.query_start, rows.query_len, shape.tokens, shape.width)
        return StepInputs(tokens, rows, sampling), (attn_meta, draft_meta)

    def _launch(self, plan: StepPlan, shape: StepShape) -> StepResult:
        inputs, attn_meta = self._step_inputs(plan, shape)
        self.kv, self.state, self.draft_kv, out = self._step(self.params, self.kv, self.state, self.draft_params,
                                                             self.draft_kv, inputs, attn_meta, shape=shape)
        return out

    def lowered(self, shape: StepShape, stop_width: int):
        """One step shape traced and lowered, not compiled (`stop_width` as for `warmup`)."""
        empty = StepPlan.empty(self.max_pages_per_seq, stop_width, mask_words(self.model_config.vocab_size),
                               decode=shape.decode, verify=shape.verify)
        inputs, attn_meta = self._step_inputs(empty, shape)
        return self._step.lower(self.params, self.kv, self.state, self.draft_params, self.draft_kv, inputs, attn_meta,
                                shape=shape)

    def compiled_text(self, shape: StepShape, stop_width: int) -> str:
        """The optimized HLO of one step shape (for profiles; it compiles the step once more)."""
        return self.lowered(shape, stop_width).compile().as_text()

    def dispatch(self, plan: StepPlan) -> StepOutput:
        out = self._launch(plan, self.shape_for(plan))
        want, want_prompt = plan.wants_logprobs, plan.wants_prompt_logprobs
        copies = [out.tokens]
        if want:
            copies += [out.logprob, out.top_ids, out.top_logprobs]
        if want_prompt:
            copies += _prompt_fields(out)
        for x in copies:
            x.copy_to_host_async()  # the host reads them next step: start the copy as soon as they exist
        return StepOutput(out, want_logprobs=want, want_prompt_logprobs=want_prompt)

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
        page = np.full(m, self.kv[0].shape[2], np.int32)  # i32[m]: past the pool, dropped (QuantizedKV too)
        page[:n] = np.asarray(pages, np.int32)[pos // ps]
        offset = np.zeros(m, np.int32)
        offset[:n] = pos % ps
        if self.mesh is None:
            target = jax.tree_util.tree_leaves(self.kv)[0].sharding
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
        self.state = self._seed(self.state, np.int32(slot), ids, is_output)

    def set_logit_bias(self, slot: int, bias: tuple[tuple[int, float], ...]) -> None:
        """The logit bias ((token id, bias) pairs) of the request now in `slot`."""
        ids = np.full(MAX_LOGIT_BIAS, self.model_config.vocab_size, np.int32)
        values = np.zeros(MAX_LOGIT_BIAS, np.float32)
        if bias:
            ids[:len(bias)], values[:len(bias)] = zip(*bias)
        self.state = self._bias(self.state, np.int32(slot), ids, values)

    def warmup(self, stop_width: int) -> None:
        """Compiles every step shape with an all-padding plan, which touches no page (`stop_width`: the
        scheduler's RowInputs.stop_ids width)."""
        for shape in self.all_shapes():
            self._launch(StepPlan.empty(self.max_pages_per_seq, stop_width, mask_words(self.model_config.vocab_size),
                               decode=shape.decode, verify=shape.verify),
                         shape)
        self.seed_penalty_state(0, [], 0)  # no occupant yet: leaves slot 0 cleared
        self.set_logit_bias(0, ())
        jax.block_until_ready((self.kv, self.state))
