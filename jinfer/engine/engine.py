"""The engine: continuous batching of many requests over one model, one step at a time.

`add_request` tokenizes and queues; each `step()` asks the scheduler for a plan, dispatches it on the
device, and only then reads the previous step's tokens (so the device runs step N+1 while the host
detokenizes step N), updates the scheduler, and returns one `StepEvent` per request that progressed.
Stop strings are matched here, on detokenized text; everything token-level lives in the scheduler.

A request may bring a `prefill`: a callable that computes the K/V of all its prompt tokens but the last
outside the engine's steps (`jinfer.runtime.long_prompt.RingPrefill`: ring attention over a mesh, for prompts too
long for one device). The engine keeps those K/V until the scheduler admits the request, writes them into
its pages, and the request continues as any other (its first step computes the last prompt token).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.models.config import ModelConfig
from jinfer.engine.config import EngineConfig
from jinfer.engine.outputs import RequestMetrics, RequestOutput, TokenLogprobs
from jinfer.engine.request import Request
from jinfer.runtime.runner import Runner
from jinfer.inputs import SamplingParams
from jinfer.engine.scheduler import Scheduler
from jinfer.engine.stop_strings import StopStringMatcher


# Computes the K/V of a prompt prefix outside the engine's steps: n token ids -> (k, v), each [L, n, K, H]
# in natural order, on any devices (jinfer.runtime.long_prompt.RingPrefill is one).
# n prompt token ids -> (k, v), each [L, m, K, H] with m >= n: rows past n are padding (a bucket, so that
# the callable and the runner's import compile per bucket, not per prompt length)
PrefixPrefill = Callable[[list[int]], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass
class StepEvent:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    output: RequestOutput  # cumulative; finish_reason set once finished


def resolve_num_pages(engine_config: EngineConfig, model_config: ModelConfig) -> int:
    if engine_config.num_pages is not None:
        return engine_config.num_pages
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return engine_config.cpu_default_pages
    c = model_config
    page_bytes = 2 * c.num_layers * engine_config.page_size * c.num_kv_heads * c.head_dim * jnp.dtype(engine_config.dtype).itemsize
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return max(2, int(free * engine_config.memory_fraction // page_bytes))


@dataclasses.dataclass(frozen=True)
class EngineLoad:
    waiting: int
    running: int
    pages_used: int  # held by requests
    pages_cached: int  # free but holding a cached prefix
    pages_total: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    def __add__(self, other: "EngineLoad") -> "EngineLoad":  # replicas' loads add up field by field
        return EngineLoad(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


@dataclasses.dataclass
class _Stream:
    """Per-request text state: incremental detokenizer, stop strings, the output being built."""

    detok: object
    stops: StopStringMatcher
    output: RequestOutput


class Engine:
    """`tokenizer` may be None (token ids in and out, no text), as for random-weight benchmarks.
    `devices`: where this engine's mesh lives (a data-parallel replica's share); default the first ones."""

    def __init__(self, model_config: ModelConfig, params, tokenizer, engine_config: EngineConfig | None = None,
                 attention_backend=None, seed: int | None = None, devices=None):
        self.config = engine_config or EngineConfig()
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.max_model_len = min(self.config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings)
        self.num_pages = resolve_num_pages(self.config, model_config)
        tok_eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.eos_token_ids = tuple(sorted(set(model_config.eos_token_ids) | set(tok_eos)))
        self.scheduler = Scheduler(self.config, self.max_model_len, self.num_pages, self.eos_token_ids)
        self.runner = Runner(model_config, self.config, params, self.num_pages, self.scheduler.max_pages_per_seq,
                             attention_backend, devices)
        self._inflight = None  # (plan, StepOutput) dispatched but not yet read
        self._imports: dict[str, tuple[jax.Array, jax.Array]] = {}  # request id -> prefix K/V awaiting admission
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._rng = np.random.default_rng(seed)
        self.warmed_up = False

    def warmup(self) -> None:
        self.runner.warmup()
        self.warmed_up = True

    # ---- requests ------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[int], field: str = "prompt") -> tuple[str | None, list[int]]:
        V = self.model_config.vocab_size
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"{field} is an empty string")
            if self.tokenizer is None:
                raise ValueError(f"{field} is text, but this engine has no tokenizer: pass token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            for j, t in enumerate(ids):
                if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < V:
                    raise ValueError(f"{field}[{j}]={t!r} is not a token id in the vocabulary [0, {V})")
            ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"{field} has no tokens")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{field} has {len(ids)} tokens; the context is {self.max_model_len} and at "
                             "least one position must remain for generation")
        return text, ids

    def add_request(self, prompt: str | Sequence[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None, field: str = "prompt", prefill: PrefixPrefill | None = None) -> str:
        """Queues a request. `prefill`, if given, computes the K/V of every prompt token but the last (it is
        called here, after the request is validated; its device work runs asynchronously)."""
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, not {type(sampling).__name__}")
        if sampling.logprobs is not None and sampling.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs={sampling.logprobs} exceeds the engine's max_logprobs={self.config.max_logprobs}")
        text, ids = self.encode_prompt(prompt, field)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        seed = sampling.seed if sampling.seed is not None else int(self._rng.integers(0, 2**32))
        num_imported = len(ids) - 1 if prefill is not None else 0
        req = self.scheduler.add(request_id, ids, sampling, seed, num_imported)
        if num_imported:
            try:
                k, v = prefill(ids[:num_imported])
                c = self.model_config
                want = (c.num_layers, num_imported, c.num_kv_heads, c.head_dim)
                ok = lambda x: x.ndim == 4 and x.shape[1] >= num_imported and (x.shape[0], *x.shape[2:]) == (
                    want[0], *want[2:])
                if not ok(k) or not ok(v) or k.shape != v.shape:
                    raise ValueError(f"prefill returned K/V of shapes k={tuple(k.shape)}, v={tuple(v.shape)}; "
                                     f"expected [L, m, K, H] with L, K, H = {want[0]}, {want[2]}, {want[3]} and "
                                     f"m >= {num_imported}, the tokens it was given")
            except BaseException:
                self.scheduler.finish(req, "cancelled")
                raise
            self._imports[request_id] = (k, v)
        out = RequestOutput(text, ids, [], "", None, request_id=request_id,
                            logprobs=[] if sampling.logprobs is not None else None,
                            metrics=RequestMetrics(arrival_time=req.arrival_time))
        detok = None
        if self.tokenizer is not None:
            from jinfer.text.detokenizer import IncrementalDetokenizer

            detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        self._streams[request_id] = _Stream(detok, StopStringMatcher(sampling.stop), out)
        return request_id

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
        plan = self.scheduler.schedule()
        launched = None
        if plan is not None:
            for item in plan.scheduled:
                if item.num_imported:
                    k, v = self._imports.pop(item.request.request_id)
                    self.runner.import_kv(k, v, item.request.pages, item.slot,
                                          item.request.prompt_ids[:item.num_imported])
            want_lp = any(s.request.sampling.logprobs is not None for s in plan.scheduled)
            launched = (plan, self.runner.dispatch(plan, want_lp))
        events: list[StepEvent] = []
        if self._inflight is not None:
            prev_plan, prev_out = self._inflight
            sampled, lp = prev_out.fetch()
            touched = self.scheduler.update(prev_plan, sampled, self._logprob_reader(lp))
            events = [e for e in (self._emit(r) for r in touched) if e is not None]
        self._inflight = launched
        return events

    def _logprob_reader(self, lp):
        if lp is None:
            return None
        chosen, ids, vals = lp

        def read(slot: int) -> tuple:
            return float(chosen[slot]), ids[slot], vals[slot]

        return read

    def _emit(self, req: Request) -> StepEvent | None:
        stream = self._streams.get(req.request_id)
        if stream is None:
            return None
        out = stream.output
        tok = req.output_ids[-1]
        out.token_ids.append(tok)
        m = out.metrics
        m.token_times.append(req.token_times[-1])
        if m.first_token_time is None:
            m.first_token_time = req.token_times[-1]
        if out.logprobs is not None and req.logprobs:
            lp, ids, vals = req.logprobs[-1]
            n = req.sampling.logprobs
            out.logprobs.append(TokenLogprobs(tok, lp, {int(i): float(v) for i, v in zip(ids[:n], vals[:n])}))
        ended_by_token = req.finished and req.finish_reason == "stop"
        text_mode = stream.detok is not None
        delta = "" if ended_by_token or not text_mode else stream.stops.feed(stream.detok.push(tok))
        if stream.stops.stopped and not req.finished:
            self.scheduler.finish(req, "stop")
        if req.finished:
            if text_mode and not stream.stops.stopped:
                delta += stream.stops.feed(stream.detok.flush()) + stream.stops.flush()
            out.finish_reason = req.finish_reason
            out.num_cached_tokens = req.num_cached_prompt
            m.finished_time = req.token_times[-1]
            del self._streams[req.request_id]
        out.text += delta
        return StepEvent(req.request_id, [tok], delta, out)

    def run_until_done(self) -> None:
        while self.has_work:
            self.step()
