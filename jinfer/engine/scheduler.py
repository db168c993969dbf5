"""The scheduler: host-only bookkeeping (numpy, never jax) of requests, slots and KV pages.

`schedule()` builds the next StepPlan: every running request contributes tokens (1 to decode, a chunk
of its prompt to prefill; chunked prefill and decode share a step, as in SplitFuse) within the token
budget; waiting requests are admitted first-come first-served while slots, budget and pages last; when
pages run out, cached prefix pages are evicted, then the newest running request is preempted (its pages
freed, its tokens kept, recomputed later). `update(plan, sampled)` records the sampled tokens and
finishes requests on a stop token or a length limit.

When no request is admitted and every running request has exactly one token to feed, the plan is a
*decode block* (`StepPlan.decode`): each request runs up to `decode_steps` decode steps in one dispatch
(bounded by its max_tokens, the context and the pages that can be had without preempting anyone), with
its stop tokens checked on the device.

`schedule()` may run once ahead of `update()` (the engine dispatches step N+1 before reading step N's
tokens): a request's token still on the device is counted in `num_sampled` and fed to the next step from
the device (`from_prev`), and a request that turns out to have finished simply has that step's token
discarded.

A request that asks for prompt logprobs computes its whole prompt (no prefix-cache lookup, as in vLLM, until
they have all reached the host; its pages are still published): each plan names, per token, the prompt token
that follows it (`TokenInputs.next_id`) where its logprob is still missing, and `update` appends the records
in prompt order, so chunks spread over several steps and a prompt recomputed after preemption neither lose
nor repeat an entry.

With speculative decoding (`EngineConfig.speculative`), a plan that would be a decode block becomes a *verify
step* (`StepPlan.verify`) when at most `disable_by_batch_size` requests run and any of them has a proposal:
each row feeds its token and the proposed ones after it (`RowInputs.num_draft`; ids from the host proposer,
or drafted on the device), the KV of all of them is written, and `update` keeps what the device accepted:
the KV length and the sampled count fall back to the accepted run plus one, so the K/V of rejected tokens
are simply overwritten later. Each request's k comes from the adaptive policy (`jinfer.engine.spec.policy`).
A host proposer needs every token on the host: the engine reads each step before scheduling the next
(`needs_sync`), as it does after every verify step (the accepted count decides the next positions).

A request with structured output (`Request.grammar`) samples under its grammar's token mask (`RowInputs.token_mask`),
which depends on every token before: it is left out of a plan while its last token is still on the device
and samples one token per dispatch (no decode block, no speculation for it), so the requests without a
grammar keep the one-step lookahead and their decode blocks; a grammar that is complete ends its request.

A request may arrive with the KV of its first prompt tokens already computed (`num_imported`, e.g. a long
prompt prefilled by ring attention): at admission its pages are allocated for them, the engine writes them
in before the step runs (`Scheduled.num_imported`), and only the rest of the prompt is computed here.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import time
from typing import Sequence

import numpy as np

from jinfer.engine.config import EngineConfig
from jinfer.engine.kv_pages import PageAllocator
from jinfer.engine.prefix_cache import PrefixCache
from jinfer.engine.request import Request, Status
from jinfer.engine.spec.policy import AdaptivePolicy
from jinfer.engine.spec.proposers import HostProposer, NgramProposer
from jinfer.engine.spec.step_costs import StepCosts
from jinfer.engine.step_plan import ROW_PADDING, RowInputs, SamplingInputs, Scheduled, StepPlan, TokenInputs
from jinfer.grammar.params import mask_words
from jinfer.inputs import MAX_STOP_TOKEN_IDS, SamplingParams


class QueueFull(RuntimeError):
    """The waiting queue is at EngineConfig.max_waiting."""


class Scheduler:
    def __init__(self, config: EngineConfig, max_model_len: int, num_pages: int,
                 eos_token_ids: Sequence[int] = (), vocab_size: int = 0):
        self.config = config
        self.max_model_len = max_model_len
        self.page_size = config.page_size
        self.max_pages_per_seq = -(-max_model_len // config.page_size)
        self.allocator = PageAllocator(num_pages)
        self.prefix_cache = PrefixCache(self.allocator, config.page_size)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stop_width = MAX_STOP_TOKEN_IDS + len(self.eos_token_ids)  # RowInputs.stop_ids: every stop id fits
        self.mask_words = mask_words(vocab_size)  # RowInputs.token_mask
        self.slots: list[Request | None] = [None] * config.max_slots
        self.waiting: list[Request] = []  # kept sorted by arrival, so preempted requests go back in front
        self.running: list[Request] = []  # sorted by arrival
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        spec = config.speculative
        self.spec = spec
        self.proposer: HostProposer | None = None
        self.costs = StepCosts() if spec is not None and spec.measure_costs else None
        if spec is not None:
            self.policy = AdaptivePolicy(spec.num_speculative_tokens, spec.draft_cost or 0.0, spec.adaptive,
                                         spec.step_cost, retire=spec.method == "draft", host=spec.method == "ngram",
                                         keep_looking=bool(spec.keep_looking))
            if spec.method == "ngram":
                self.proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
        self.num_preemptions = 0
        self.num_computed_tokens = 0  # tokens whose KV was computed (prefill and decode), for statistics

    # ---- requests in and out -------------------------------------------------------------------

    def add(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, seed: int,
            num_imported: int = 0, grammar=None, parent: Request | None = None) -> Request:
        """The prompt and sampling come checked from the edge (jinfer.inputs: lengths, vocabulary, pool size).
        `num_imported`: leading prompt tokens whose KV the caller supplies (at least one token must remain,
        whose logits give the first output token). `grammar`: the structured output's fresh matcher. `parent`:
        an earlier request of the same prompt whose prompt pages this one should share (Request.parent)."""
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.config.max_waiting} requests)")
        if not isinstance(num_imported, int) or not 0 <= num_imported < len(prompt_ids):
            raise ValueError(f"num_imported={num_imported!r} must be an integer in [0, {len(prompt_ids)}) for a "
                             f"prompt of {len(prompt_ids)} tokens")
        stop = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_token_ids))
        req = Request(request_id, list(prompt_ids), sampling, frozenset(stop), seed, next(self._arrivals),
                      num_imported=num_imported, spec=self.policy.new_state() if self.spec is not None else None, grammar=grammar,
                      parent=parent if self.config.enable_prefix_caching and not num_imported else None)
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

    @staticmethod
    def _awaits_token(req: Request) -> bool:
        """Its grammar's next mask needs the token still on the device."""
        return req.grammar is not None and len(req.output_ids) < req.num_sampled

    def schedule(self) -> StepPlan | None:
        cfg = self.config
        budget = cfg.max_step_tokens
        chunks: list[tuple[Request, int]] = []
        reset: set[int] = set()
        imports: dict[int, int] = {}  # slot -> tokens of imported KV to write before this step
        precomputed: dict[int, int] = {}  # slot -> leading tokens whose KV this admission did not compute

        # Running requests first, oldest first; the newest not yet scheduled are the preemption victims.
        for req in list(self.running):
            if req.status is not Status.RUNNING or self._finishing(req) or self._awaits_token(req):
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
            if req.parent is not None:
                if not req.parent.finished and not req.parent.output_ids:
                    break  # its sibling's prompt is still being computed: share its pages once they are cached
                req.parent = None
            known = req.known_ids()
            imported = req.num_imported
            cached: list[int] = []
            # A prefix-cache hit would skip positions whose prompt logprobs are still wanted.
            lookup = cfg.enable_prefix_caching and not imported and not req.needs_prompt_logprobs
            if lookup:
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
            if lookup and req.num_preemptions == 0:
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
        decode = (not reset and not precomputed and not imports
                  and all(n == 1 == req.num_tokens - req.num_computed for req, n in chunks))
        drafts, missed = self._proposals(chunks) if decode else (None, 0)
        if drafts is not None:
            return self._build_plan(chunks, reset, imports, precomputed, decode=False, drafts=drafts)
        if decode:
            # Rows whose lookup just missed decode until their next lookup (`AdaptivePolicy.lookup_gap`: one token,
            # since a copy usually resumes a token or two after it broke off, or where the policy keeps looking a
            # gap that doubles with each miss while the request's lookups do not pay); unless the block runs
            # longer for another row anyway (a row that stopped early would idle in it).
            short = missed == len(chunks)
            chunks = [(req, self._decode_steps(req, short)) for req, _ in chunks]
        return self._build_plan(chunks, reset, imports, precomputed, decode)

    def observe_step(self, plan: StepPlan, seconds: float) -> None:
        """How long a collected step took (the engine's timing): decode blocks and verify steps measure the
        verify step's extra cost (`SpeculativeConfig.measure_costs`)."""
        if self.costs is not None and (plan.decode or plan.verify):
            self.costs.observe(plan.num_rows, plan.verify, plan.max_steps, seconds)

    def needs_sync(self, plan: StepPlan) -> bool:
        """Whether the next plan needs `plan`'s tokens on the host before it is built: after a verify step
        (how many were accepted decides the next positions), and with a host proposer while a request may
        speculate (it proposes from the last token)."""
        if plan.verify:
            return True
        if self.running and all(self._awaits_token(r) for r in self.running):
            return True  # nothing to run meanwhile: read the tokens now rather than dispatch nothing
        if self.proposer is None or len(self.running) > self.spec.disable_by_batch_size:
            return False
        return any(self.policy.k(r.spec) for r in self.running)

    def _proposals(self, chunks: list[tuple[Request, int]]) -> tuple[list[list[int] | int] | None, int]:
        """Per row of a would-be decode block: the host proposer's token ids, or how many tokens the device
        drafts; None when no row speculates (too many running, nothing proposed). Also how many rows' host
        proposer found nothing: when every row's did, the step decodes one token and they ask again, rather
        than a whole block, because a copy usually resumes a token or two after it broke off (a new word in
        copied text)."""
        if self.spec is None:
            return None, 0
        if len(chunks) > self.spec.disable_by_batch_size:
            for req, _ in chunks:
                self.policy.sit_out(req.spec)
            return None, 0
        if any(not self._may_speculate(req) for req, _ in chunks):
            return None, 0
        if self.costs is not None:
            measured = self.costs.verify_extra(len(chunks))
            self.policy.step_cost = self.spec.step_cost if measured is None else measured
        out, missed, any_draft = [], 0, False
        for req, _ in chunks:
            k = min(self.policy.k(req.spec), req.sampling.max_tokens - req.num_sampled - 1,
                    self.max_model_len - req.num_tokens - 1)
            k = max(0, min(k, (len(req.pages) + self._free_pages()) * self.page_size - req.num_computed - 1))
            if k and self.proposer is not None:
                known = req.known_ids()
                drafts = []
                # (else its last token is still on the device, or a shadow awaits its score: see the policy)
                if len(known) == req.num_tokens and req.spec.shadow is None:
                    drafts = self.policy.take(req.spec, len(req.output_ids), self.proposer.propose(known, k))
                if not drafts:
                    missed += 1
                out.append(drafts)
                k = len(drafts)
            else:
                out.append(k)
            any_draft |= k > 0
        return (out if any_draft else None), missed

    @staticmethod
    def _may_speculate(req: Request) -> bool:
        """The verify step samples from the model's distribution with penalties only: a grammar's mask, a
        logit bias or a pending min_tokens would change the distribution it must accept against."""
        sp = req.sampling
        return req.grammar is None and not sp.logit_bias and req.num_sampled >= sp.min_tokens

    def _free_pages(self) -> int:
        """Pages to be had without preempting anyone (free ones and evictable cached ones)."""
        return self.allocator.num_free + self.prefix_cache.num_evictable

    def _decode_steps(self, req: Request, missed: bool = False) -> int:
        """Steps of a decode block for a running request that has one token to feed (and its pages for it):
        as many as its max_tokens, the context and the pages to be had without preempting allow; after a lookup
        that gave no verify, only until the next lookup (`missed`)."""
        n = self.config.decode_steps if req.grammar is None else 1
        if missed:
            n = self.policy.lookup_gap(req.spec, n)
        n = min(n, req.sampling.max_tokens - req.num_sampled, self.max_model_len - req.num_tokens)
        need = self._pages_needed(req, req.num_computed + n)
        if need and not self._make_room(need):
            need = self.allocator.num_free
            n = min(n, (len(req.pages) + need) * self.page_size - req.num_computed)
        req.pages += self.allocator.allocate(need)
        return max(n, 1)

    def _build_plan(self, chunks: list[tuple[Request, int]], reset: set[int], imports: dict[int, int],
                    precomputed: dict[int, int], decode: bool, drafts: list[list[int] | int] | None = None) -> StepPlan:
        """`chunks`: (request, tokens) in row order; in a decode block the count is the request's steps, of
        which the plan carries the first token only (the device feeds the rest). `drafts` (a verify step): per
        row, the proposed ids, or how many the device drafts."""
        if drafts is not None:
            for r, (req, _) in enumerate(chunks):  # pages for the proposed tokens' K/V, as far as they go
                nd = drafts[r] if isinstance(drafts[r], int) else len(drafts[r])
                need = self._pages_needed(req, req.num_computed + 1 + nd)
                if not self._make_room(need):
                    need = self.allocator.num_free
                    nd = max(0, min(nd, (len(req.pages) + need) * self.page_size - req.num_computed - 1))
                    drafts[r] = nd if isinstance(drafts[r], int) else drafts[r][:nd]
                req.pages += self.allocator.allocate(need)
                chunks[r] = (req, 1 + nd)
        R = len(chunks)
        T = R if decode else sum(n for _, n in chunks)
        tokens = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        token_row = np.zeros(T, np.int32)
        from_prev = np.zeros(T, bool)
        is_output = np.zeros(T, bool)
        next_id = np.full(T, -1, np.int32)
        rows = {f.name: np.zeros(R, np.int32) for f in dataclasses.fields(RowInputs)}
        rows.update(sample=np.zeros(R, bool), reset=np.zeros(R, bool), draft_live=np.zeros(R, bool),
                    page_table=np.zeros((R, self.max_pages_per_seq), np.int32),
                    stop_ids=np.full((R, self.stop_width), ROW_PADDING["stop_ids"], np.int32),
                    token_mask=np.full((R, self.mask_words), -1, np.int32))
        sampling = {k: np.zeros(R, t) for k, t in SamplingInputs.DTYPES.items()}
        scheduled = []
        t = 0
        for r, (req, n) in enumerate(chunks):
            s, start = req.slot, req.num_computed
            fed = 1 if decode else n  # tokens the plan carries; a block's device steps feed the rest
            proposed = drafts[r] if drafts is not None else 0
            for i in range(fed):
                tok = req.token_at(start + i) if i == 0 or drafts is None else (
                    proposed[i - 1] if isinstance(proposed, list) else 0)  # a device draft's id comes later
                if tok is None:
                    from_prev[t + i] = True
                else:
                    tokens[t + i] = tok
            positions[t:t + fed] = np.arange(start, start + fed)
            token_row[t:t + fed] = r
            is_output[t:t + fed] = positions[t:t + fed] >= len(req.prompt_ids)
            if req.sampling.prompt_logprobs is not None:
                next_id[t:t + fed] = [req.next_prompt_id(start + i) for i in range(fed)]
            req.num_computed += n
            self.num_computed_tokens += n
            num_samples = n if decode or drafts is not None else int(req.num_computed == req.num_tokens)
            rows["slot"][r], rows["query_start"][r], rows["query_len"][r] = s, t, fed
            rows["kv_len"][r] = start + fed
            rows["page_table"][r, :len(req.pages)] = req.pages
            rows["sample"][r] = num_samples > 0
            rows["gen_index"][r] = req.num_sampled
            rows["reset"][r] = s in reset
            rows["num_steps"][r] = n if decode else 1
            rows["num_draft"][r] = n - 1 if drafts is not None else 0
            rows["draft_live"][r] = req.spec is not None and not req.spec.retired
            if req.grammar is not None and num_samples:
                req.grammar.fill_mask(rows["token_mask"], r)
            stop = sorted(req.stop_ids)
            rows["stop_ids"][r, :len(stop)] = stop
            for k in SamplingInputs.DTYPES:
                sampling[k][r] = self._sampling_input(req, k)
            req.num_sampled += num_samples
            scheduled.append(Scheduled(req, s, r, start, n, num_samples, imports.get(s, 0), precomputed.get(s, 0)))
            t += fed
        return StepPlan(
            TokenInputs(ids=tokens, positions=positions, row=token_row, from_prev=from_prev, is_output=is_output,
                        valid=np.ones(T, bool), next_id=next_id),
            RowInputs(**rows), SamplingInputs(**sampling), scheduled=tuple(scheduled), decode=decode,
            verify=drafts is not None)

    # ---- results -------------------------------------------------------------------------------

    def update(self, plan: StepPlan, sampled: np.ndarray, logprobs=None, prompt_logprobs=None) -> list[Request]:
        """Records the tokens sampled by `plan` (i32[N, R]: N steps, R rows); returns the requests that received
        any. A request takes its row's first `num_samples` tokens, up to and including one that ends it.

        `logprobs`, if given, is a callable (step, row) -> the logprob record of that token; `prompt_logprobs`
        one (token index in the plan) -> the record of the prompt token after it (where `next_id` names one).
        """
        now = time.perf_counter()
        touched = []
        for item in plan.scheduled:
            req = item.request
            if req.finished:
                continue  # finished (or cancelled) after this plan was built: its tokens are discarded
            if prompt_logprobs is not None and req.sampling.prompt_logprobs is not None:
                self._record_prompt_logprobs(plan, item, prompt_logprobs)
            reason, got = None, 0
            emitted = item.num_samples
            if plan.verify:  # the accepted run and one more; the step's KV past them is not live
                column = sampled[:item.num_samples, item.row]
                emitted = int(np.argmax(column < 0)) if (column < 0).any() else item.num_samples
                unused = item.num_samples - emitted
                req.num_sampled -= unused
                req.num_computed -= unused
                self.num_computed_tokens -= unused
                self.policy.record(req.spec, item.num_tokens - 1, emitted - 1)
            elif req.spec is not None:
                req.spec.idle += item.num_samples
            for j in range(emitted):
                tok = int(sampled[j, item.row])
                got += 1
                req.output_ids.append(tok)
                req.token_times.append(now)
                if logprobs is not None and req.sampling.logprobs is not None:
                    req.logprobs.append(logprobs(j, item.row))
                if tok in req.stop_ids:
                    reason = "stop"
                elif req.grammar is not None and not self._advance_grammar(req, tok):
                    reason = "stop"
                elif (len(req.output_ids) >= req.sampling.max_tokens
                      or len(req.prompt_ids) + len(req.output_ids) >= self.max_model_len):
                    reason = "length"
                if reason:
                    break
            if got:
                touched.append(req)
                if req.spec is not None:
                    self.policy.score_shadow(req.spec, req.output_ids)
            if (plan.decode or plan.verify) and got < emitted:  # the row stopped: no KV past its stop
                self.num_computed_tokens -= emitted - got
            # Indexed before a finish releases the pages, so that a request ending on this step (max_tokens=1,
            # a stop token first) still leaves its prompt's pages to the prefix cache.
            # Pages holding imported KV stay private: a cached page must hold what this engine computes for
            # its tokens, and KV computed elsewhere (ring attention) agrees with that only to rounding, so
            # a later request reusing it would no longer reproduce its uncached output exactly.
            if self.config.enable_prefix_caching and req.status is Status.RUNNING and not req.kv_imported:
                known = req.known_ids()
                computed = min(req.num_computed, len(known))
                if plan.decode and got < item.num_samples:  # a decode block stopped the row on the device:
                    computed = min(computed, item.start + got)  # later steps wrote nothing for it
                full = computed // self.page_size
                if full > req.num_indexed_pages:
                    self.prefix_cache.insert(known, req.pages, full)
                    req.num_indexed_pages = full
            if reason:
                self.finish(req, reason)
        return touched

    @staticmethod
    def _sampling_input(req: Request, field: str):
        """The request's value of a SamplingInputs field."""
        sp = req.sampling
        if field == "logprobs":
            return sp.logprobs is not None
        if field == "has_logit_bias":
            return bool(sp.logit_bias)
        return req.seed if field == "seed" else getattr(sp, field)

    @staticmethod
    def _advance_grammar(req: Request, tok: int) -> bool:
        """Feeds a sampled token to the request's grammar; False once the grammar is complete (or, which the
        mask rules out, refused the token: the request then ends rather than emit text outside it)."""
        g = req.grammar
        return g.accept(tok) and not g.done

    @staticmethod
    def _record_prompt_logprobs(plan: StepPlan, item: Scheduled, read) -> None:
        """Appends the entries this plan computed for the request that come next in prompt order: a position
        recomputed after preemption (or also computed by a step that was in flight then) is already there."""
        if plan.decode:  # a decode block feeds tokens past the prompt only
            return
        req = item.request
        first = int(plan.rows.query_start[item.row])
        for i in range(max(0, len(req.prompt_logprobs) - item.start), item.num_tokens):
            t = first + i
            if item.start + i != len(req.prompt_logprobs) or plan.tokens.next_id[t] < 0:
                break
            req.prompt_logprobs.append(read(t))
