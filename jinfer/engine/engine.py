"""The engine: continuous batching of many requests over one model, one step at a time (host side, no jax).

`add_request` takes a request checked at the edge (`jinfer.inputs`) and queues it; each `step()` asks the
scheduler for a plan, hands it to the runner (the device side: `jinfer.runtime.runner.Runner`, or any
object with its `dispatch` / `import_kv` / `seed_penalty_state` / `warmup`), and only then reads the
previous step's tokens (so the device runs step N+1 while the host detokenizes step N), updates the
scheduler, and returns one `StepEvent` per request that progressed: one token, or up to
`EngineConfig.decode_steps` from a decode block. `jinfer.runtime.make_engine` builds an
engine with its runner from a model's params.

A request may bring a `prefill`: a callable that computes the K/V of all its prompt tokens but the last
outside the engine's steps (`jinfer.runtime.long_prompt.RingPrefill`: ring attention over a mesh, for
prompts too long for one device). The engine keeps those K/V until the scheduler admits the request, writes
them into its pages, and the request continues as any other (its first step computes the last prompt token).
"""

from __future__ import annotations

import dataclasses
import itertools
from time import perf_counter
from typing import Callable

import numpy as np

from jinfer.engine.config import EngineConfig
from jinfer.engine.output_stream import OutputStream
from jinfer.engine.outputs import RequestOutput
from jinfer.engine.request import Request
from jinfer.engine.scheduler import Scheduler
from jinfer.inputs import CheckedRequest, InputChecker, PromptInput, SamplingParams
from jinfer.models.config import ModelConfig

# n prompt token ids -> (k, v), each [L, m, K, H] device arrays with m >= n: rows past n are padding (a
# bucket, so that the callable and the runner's import compile per bucket, not per prompt length)
PrefixPrefill = Callable[[list[int]], tuple[object, object]]


@dataclasses.dataclass
class StepEvent:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    output: RequestOutput  # cumulative; finish_reason set once finished


