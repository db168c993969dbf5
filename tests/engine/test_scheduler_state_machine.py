"""A hypothesis state machine over the Scheduler, with a simulated device, and the invariants of its bookkeeping.

Rules: requests arrive (prompts from a two-token vocabulary, so prefixes repeat and the prefix cache hits; some
requests continue an earlier one's tokens),
the engine steps (scheduling step N+1 before it reads step N's tokens, as Engine.step does) or steps
synchronously, requests are cancelled or finished by a stop string, cached pages are evicted. The pool is
small (7 pages of 2 tokens for 3 slots of up to 12 tokens each), so scheduling preempts often.

The simulated device plays every plan's KV writes into its pages, in dispatch order: the "KV" at a position
is the whole token prefix up to it, so reading a page through the page table tells whether it holds this
request's own prefix (a wrong prefix-cache hit, a page reused while still in use or a stale page would not).
Tokens the plan takes from the previous step (`from_prev`) are fed from that step's sampled array, as on
the device.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jinfer.engine.config import EngineConfig
from jinfer.engine.request import Request, Status
from jinfer.engine.scheduler import Scheduler
from jinfer.engine.step_plan import StepPlan
from jinfer.inputs import SamplingParams

SLOTS, PAGE_SIZE, NUM_PAGES, MAX_LEN, EOS = 3, 2, 8, 12, 3
CONFIG = EngineConfig(max_slots=SLOTS, page_size=PAGE_SIZE, num_pages=NUM_PAGES, token_buckets=(4, 8),
                      max_prefill_chunk=4, max_waiting=64)
# One step's sampled tokens, i32[max_slots]; EOS one time in five.
SAMPLED = st.lists(st.sampled_from((1, 2, 1, 2, EOS)), min_size=SLOTS, max_size=SLOTS)
PICK = st.integers(0, 63)  # which of the candidate requests a rule acts on (modulo their number)


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.s = Scheduler(CONFIG, MAX_LEN, NUM_PAGES, eos_token_ids=(EOS,))
        self.added: dict[str, Request] = {}
        self.sampled_for: dict[str, list[int]] = {}  # every token the device sampled for a request, in order
        self.kv: dict[int, list[tuple[int, ...] | None]] = {}  # page -> per offset: the prefix its KV encodes
        self.last: tuple[StepPlan, np.ndarray] | None = None  # the step dispatched last, and its tokens
        self.inflight: tuple[StepPlan, np.ndarray] | None = None  # dispatched, its tokens not yet read
        self.reasons: dict[str, str] = {}  # finish reasons as first seen: a request ends once
        self.stopped_by_string: set[str] = set()

    # ---- rules ---------------------------------------------------------------------------------

    @rule(prompt=st.lists(st.sampled_from((1, 2)), min_size=1, max_size=8), max_tokens=st.integers(1, 8),
          ignore_eos=st.booleans())
    def add_request(self, prompt: list[int], max_tokens: int, ignore_eos: bool):
        # At most 8 + 8 tokens, capped at the context of 12: 6 pages, within the pool of 7.
        rid = f"r{len(self.added)}"
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
        self.added[rid] = self.s.add(rid, prompt, sampling, seed=len(self.added))
        self.sampled_for[rid] = []

    @rule(pick=PICK, keep=st.integers(2, 8), extra=st.lists(st.sampled_from((1, 2)), max_size=2),
          max_tokens=st.integers(1, 8))
    def add_follow_up(self, pick: int, keep: int, extra: list[int], max_tokens: int):
        """A next turn: an earlier request's prompt and output so far, cut short, then more tokens."""
        if self.added:
            earlier = list(self.added.values())[pick % len(self.added)]
            self.add_request((earlier.known_ids()[:keep] + extra)[:8], max_tokens, ignore_eos=True)

    def _schedule(self) -> StepPlan | None:
        def at_limit(r: Request) -> bool:  # its last token is in flight: it only waits to finish
            return r.num_sampled >= r.sampling.max_tokens or r.num_tokens >= MAX_LEN

        before = [(r, r.num_preemptions, at_limit(r)) for r in self.s.running]
        plan = self.s.schedule()
        # Running requests are served oldest first and victims taken newest first, so those preempted are
        # the newest of the ones that were running; but a request at its limit, older or not, can lose
        # its pages to a newer one (it computes nothing more, and finishes when its token arrives).
        preempted = [r for r, n, done in before if r.num_preemptions > n and not done]
        kept = [r for r, n, _ in before if r.num_preemptions == n]
        if preempted and kept:
            assert max(r.arrival for r in kept) < min(r.arrival for r in preempted)
        return plan

    @rule(tokens=SAMPLED)
    def engine_step(self, tokens: list[int]):
        """Engine.step(): schedule and dispatch the next step, then read the previous step's tokens."""
        plan = self._schedule()
        launched = None if plan is None else (plan, self._run_on_device(plan, tokens))
        if self.inflight is not None:
            self._update(*self.inflight)
        self.inflight = launched

    @precondition(lambda self: self.inflight is None)
    @rule(tokens=SAMPLED)
    def synchronous_step(self, tokens: list[int]):
        plan = self._schedule()
        if plan is not None:
            self._update(plan, self._run_on_device(plan, tokens))

    @rule(pick=PICK)
    def cancel(self, pick: int):
        if not self.added:
            return
        req = list(self.added.values())[pick % len(self.added)]
        live = not req.finished
        assert self.s.cancel(req.request_id) == live  # a finished request is gone, even if cancelled again
        assert req.finish_reason == ("cancelled" if live else self.reasons[req.request_id])

    @rule(pick=PICK)
    def finish_on_stop_string(self, pick: int):
        """The engine ends a request whose text matched a stop string, maybe with its next token in flight."""
        running = [r for r in self.s.running if r.output_ids]
        if running:
            req = running[pick % len(running)]
            self.s.finish(req, "stop")
            self.stopped_by_string.add(req.request_id)

    @rule(n=st.integers(1, 4))
    def evict(self, n: int):
        cache, alloc = self.s.prefix_cache, self.s.allocator
        evictable, free = cache.num_evictable, alloc.num_free
        assert cache.evict(n) == min(n, evictable)
        assert alloc.num_free == free + min(n, evictable)

    # ---- the simulated device and the engine's update ------------------------------------------

    def _kv_at(self, table: np.ndarray, pos: int) -> tuple[int, ...] | None:
        return self.kv.get(int(table[pos // PAGE_SIZE]), [None] * PAGE_SIZE)[pos % PAGE_SIZE]

    def _run_on_device(self, plan: StepPlan, tokens: list[int]) -> np.ndarray:
        """Checks a freshly scheduled plan and plays its KV writes; returns what the device samples."""
        sampled = np.array(tokens, np.int32)
        assert 0 < plan.num_tokens <= CONFIG.max_step_tokens
        scheduled_slots = [item.slot for item in plan.scheduled]
        assert len(set(scheduled_slots)) == len(scheduled_slots)
        assert set(np.flatnonzero(plan.slots.query_len).tolist()) == set(scheduled_slots)
        assert set(np.flatnonzero(plan.slots.sample).tolist()) == {x.slot for x in plan.scheduled if x.samples}
        for item in plan.scheduled:
            req, slot, n = item.request, item.slot, item.num_tokens
            assert req.status is Status.RUNNING and self.s.slots[slot] is req
            # Never a token past max_tokens or the context: a request at its limit waits for its last token.
            assert req.num_sampled <= req.sampling.max_tokens and req.num_tokens <= MAX_LEN
            assert 0 < n <= CONFIG.max_prefill_chunk and plan.slots.query_len[slot] == n
            truth = req.prompt_ids + self.sampled_for[req.request_id]
            end = int(plan.slots.kv_len[slot])
            start = end - n
            assert end <= len(truth), f"{req.request_id} computes position {end - 1} before its token exists"
            table = plan.slots.page_table[slot]
            assert table[:len(req.pages)].tolist() == req.pages and not table[len(req.pages):].any()
            # Attention reads every earlier position through the page table: each must hold this prefix.
            for q in range(start):
                assert self._kv_at(table, q) == tuple(truth[:q + 1]), (req.request_id, q)
            for i in range(n):
                t, p = int(plan.slots.query_start[slot]) + i, start + i
                assert (plan.tokens.positions[t], plan.tokens.slot[t]) == (p, slot)
                assert plan.tokens.is_output[t] == (p >= len(req.prompt_ids))
                if plan.tokens.from_prev[t]:
                    # The previous step sampled it for this very slot and request; the device feeds it on.
                    prev_plan, prev_sampled = self.last
                    assert prev_plan.slots.sample[slot] and p == len(req.prompt_ids) + prev_plan.slots.gen_index[slot]
                    assert any(x.request is req for x in prev_plan.scheduled)
                    value = int(prev_sampled[slot])
                else:
                    value = int(plan.tokens.ids[t])
                assert value == truth[p], (req.request_id, p)
                page = int(table[p // PAGE_SIZE])
                assert page != 0  # page 0 only pads
                self.kv.setdefault(page, [None] * PAGE_SIZE)[p % PAGE_SIZE] = tuple(truth[:p + 1])
            if item.samples:
                assert end == req.num_tokens - 1  # the token sampled after the chunk is the next one
                assert plan.slots.gen_index[slot] == len(self.sampled_for[req.request_id])
                self.sampled_for[req.request_id].append(int(sampled[slot]))
        self.last = (plan, sampled)
        return sampled

    def _update(self, plan: StepPlan, sampled: np.ndarray):
        receiving = [x for x in plan.scheduled if x.samples and not x.request.finished]
        assert self.s.update(plan, sampled) == [x.request for x in receiving]
        for x in receiving:
            req, tok = x.request, int(sampled[x.slot])
            assert req.output_ids[-1] == tok
            if tok in req.stop_ids:
                want = "stop"
            elif len(req.output_ids) == req.sampling.max_tokens or len(req.known_ids()) == MAX_LEN:
                want = "length"
            else:
                want = None
            assert req.finish_reason == want, (req.request_id, req.finish_reason, want)

    # ---- invariants, after every rule ----------------------------------------------------------

    @invariant()
    def every_page_is_free_or_evictable_or_held_and_refcounts_count_holders(self):
        alloc, cache = self.s.allocator, self.s.prefix_cache
        free = list(alloc._free)  # private, but the partition is the point: nothing else lists them
        evictable = list(cache._evictable)
        held = [p for r in self.s.running for p in r.pages]
        assert len(set(free)) == len(free) and len(set(evictable)) == len(evictable)
        assert not set(free) & set(evictable) and not set(held) & (set(free) | set(evictable))
        assert set(free) | set(evictable) | set(held) == set(range(1, NUM_PAGES))
        assert alloc.refcount.tolist() == np.bincount(held, minlength=NUM_PAGES).tolist()
        assert len(cache) >= len(evictable)  # an evictable page is one the cache still indexes
        for r in self.s.running:
            assert len(set(r.pages)) == len(r.pages) == -(-r.num_computed // PAGE_SIZE)

    @invariant()
    def slots_and_queues_agree(self):
        occupants = [r for r in self.s.slots if r is not None]
        assert {id(r) for r in occupants} == {id(r) for r in self.s.running} and len(occupants) == len(self.s.running)
        for i, r in enumerate(self.s.slots):
            assert r is None or (r.slot == i and r.status is Status.RUNNING)
        for r in self.s.waiting:
            assert r.status is Status.WAITING and r.slot is None and r.pages == []
        for queue in (self.s.running, self.s.waiting):
            assert [r.arrival for r in queue] == sorted(r.arrival for r in queue)
        live = self.s.running + self.s.waiting
        assert sorted(self.s.requests) == sorted(r.request_id for r in live)

    @invariant()
    def every_request_ends_once_and_holds_nothing_after(self):
        inflight = set() if self.inflight is None else {
            id(x.request) for x in self.inflight[0].scheduled if x.samples}
        for rid, r in self.added.items():
            assert r.output_ids == self.sampled_for[rid][:len(r.output_ids)]
            assert len(r.output_ids) <= r.sampling.max_tokens and r.num_tokens <= MAX_LEN + 1
            assert not set(r.output_ids[:-1]) & r.stop_ids  # a stop token ends the request at once
            if r.finished:
                assert self.reasons.setdefault(rid, r.finish_reason) == r.finish_reason
                assert r.finish_reason in ("stop", "length", "cancelled")
                if r.finish_reason == "stop" and rid not in self.stopped_by_string:
                    assert r.output_ids[-1] in r.stop_ids
                if r.finish_reason == "length":
                    assert r.sampling.max_tokens == len(r.output_ids) or MAX_LEN == len(r.known_ids())
                assert r.pages == [] and r.slot is None and rid not in self.s.requests
            else:
                assert rid not in self.reasons and self.s.requests[rid] is r
                assert (r in self.s.running) != (r in self.s.waiting)
                # At most one token on the device: the one the in-flight step samples for it.
                assert r.num_sampled - len(r.output_ids) == (1 if id(r) in inflight else 0)

    @invariant()
    def prefix_stats_are_consistent(self):
        st_ = self.s.prefix_cache.stats
        assert 0 <= st_.hit_tokens <= st_.queried_tokens

    def teardown(self):
        # Drain without stop tokens: everything finishes by length and every page comes back.
        for _ in range(300):
            if not (self.s.has_work or self.inflight):
                break
            self.engine_step([1] * SLOTS)
            self.every_page_is_free_or_evictable_or_held_and_refcounts_count_holders()
            self.slots_and_queues_agree()
            self.every_request_ends_once_and_holds_nothing_after()
        assert not self.s.has_work and self.inflight is None, "the scheduler made no progress"
        assert all(r.finished for r in self.added.values())
        alloc = self.s.allocator
        assert not alloc.refcount.any() and alloc.num_free + self.s.prefix_cache.num_evictable == alloc.usable_pages


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=200, stateful_step_count=60, derandomize=True, deadline=None)


def test_the_machine_reaches_preemption_prefix_hits_and_lookahead():
    """The random runs above only prove something if these states occur; a fixed run shows they do."""
    m = SchedulerMachine()
    for _ in range(3):
        m.add_request([1, 2] * 5, max_tokens=8, ignore_eos=True)
    from_prev = 0
    for _ in range(12):
        m.engine_step([1] * SLOTS)
        from_prev += int(m.last[0].tokens.from_prev.sum())
    m.add_request([1, 2] * 5, max_tokens=2, ignore_eos=True)
    m.teardown()
    assert m.s.num_preemptions > 0 and m.s.prefix_cache.stats.hit_tokens > 0 and from_prev > 0
