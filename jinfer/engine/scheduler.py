"""The scheduler: host-only bookkeeping (numpy, never jax) of requests, slots and KV pages.

`schedule()` builds the next StepPlan: every running request contributes tokens (1 to decode, a chunk
of its prompt to prefill; chunked prefill and decode share a step, as in SplitFuse) within the token
budget; waiting requests are admitted first-come first-served while slots, budget and pages last; when
pages run out, cached prefix pages are evicted, then the newest running request is preempted (its pages
freed, its tokens kept, recomputed later). `update(plan, sampled)` records the sampled tokens and
finishes requests on a stop token or a length limit.

`schedule()` may run once ahead of `update()` (the engine dispatches step N+1 before reading step N's
tokens): a request's token still on the device is counted in `num_sampled` and fed to the next step from
the device (`from_prev`), and a request that turns out to have finished simply has that step's token
discarded.

A request may arrive with the KV of its first prompt tokens already computed (`num_imported`, e.g. a long
prompt prefilled by ring attention): at admission its pages are allocated for them, the engine writes them
in before the step runs (`Scheduled.num_imported`), and only the rest of the prompt is computed here.
"""

from __future__ import annotations

import bisect
import itertools
import time
from typing import Sequence

import numpy as np

from jinfer.engine.config import EngineConfig
from jinfer.engine.kv_pages import PageAllocator
from jinfer.engine.prefix_cache import PrefixCache
from jinfer.engine.request import Request, Status
from jinfer.engine.step_plan import SamplingInputs, Scheduled, SlotInputs, StepPlan, TokenInputs
from jinfer.inputs import SamplingParams


class QueueFull(RuntimeError):
    """The waiting queue is at EngineConfig.max_waiting."""