@dataclasses.dataclass(frozen=True)
class EngineLoad:
    waiting: int
    running: int
    pages_used: int  # held by requests
    pages_cached: int  # free but holding a cached prefix
    pages_total: int  # usable pages (page 0 is reserved)
    prefix_queried_tokens: int
    prefix_hit_tokens: int

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    def __add__(self, other: "EngineLoad") -> "EngineLoad":  # replicas' loads add up field by field
        return EngineLoad(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


def _uses_penalties(sp: SamplingParams) -> bool:
    return sp.repetition_penalty != 1 or sp.presence_penalty != 0 or sp.frequency_penalty != 0


class Engine:
    """`runner`: the device side, built for `num_pages` KV pages and this config's slots and context.
    `tokenizer` may be None (token ids in and out, no text), as for random-weight benchmarks."""

    def __init__(self, model_config: ModelConfig, runner, tokenizer, engine_config: EngineConfig, num_pages: int,
                 seed: int | None = None):
        if not engine_config.resolved:
            raise ValueError("the Engine needs a resolved EngineConfig (EngineConfig.resolve(platform))")
        self.config = engine_config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.max_model_len = engine_config.context_len(model_config.max_position_embeddings)
        self.num_pages = num_pages
        tok_eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.eos_token_ids = tuple(sorted(set(model_config.eos_token_ids) | set(tok_eos)))
        self.scheduler = Scheduler(self.config, self.max_model_len, num_pages, self.eos_token_ids,
                                   model_config.vocab_size)
        self.inputs = InputChecker(vocab_size=model_config.vocab_size, max_model_len=self.max_model_len,
                                   max_logprobs=engine_config.max_logprobs,
                                   usable_pages=self.scheduler.allocator.usable_pages,
                                   page_size=engine_config.page_size, tokenizer=tokenizer,
                                   eos_token_ids=self.eos_token_ids)
        self.runner = runner
        self._inflight = None  # (plan, StepOutput, when it was dispatched) dispatched but not yet read
        self._last_done = 0.0  # when the latest collected step's tokens reached the host
        self._imports: dict[str, tuple[object, object]] = {}  # request id -> prefix K/V awaiting admission
        self._streams: dict[str, OutputStream] = {}
        self._ids = itertools.count()
        self._rng = np.random.default_rng(seed)
        self.warmed_up = False

    def warmup(self) -> None:
        self.runner.warmup(self.scheduler.stop_width)
        self.warmed_up = True

    # ---- requests ------------------------------------------------------------------------------

    def add_request(self, prompt: PromptInput | CheckedRequest, sampling: SamplingParams | None = None,
                    request_id: str | None = None, prefill: PrefixPrefill | None = None,
                    same_prompt_as: str | None = None) -> str:
        """Queues a request: a CheckedRequest from `self.inputs` (trusted as it is), or a prompt (text or
        token ids) and sampling, which are checked here. `prefill`, if given, computes the K/V of every
        prompt token but the last (it is called here; its device work runs asynchronously). `same_prompt_as`:
        the id of a request just added with the same prompt (another of its n completions): this one waits
        until that one's prompt is computed and reads its KV pages from the prefix cache."""
        if isinstance(prompt, CheckedRequest):
            if sampling is not None:
                raise ValueError("sampling is part of a CheckedRequest; pass it to InputChecker.request")
            checked = prompt
        else:
            checked = self.inputs.request(prompt, sampling)
        ids, sampling = list(checked.prompt.ids), checked.sampling
        if sampling.n != 1:
            raise ValueError(f"sampling.n={sampling.n}: the engine runs one completion per request; add n requests "
                             "(LLM.generate and the servers do, sharing the prompt's KV pages)")
        grammar = checked.grammar
        if grammar is None and sampling.structured_outputs is not None:
            grammar = self.inputs.grammar(sampling, "sampling")
        matcher = self.inputs.grammars.matcher(grammar) if grammar is not None else None
        if prefill is not None and sampling.prompt_logprobs is not None:
            raise ValueError("sampling.prompt_logprobs cannot be given for a request whose prompt is prefilled "
                             "outside the engine (its logits never reach the engine's steps)")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        seed = sampling.seed if sampling.seed is not None else int(self._rng.integers(0, 2**32))
        num_imported = len(ids) - 1 if prefill is not None else 0
        parent = self.scheduler.requests.get(same_prompt_as) if same_prompt_as is not None else None
        if parent is not None and parent.prompt_ids != ids:
            raise ValueError(f"same_prompt_as={same_prompt_as!r} names a request with another prompt")
        req = self.scheduler.add(request_id, ids, sampling, seed, num_imported, grammar=matcher, parent=parent)
        if num_imported:
            try:
                k, v = prefill(ids[:num_imported])
                self._check_imported(k, v, num_imported)
            except BaseException:
                self.scheduler.finish(req, "cancelled")
                raise
            self._imports[request_id] = (k, v)
        self._streams[request_id] = OutputStream(request_id, checked, req.arrival_time, self.tokenizer)
        return request_id

    def _check_imported(self, k, v, n: int) -> None:
        c = self.model_config
        L, K, H = c.num_layers, c.num_kv_heads, c.head_dim

        def ok(x):
            return x.ndim == 4 and x.shape[1] >= n and (x.shape[0], *x.shape[2:]) == (L, K, H)

        if not ok(k) or not ok(v) or k.shape != v.shape:
            raise ValueError(f"prefill returned K/V of shapes k={tuple(k.shape)}, v={tuple(v.shape)}; expected "
                             f"[L, m, K, H] with L, K, H = {L}, {K}, {H} and m >= {n}, the tokens it was given")

    def cancel(self, request_id: str) -> bool:
        """Ends a request at once; its slot and pages return to the pool before the next step."""
        stream = self._streams.pop(request_id, None)
        self._imports.pop(request_id, None)
        found = self.scheduler.cancel(request_id)
        if stream is not None:
            stream.output.finish_reason = "cancelled"
        return found

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._inflight is not None

    def load(self) -> EngineLoad:
        """Queue and KV-pool occupancy now (for metrics and admission; call it on the engine's thread)."""
        s, a = self.scheduler, self.scheduler.allocator
        cached = s.prefix_cache.num_evictable
        st = s.prefix_cache.stats
        return EngineLoad(waiting=len(s.waiting), running=len(s.running), pages_used=a.usable_pages - a.num_free - cached,
                          pages_cached=cached, pages_total=a.usable_pages, prefix_queried_tokens=st.queried_tokens,
                          prefix_hit_tokens=st.hit_tokens)

    # ---- the loop ------------------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        synced: list[StepEvent] = []
        if self._inflight is not None and self.scheduler.needs_sync(self._inflight[0]):
            synced = self._collect(*self._inflight)  # speculation: the next plan needs these tokens first
            self._inflight = None
        plan = self.scheduler.schedule()
        launched = None
        if plan is not None:
            for item in plan.scheduled:
                req = item.request
                if item.num_imported:
                    k, v = self._imports.pop(req.request_id)
                    self.runner.import_kv(k, v, req.pages, item.slot, item.num_imported)
                if req.sampling.logit_bias and (item.num_precomputed or plan.rows.reset[item.row]):
                    self.runner.set_logit_bias(item.slot, req.sampling.logit_bias)  # a new occupant of the slot
                if item.num_precomputed and _uses_penalties(req.sampling):
                    # Penalties count the whole sequence, also the tokens whose K/V the step does not
                    # compute (a cached prefix, imported K/V).
                    self.runner.seed_penalty_state(item.slot, req.known_ids()[:item.num_precomputed],
                                                   len(req.prompt_ids))
            start = perf_counter()
            launched = (plan, self.runner.dispatch(plan), start)
        events: list[StepEvent] = []
        if self._inflight is not None:
            events = self._collect(*self._inflight)
        self._inflight = launched
        return synced + events

    def _collect(self, plan, out, dispatched: float) -> list[StepEvent]:
        """Reads a dispatched step's tokens and records them (the scheduler's `update`), and how long the step
        took from when the device could start it (its dispatch, or the previous step's end) until now."""
        sampled, lp, plp = out.fetch()
        done = perf_counter()
        self.scheduler.observe_step(plan, done - max(dispatched, self._last_done))
        self._last_done = done
        seen = {r.request_id: len(r.output_ids) for r in (s.request for s in plan.scheduled)}
        touched = self.scheduler.update(plan, sampled, self._logprob_reader(lp), self._prompt_logprob_reader(plp))
        return [e for e in (self._emit(r, seen[r.request_id]) for r in touched) if e is not None]

    def _logprob_reader(self, lp):
        if lp is None:
            return None
        chosen, ids, vals = lp

        def read(step: int, row: int) -> tuple:
            return float(chosen[step, row]), ids[step, row], vals[step, row]

        return read

    def _prompt_logprob_reader(self, plp):
        if plp is None:
            return None
        chosen, rank, ids, vals = plp

        def read(t: int) -> tuple:
            return float(chosen[t]), int(rank[t]), ids[t], vals[t]

        return read

    def _emit(self, req: Request, had: int) -> StepEvent | None:
        """The event of a request that received output tokens had.. (up to a stop string among them)."""
        stream = self._streams.get(req.request_id)
        if stream is None:
            return None
        delta, new = "", []
        for i in range(had, len(req.output_ids)):
            new.append(req.output_ids[i])
            delta += stream.add_token(req, i)
            if stream.stopped:
                if not req.finished:
                    self.scheduler.finish(req, "stop")
                # Tokens a decode block sampled past the stop string are not the request's.
                del req.output_ids[i + 1:], req.token_times[i + 1:], req.logprobs[i + 1:]
                break
        if req.finished:
            delta += stream.finish(req)
            del self._streams[req.request_id]
        stream.output.text += delta
        return StepEvent(req.request_id, new, delta, stream.output)

    def run_until_done(self) -> None:
        while self.has_work:
            self.step()
