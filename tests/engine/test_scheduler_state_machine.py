"""A hypothesis state machine over the Scheduler, with a simulated device, and the invariants of its bookkeeping.

Rules: requests arrive (prompts from a two-token vocabulary, so prefixes repeat and the prefix cache hits; some
requests continue an earlier one's tokens, some stop on token 2 as well as on EOS),
the engine steps (scheduling step N+1 before it reads step N's tokens, as Engine.step does) or steps
synchronously, requests are cancelled or finished by a stop string, cached pages are evicted. The pool is
small (7 pages of 2 tokens for 3 slots of up to 12 tokens each), so scheduling preempts often. A machine
runs one-token decode steps or decode blocks of up to 3 steps (its first rule picks which).

The simulated device plays every plan's KV writes into its pages, in dispatch order: the "KV" at a position
is the whole token prefix up to it, so reading a page through the page table tells whether it holds this
request's own prefix (a wrong prefix-cache hit, a page reused while still in use or a stale page would not).
Tokens the plan takes from the previous step (`from_prev`) are fed from the token the device sampled last
for the slot, as on the device. A decode block's row feeds each step the token the step before sampled and
stops on the device at a stop id, its later steps writing nothing and sampling garbage. A request the device
stopped early may already sit in the next plan (scheduled before the tokens were read): that row computes
garbage (it writes poison into its pages) and its tokens must be discarded.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jinfer.engine.config import EngineConfig
from jinfer.engine.request import Request, Status
from jinfer.engine.scheduler import Scheduler
from jinfer.engine.step_plan import StepPlan
from jinfer.inputs import SamplingParams

SLOTS, PAGE_SIZE, NUM_PAGES, MAX_LEN, EOS, MAX_STEPS = 3, 2, 8, 12, 3, 3
GARBAGE = 9  # what the device leaves in a row's steps past its end (never a vocabulary token here)
POISON = ("garbage",)  # the KV a row computes past a stop the device saw (never a true prefix)


def config(decode_steps: int) -> EngineConfig:
    return EngineConfig(max_slots=SLOTS, page_size=PAGE_SIZE, num_pages=NUM_PAGES, token_buckets=(4, 8),
                        max_prefill_chunk=4, max_waiting=256, decode_steps=decode_steps).resolve("cpu")


# What the device samples for one dispatch, read as i32[MAX_STEPS, SLOTS]: step j of row r is [j, r];
# EOS one time in five. Hypothesis favours simple lists (of the first choice), so half of them come from a seeded
# generator instead, which keeps the odds, and with them stops within decode blocks.
TOKEN_CHOICES = (1, 2, 1, 2, EOS)
SAMPLED = (st.lists(st.sampled_from(TOKEN_CHOICES), min_size=MAX_STEPS * SLOTS, max_size=MAX_STEPS * SLOTS)
           | st.integers(0, 2**32 - 1).map(
               lambda seed: np.random.default_rng(seed).choice(TOKEN_CHOICES, MAX_STEPS * SLOTS).tolist()))
PROMPT = st.lists(st.sampled_from((1, 2)), min_size=1, max_size=8)
PICK = st.integers(0, 63)  # which of the candidate requests a rule acts on (modulo their number)


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self, decode_steps: int = MAX_STEPS):
        super().__init__()
        self._reset(decode_steps)

    def _reset(self, decode_steps: int):
        self.config = config(decode_steps)
        self.s = Scheduler(self.config, MAX_LEN, NUM_PAGES, eos_token_ids=(EOS,))
        self.added: dict[str, Request] = {}
        self.sampled_for: dict[str, list[int]] = {}  # every token the device sampled for a request, in order
        self.kv: dict[int, list[tuple | None]] = {}  # page -> per offset: the prefix its KV encodes
        self.last_sampled: dict[int, int] = {}  # slot -> the token the device sampled last for it
        self.last_plan: StepPlan | None = None  # the step dispatched last
        self.stopped_on_device: set[str] = set()  # requests a decode block stopped before their last step
        # Dispatched, its tokens not yet read: the plan, its tokens, the requests whose rows computed garbage.
        self.inflight: tuple[StepPlan, np.ndarray, set[str]] | None = None
        self.reasons: dict[str, str] = {}  # finish reasons as first seen: a request ends once
        self.stopped_by_string: set[str] = set()
        self.blocks = self.early_stops = self.garbage_rows = 0  # what the runs reached

    # ---- rules ---------------------------------------------------------------------------------

    @initialize(decode_steps=st.sampled_from((MAX_STEPS, MAX_STEPS, 1)),
                first=st.lists(st.tuples(PROMPT, st.integers(1, 8), st.booleans()), max_size=SLOTS))
    def start(self, decode_steps: int, first: list[tuple[list[int], int, bool]]):
        """Picks one-token decode steps or decode blocks, and the requests waiting at the start."""
        self._reset(decode_steps)
        for prompt, max_tokens, ignore_eos in first:
            self.add_request(prompt, max_tokens, ignore_eos)

    @rule(prompt=PROMPT, max_tokens=st.integers(1, 8),
          ignore_eos=st.booleans(), stop_on_two=st.sampled_from((False, False, True)))
    def add_request(self, prompt: list[int], max_tokens: int, ignore_eos: bool, stop_on_two: bool = False):
        # A prompt of at most 11 tokens (8 here, 11 for a next turn), then outputs up to the context of 12: 6
        # pages, within the pool of 7.
        rid = f"r{len(self.added)}"
        sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos,
                                  stop_token_ids=(2,) if stop_on_two else ())
        self.added[rid] = self.s.add(rid, prompt, sampling, seed=len(self.added))
        self.sampled_for[rid] = []

    @rule(pick=PICK, keep=st.integers(2, 8), extra=st.lists(st.sampled_from((1, 2)), max_size=2),
          max_tokens=st.integers(1, 8))
    def add_follow_up(self, pick: int, keep: int, extra: list[int], max_tokens: int):
        """A next turn: an earlier request's prompt and output so far, cut short, then more tokens."""
        if self.added:
            earlier = list(self.added.values())[pick % len(self.added)]
            self.add_request((earlier.known_ids()[:keep] + extra)[:8], max_tokens, ignore_eos=True)

    @rule(pick=PICK, extra=st.lists(st.sampled_from((1, 2)), min_size=1, max_size=2), max_tokens=st.integers(1, 4),
          ignore_eos=st.booleans())
    def add_next_turn(self, pick: int, extra: list[int], max_tokens: int, ignore_eos: bool):
        """A next turn after a finished request: its whole sequence, stop token included, then more tokens (at
        most MAX_LEN - 1 in all). Its prefix hits read every page the earlier request left to the cache, so a
        page indexed with a position its decode block never computed (a stop on the device) would show."""
        done = sorted((r for r in self.added.values() if r.finished and r.output_ids), key=lambda r: -r.token_times[-1])
        if done:  # the latest to receive its last token first, while its pages are likely still cached
            earlier = done[pick % len(done)]
            self.add_request((earlier.known_ids() + extra)[:MAX_LEN - 1], max_tokens, ignore_eos)

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
        launched = None if plan is None else (plan, *self._run_on_device(plan, tokens))
        if self.inflight is not None:
            self._update(*self.inflight)
        self.inflight = launched

    @precondition(lambda self: self.inflight is None)
    @rule(tokens=SAMPLED)
    def synchronous_step(self, tokens: list[int]):
        plan = self._schedule()
        if plan is not None:
            self._update(plan, *self._run_on_device(plan, tokens))

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
        """The engine ends a request whose text matched a stop string, maybe with its next tokens in flight."""
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

    def _kv_at(self, table: np.ndarray, pos: int) -> tuple | None:
        return self.kv.get(int(table[pos // PAGE_SIZE]), [None] * PAGE_SIZE)[pos % PAGE_SIZE]

    def _write_kv(self, table: np.ndarray, pos: int, value: tuple) -> None:
        page = int(table[pos // PAGE_SIZE])
        assert page != 0  # page 0 only pads
        self.kv.setdefault(page, [None] * PAGE_SIZE)[pos % PAGE_SIZE] = value

    def _check_plan(self, plan: StepPlan) -> None:
        """The plan's shape: one row per scheduled request, its tokens in a run, and a decode block exactly
        when no request is admitted and every row has one token to feed."""
        cfg, rows, R = self.config, plan.rows, plan.num_rows
        assert 0 < plan.num_tokens <= cfg.max_step_tokens and 0 < R <= SLOTS
        assert [x.row for x in plan.scheduled] == list(range(R))
        slots = [x.slot for x in plan.scheduled]
        assert len(set(slots)) == len(slots) and rows.slot.tolist() == slots
        assert rows.sample.tolist() == [x.samples for x in plan.scheduled]
        assert rows.query_len.sum() == plan.num_tokens and (rows.query_len > 0).all()
        assert rows.query_start.tolist() == (np.cumsum(rows.query_len) - rows.query_len).tolist()
        assert plan.tokens.row.tolist() == np.repeat(np.arange(R), rows.query_len).tolist()
        admitted = [x for x in plan.scheduled if rows.reset[x.row] or x.num_precomputed or x.num_imported]
        if plan.decode:
            assert not admitted and (rows.query_len == 1).all() and rows.sample.all()
            assert all(x.num_tokens == x.num_samples == rows.num_steps[x.row] for x in plan.scheduled)
            assert 1 <= plan.max_steps <= cfg.decode_steps
        else:
            assert (rows.num_steps == 1).all() and plan.max_steps == 1
            assert admitted or any(x.num_tokens > 1 or not x.samples for x in plan.scheduled)
            assert all(x.num_samples == int(x.samples) for x in plan.scheduled)
        for x in plan.scheduled:
            stop = sorted(x.request.stop_ids)
            assert rows.stop_ids[x.row].tolist() == stop + [-1] * (self.s.stop_width - len(stop))

    def _run_on_device(self, plan: StepPlan, tokens: list[int]) -> tuple[np.ndarray, set[str]]:
        """Checks a freshly scheduled plan and plays its KV writes; returns what the device samples, i32[N, R],
        and the requests whose rows computed garbage (scheduled past a stop the device saw)."""
        self._check_plan(plan)
        draws = np.array(tokens, np.int32).reshape(MAX_STEPS, SLOTS)
        rows, cfg = plan.rows, self.config
        sampled = np.full((plan.max_steps, plan.num_rows), GARBAGE, np.int32)
        garbage: set[str] = set()
        for item in plan.scheduled:
            req, slot, r, start, n = item.request, item.slot, item.row, item.start, item.num_tokens
            rid = req.request_id
            assert req.status is Status.RUNNING and self.s.slots[slot] is req
            # Never a token past max_tokens or the context: a request at its limit waits for its last token.
            assert req.num_sampled <= req.sampling.max_tokens and req.num_tokens <= MAX_LEN
            fed = int(rows.query_len[r])
            if plan.decode:
                # As many steps as max_tokens, the context and decode_steps allow, unless short of pages: then
                # it took every page to be had without preempting, and its steps fill its pages exactly.
                bound = min(cfg.decode_steps, req.sampling.max_tokens - int(rows.gen_index[r]), MAX_LEN - (start + 1))
                assert 1 <= n <= bound
                if n < bound:
                    assert len(req.pages) * PAGE_SIZE == start + n
                    assert self.s.allocator.num_free == 0 and self.s.prefix_cache.num_evictable == 0
            else:
                assert 0 < n == fed <= cfg.max_prefill_chunk
            assert rows.kv_len[r] == start + fed
            if item.samples:
                assert start + n == req.num_tokens - 1  # the token sampled after the last one computed is the next
            table = rows.page_table[r]
            assert table[:len(req.pages)].tolist() == req.pages and not table[len(req.pages):].any()
            for i in range(fed):
                t, p = int(rows.query_start[r]) + i, start + i
                assert plan.tokens.positions[t] == p and plan.tokens.is_output[t] == (p >= len(req.prompt_ids))
                if plan.tokens.from_prev[t]:
                    # The previous step sampled it for this very slot and request; the device feeds it on.
                    prev = [x for x in self.last_plan.scheduled if x.request is req]
                    assert len(prev) == 1 and prev[0].samples
                    assert p == len(req.prompt_ids) + self.last_plan.rows.gen_index[prev[0].row] + prev[0].num_samples - 1
            truth = req.prompt_ids + self.sampled_for[rid]
            if rid in self.stopped_on_device:
                # The device stopped this request before its last step, and this plan was scheduled before
                # that was read: the row computes garbage (its update is discarded, the request having ended).
                assert self.inflight is not None and any(x.request is req for x in self.inflight[0].scheduled)
                garbage.add(rid)
                self.garbage_rows += 1
                for p in range(start, start + (n if plan.decode else fed)):
                    self._write_kv(table, p, POISON)
                sampled[:n if plan.decode else 1, r] = draws[:n if plan.decode else 1, r]
                continue
            assert start + fed <= len(truth), f"{rid} computes position {start + fed - 1} before its token exists"
            # Attention reads every earlier position through the page table: each must hold this prefix.
            for q in range(start):
                assert self._kv_at(table, q) == tuple(truth[:q + 1]), (rid, q)
            for i in range(fed):
                t, p = int(rows.query_start[r]) + i, start + i
                value = self.last_sampled[slot] if plan.tokens.from_prev[t] else int(plan.tokens.ids[t])
                assert value == truth[p], (rid, p)
                self._write_kv(table, p, tuple(truth[:p + 1]))
            if not item.samples:
                continue
            assert rows.gen_index[r] == len(self.sampled_for[rid])
            # Each step samples one token; a decode block's next step feeds it (its KV written at the next
            # position) unless it is a stop id, which ends the row's steps on the device.
            for j in range(n if plan.decode else 1):
                if j > 0:
                    p = start + j
                    self._write_kv(table, p, tuple(truth[:p + 1]))
                tok = int(draws[j, r])
                sampled[j, r] = tok
                self.sampled_for[rid].append(tok)
                truth.append(tok)
                self.last_sampled[slot] = tok
                if plan.decode and tok in req.stop_ids:
                    if j + 1 < n:
                        self.stopped_on_device.add(rid)
                        self.early_stops += 1
                    break
        self.blocks += plan.decode and plan.max_steps > 1
        self.last_plan = plan
        return sampled, garbage

    def _update(self, plan: StepPlan, sampled: np.ndarray, garbage: set[str]):
        # A row scheduled past a stop the device saw belongs to a request that has ended since.
        assert all(x.request.finished for x in plan.scheduled if x.request.request_id in garbage)
        receiving = [x for x in plan.scheduled if x.samples and not x.request.finished]
        had = {id(x.request): len(x.request.output_ids) for x in receiving}
        assert self.s.update(plan, sampled) == [x.request for x in receiving]
        for x in receiving:
            # It takes its row's tokens step by step, up to and including one that ends it.
            req = x.request
            n_out, want, reason = had[id(req)], [], None
            for j in range(x.num_samples):
                want.append(int(sampled[j, x.row]))
                if want[-1] in req.stop_ids:
                    reason = "stop"
                elif n_out + len(want) == req.sampling.max_tokens or len(req.prompt_ids) + n_out + len(want) == MAX_LEN:
                    reason = "length"
                if reason:
                    break
            assert GARBAGE not in want and req.output_ids[n_out:] == want, (req.request_id, req.output_ids, want)
            assert req.finish_reason == reason, (req.request_id, req.finish_reason, reason)

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
        inflight = {} if self.inflight is None else {id(x.request): x.num_samples for x in self.inflight[0].scheduled}
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
                # Only the tokens the in-flight step samples for it are still on the device.
                assert r.num_sampled - len(r.output_ids) == inflight.get(id(r), 0)

    @invariant()
    def prefix_stats_are_consistent(self):
        st_ = self.s.prefix_cache.stats
        assert 0 <= st_.hit_tokens <= st_.queried_tokens

    def teardown(self):
        # Drain without stop tokens: everything finishes by length and every page comes back.
        for _ in range(20 + 20 * len(self.added)):  # a request needs at most ~11 steps, 3 run at once
            if not (self.s.has_work or self.inflight):
                break
            self.engine_step([1] * (MAX_STEPS * SLOTS))
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
    for decode_steps in (1, MAX_STEPS):
        m = SchedulerMachine(decode_steps)
        for _ in range(3):
            m.add_request([1, 2] * 5, max_tokens=8, ignore_eos=True)
        from_prev = 0
        for _ in range(12):
            m.engine_step([1] * (MAX_STEPS * SLOTS))
            from_prev += int(m.last_plan.tokens.from_prev.sum())
        m.add_request([1, 2] * 5, max_tokens=2, ignore_eos=True)
        m.teardown()
        assert m.s.num_preemptions > 0 and m.s.prefix_cache.stats.hit_tokens > 0 and from_prev > 0


def test_the_machine_reaches_device_stops_in_decode_blocks_and_discards_the_lookahead():
    """A block's row stops on EOS at its second step while the engine has already scheduled the next block
    for it: the row past the stop computes garbage, which the update discards; and a next turn reads the
    pages the stopped request left to the prefix cache (only those its block computed)."""
    m = SchedulerMachine(MAX_STEPS)
    m.add_request([1, 2, 1], max_tokens=8, ignore_eos=False)
    m.add_request([2, 1], max_tokens=8, ignore_eos=True)
    m.engine_step([1] * (MAX_STEPS * SLOTS))  # both prefill
    # The block: row 0 samples 1, then EOS (stopping there); row 1 ignores EOS and runs its 3 steps.
    m.engine_step([1, 1, 1, EOS, EOS, 1, 2, 2, 2])
    assert m.last_plan.decode and m.last_plan.rows.num_steps.tolist() == [MAX_STEPS, MAX_STEPS]
    m.engine_step([1] * (MAX_STEPS * SLOTS))  # the next block, scheduled before the stop is read
    a, b = m.added.values()
    assert a.finished and a.finish_reason == "stop" and a.known_ids() == [1, 2, 1, 1, 1, EOS]
    assert m.blocks == 2 and m.early_stops == 1 and m.garbage_rows == 1 and not b.finished
    # a's positions 0..4 are computed, 5 (its EOS) is not: the prefix cache keeps its first two pages, not the
    # third, and a next turn (b cancelled, to leave it the pages) reads those two.
    m.cancel(1)
    m.add_next_turn(0, [2], max_tokens=2, ignore_eos=True)
    m.engine_step([1] * (MAX_STEPS * SLOTS))
    assert m.added["r2"].prompt_ids == [1, 2, 1, 1, 1, EOS, 2] and m.added["r2"].num_cached_prompt == 4
    m.teardown()