class Scheduler:
    def __init__(self, config: EngineConfig, max_model_len: int, num_pages: int,
                 eos_token_ids: Sequence[int] = ()):
        self.config = config
        self.max_model_len = max_model_len
        self.page_size = config.page_size
        self.max_pages_per_seq = -(-max_model_len // config.page_size)
        self.allocator = PageAllocator(num_pages)
        self.prefix_cache = PrefixCache(self.allocator, config.page_size)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.slots: list[Request | None] = [None] * config.max_slots
        self.waiting: list[Request] = []  # kept sorted by arrival, so preempted requests go back in front
        self.running: list[Request] = []  # sorted by arrival
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.num_preemptions = 0
        self.num_computed_tokens = 0  # tokens whose KV was computed (prefill and decode), for statistics

    # ---- requests in and out -------------------------------------------------------------------

    def add(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, seed: int,
            num_imported: int = 0) -> Request:
        """The prompt and sampling come checked from the edge (jinfer.inputs: lengths, vocabulary, pool size).
        `num_imported`: leading prompt tokens whose KV the caller supplies (at least one token must remain,
        whose logits give the first output token)."""
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.config.max_waiting} requests)")
        if not isinstance(num_imported, int) or not 0 <= num_imported < len(prompt_ids):
            raise ValueError(f"num_imported={num_imported!r} must be an integer in [0, {len(prompt_ids)}) for a "
                             f"prompt of {len(prompt_ids)} tokens")
        stop = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_token_ids))
        req = Request(request_id, list(prompt_ids), sampling, frozenset(stop), seed, next(self._arrivals),
                      num_imported=num_imported)
        self.requests[request_id] = req
        self.waiting.append(req)
        return req

    def finish(self, request: Request, reason: str) -> None:
        """Ends a request (stop, length, cancelled, ...) and returns its slot and pages at once."""
        if request.finished:
            return
        if request.status is Status.RUNNING:
            self._release(request)
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]

    def cancel(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.finish(req, "cancelled")
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- pages ---------------------------------------------------------------------------------

    def _release(self, req: Request) -> None:
        # Last page first, so an LRU eviction takes a prefix's tail before its head.
        for page in reversed(req.pages):
            self.prefix_cache.release(page)
        req.pages = []
        self.slots[req.slot] = None
        req.slot = None

    def _pages_needed(self, req: Request, upto: int) -> int:
        return max(0, -(-upto // self.page_size) - len(req.pages))

    def _make_room(self, n: int) -> bool:
        short = n - self.allocator.num_free
        if short > 0:
            self.prefix_cache.evict(short)
        return self.allocator.num_free >= n

    def _preempt(self, victim: Request) -> None:
        self._release(victim)
        victim.num_indexed_pages = 0
        # Imported KV (num_imported is already 0: it was written at admission) is lost with the pages: the
        # request recomputes its whole prompt by ordinary chunked prefill, which is exact, only slower.
        victim.kv_imported = False
        self.running.remove(victim)
        victim.status = Status.WAITING
        victim.num_computed = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, victim, key=lambda r: r.arrival)

    # ---- the plan ------------------------------------------------------------------------------

    def _finishing(self, req: Request) -> bool:
        """Its last sampled token (maybe still in flight) already reached a length limit."""
        return req.num_sampled >= req.sampling.max_tokens or req.num_tokens >= self.max_model_len

    def schedule(self) -> StepPlan | None:
        cfg = self.config
        budget = cfg.max_step_tokens
        chunks: list[tuple[Request, int]] = []
        reset: set[int] = set()
        imports: dict[int, int] = {}  # slot -> tokens of imported KV to write before this step
        precomputed: dict[int, int] = {}  # slot -> leading tokens whose KV this admission did not compute

        # Running requests first, oldest first; the newest not yet scheduled are the preemption victims.
        for req in list(self.running):
            if req.status is not Status.RUNNING or self._finishing(req):
                continue
            n = min(req.num_tokens - req.num_computed, cfg.max_prefill_chunk, budget)
            if n <= 0:
                continue
            need = self._pages_needed(req, req.num_computed + n)
            while not self._make_room(need):
                victims = [r for r in self.running if r is not req and all(r is not c for c, _ in chunks)]
                if not victims:
                    break
                self._preempt(victims[-1])
            if not self._make_room(need):
                self._preempt(req)
                continue
            req.pages += self.allocator.allocate(need)
            chunks.append((req, n))
            budget -= n

        # Then admissions, first come first served: stop at the first request that does not fit.
        while self.waiting and budget > 0 and None in self.slots:
            req = self.waiting[0]
            if len(req.output_ids) < req.num_sampled:
                break  # preempted with a token still in flight; it is recomputed once that token is known
            known = req.known_ids()
            imported = req.num_imported
            cached: list[int] = []
            if cfg.enable_prefix_caching and not imported:
                # Leave at least one token to compute: its logits give the next token.
                cached = self.prefix_cache.match(known, (len(known) - 1) // self.page_size)
            num_cached = len(cached) * self.page_size
            start = max(num_cached, imported)
            n = min(len(known) - start, cfg.max_prefill_chunk, budget)
            need = -(-(start + n) // self.page_size) - len(cached)
            if not self._make_room(need):
                for page in reversed(cached):
                    self.prefix_cache.release(page)
                break
            if cfg.enable_prefix_caching and req.num_preemptions == 0 and not imported:
                self.prefix_cache.record_query(len(req.prompt_ids), min(num_cached, len(req.prompt_ids)))
                req.num_cached_prompt = min(num_cached, len(req.prompt_ids))
            self.waiting.pop(0)
            req.pages = cached + self.allocator.allocate(need)
            req.num_computed = start
            req.slot = self.slots.index(None)
            self.slots[req.slot] = req
            req.status = Status.RUNNING
            bisect.insort(self.running, req, key=lambda r: r.arrival)
            if imported:
                imports[req.slot] = imported
                req.num_imported, req.kv_imported = 0, True  # handed to the engine with this plan
            if start:
                precomputed[req.slot] = start
            else:
                reset.add(req.slot)
            chunks.append((req, n))
            budget -= n

        if not chunks:
            return None
        return self._build_plan(chunks, reset, imports, precomputed)

    def _build_plan(self, chunks: list[tuple[Request, int]], reset: set[int], imports: dict[int, int],
                    precomputed: dict[int, int]) -> StepPlan:
        S = self.config.max_slots
        T = sum(n for _, n in chunks)
        tokens = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        token_slot = np.zeros(T, np.int32)
        from_prev = np.zeros(T, bool)
        is_output = np.zeros(T, bool)
        query_start = np.zeros(S, np.int32)
        query_len = np.zeros(S, np.int32)
        kv_len = np.zeros(S, np.int32)
        page_table = np.zeros((S, self.max_pages_per_seq), np.int32)
        sample = np.zeros(S, bool)
        gen_index = np.zeros(S, np.int32)
        scheduled = []
        t = 0
        for req, n in chunks:
            s = req.slot
            start = req.num_computed
            for i in range(n):
                tok = req.token_at(start + i)
                if tok is None:
                    from_prev[t + i] = True
                else:
                    tokens[t + i] = tok
            positions[t:t + n] = np.arange(start, start + n)
            token_slot[t:t + n] = s
            is_output[t:t + n] = positions[t:t + n] >= len(req.prompt_ids)
            query_start[s], query_len[s] = t, n
            req.num_computed += n
            self.num_computed_tokens += n
            kv_len[s] = req.num_computed
            page_table[s, :len(req.pages)] = req.pages
            samples = req.num_computed == req.num_tokens
            if samples:
                sample[s] = True
                gen_index[s] = req.num_sampled
                req.num_sampled += 1
            scheduled.append(Scheduled(req, s, n, samples, imports.get(s, 0), precomputed.get(s, 0)))
            t += n
        params = [r.sampling if r is not None else None for r in self.slots]

        def per_slot(field, dtype, idle):
            return np.array([getattr(p, field) if p is not None else idle for p in params], dtype)

        return StepPlan(
            TokenInputs(ids=tokens, positions=positions, slot=token_slot, from_prev=from_prev, is_output=is_output,
                        valid=np.ones(T, bool)),
            SlotInputs(query_start=query_start, query_len=query_len, kv_len=kv_len, page_table=page_table,
                       sample=sample, gen_index=gen_index, reset=np.isin(np.arange(S), list(reset))),
            SamplingInputs(temperature=per_slot("temperature", np.float32, 0.0), top_k=per_slot("top_k", np.int32, 0),
                           top_p=per_slot("top_p", np.float32, 1.0), min_p=per_slot("min_p", np.float32, 0.0),
                           repetition_penalty=per_slot("repetition_penalty", np.float32, 1.0),
                           presence_penalty=per_slot("presence_penalty", np.float32, 0.0),
                           frequency_penalty=per_slot("frequency_penalty", np.float32, 0.0),
                           seed=np.array([r.seed if r is not None else 0 for r in self.slots], np.uint32)),
            scheduled=tuple(scheduled),
        )

    # ---- results -------------------------------------------------------------------------------

    def update(self, plan: StepPlan, sampled: np.ndarray, logprobs=None) -> list[Request]:
        """Records the tokens sampled by `plan` (i32[S]); returns the requests that received one.

        `logprobs`, if given, is a callable (slot) -> the logprob record of that slot's token.
        """
        now = time.perf_counter()
        touched = []
        for item in plan.scheduled:
            req = item.request
            if req.finished:
                continue  # finished (or cancelled) after this plan was built: its token is discarded
            tok = None
            if item.samples:
                tok = int(sampled[item.slot])
                req.output_ids.append(tok)
                req.token_times.append(now)
                if logprobs is not None and req.sampling.logprobs is not None:
                    req.logprobs.append(logprobs(item.slot))
                touched.append(req)
            # Indexed before a finish releases the pages, so that a request ending on this step (max_tokens=1,
            # a stop token first) still leaves its prompt's pages to the prefix cache.
            # Pages holding imported KV stay private: a cached page must hold what this engine computes for
            # its tokens, and KV computed elsewhere (ring attention) agrees with that only to rounding, so
            # a later request reusing it would no longer reproduce its uncached output exactly.
            if self.config.enable_prefix_caching and req.status is Status.RUNNING and not req.kv_imported:
                known = req.known_ids()
                full = min(req.num_computed, len(known)) // self.page_size
                if full > req.num_indexed_pages:
                    self.prefix_cache.insert(known, req.pages, full)
                    req.num_indexed_pages = full
            if tok is None:
                continue
            if tok in req.stop_ids:
                self.finish(req, "stop")
            elif (len(req.output_ids) >= req.sampling.max_tokens
                  or len(req.prompt_ids) + len(req.output_ids) >= self.max_model_len):
                self.finish(req, "length")
        return touched
