"""Scheduler: the plans it builds, admission, preemption, prefix hits and finishing, checked by hand (host only).

The configurations are tiny (pages of 2 or 4 tokens, a few pages, one or two slots) so that every page
number and position below can be worked out on paper; the comments show the working.
"""

from __future__ import annotations

import numpy as np
import pytest

from jinfer.engine.config import EngineConfig
from jinfer.engine.request import Request, Status
from jinfer.engine.scheduler import QueueFull, Scheduler
from jinfer.engine.step_plan import Scheduled, StepPlan
from jinfer.inputs import MAX_STOP_TOKEN_IDS, SamplingParams


def make(num_pages: int = 32, max_model_len: int = 64, eos: tuple[int, ...] = (), **cfg) -> Scheduler:
    """One-token decode steps (decode_steps=1) unless a test asks for decode blocks."""
    kw = {"max_slots": 2, "page_size": 4, "token_buckets": (8, 16), "max_prefill_chunk": 16, "decode_steps": 1, **cfg}
    return Scheduler(EngineConfig(num_pages=num_pages, **kw).resolve("cpu"), max_model_len, num_pages, eos)


def add(s: Scheduler, rid: str, prompt: list[int], **sampling):
    return s.add(rid, prompt, SamplingParams(**sampling), seed=7)


def item_of(plan: StepPlan, req: Request) -> Scheduled:
    (item,) = [x for x in plan.scheduled if x.request is req]
    return item


def row_of(plan: StepPlan, req: Request) -> int:
    return item_of(plan, req).row


def sampled(plan: StepPlan, tok: int | dict[Request, int | list[int]], fill: int = 0) -> np.ndarray:
    """What the device samples for `plan`, i32[N, R] (N: a decode block's steps, else 1): one id for every row
    and step, or {request: its id, or its ids step by step}; the entries not given hold `fill`."""
    out = np.full((max(plan.max_steps, 1), plan.num_rows), fill, np.int32)
    if isinstance(tok, dict):
        for req, ids in tok.items():
            ids = np.atleast_1d(ids)
            out[:len(ids), row_of(plan, req)] = ids
    else:
        out[:] = tok
    return out


def step(s: Scheduler, tok: int | dict[Request, int | list[int]]) -> StepPlan:
    """Schedules one step, "runs" it and reads its tokens at once (no lookahead)."""
    plan = s.schedule()
    s.update(plan, sampled(plan, tok))
    return plan


def positions_of(plan: StepPlan, req: Request) -> list[int]:
    return plan.tokens.positions[plan.tokens.row == row_of(plan, req)].tolist()


# ---- the plan of one step ----------------------------------------------------------------------


def test_nothing_to_do_gives_no_plan():
    s = make()
    assert s.schedule() is None and not s.has_work


def test_prefill_is_chunked_by_max_prefill_chunk_and_samples_after_the_last_chunk():
    s = make(max_prefill_chunk=4)
    r = add(s, "a", list(range(10, 20)))  # 10 tokens: chunks of 4, 4, 2
    expected = [([10, 11, 12, 13], False, 1), ([14, 15, 16, 17], False, 2), ([18, 19], True, 3)]
    for tokens, samples, num_pages in expected:
        plan = s.schedule()
        assert not plan.decode and plan.tokens.ids.tolist() == tokens
        assert positions_of(plan, r) == [t - 10 for t in tokens]
        row = row_of(plan, r)
        assert plan.rows.sample[row] == samples and plan.scheduled[0].samples == samples
        assert plan.rows.kv_len[row] == tokens[-1] - 10 + 1
        assert len(r.pages) == num_pages  # pages of 4 tokens are allocated as the chunks reach them
        s.update(plan, sampled(plan, 99))
    assert r.output_ids == [99]
    assert plan.rows.gen_index[row] == 0 and not plan.tokens.is_output.any()


def test_one_step_stays_within_the_token_budget():
    s = make(token_buckets=(8,), max_prefill_chunk=8)
    a = add(s, "a", [1] * 6)
    b = add(s, "b", [2] * 6)
    plan = s.schedule()
    # The budget is the largest bucket, 8: a takes 6, b the remaining 2.
    assert plan.num_tokens == 8
    ra, rb = row_of(plan, a), row_of(plan, b)
    assert (plan.rows.query_start[ra], plan.rows.query_len[ra]) == (0, 6)
    assert (plan.rows.query_start[rb], plan.rows.query_len[rb]) == (6, 2)
    assert plan.rows.sample[ra] and not plan.rows.sample[rb]
    s.update(plan, sampled(plan, 5))
    plan = s.schedule()
    # Decode and the rest of a prefill share the step: a decodes 1 token, b prefills its last 4.
    assert not plan.decode
    assert positions_of(plan, a) == [6]
    assert positions_of(plan, b) == [2, 3, 4, 5]
    assert plan.rows.sample.tolist() == [True, True]


def test_decode_feeds_the_sampled_token_back_as_a_generated_token():
    s = make()
    r = add(s, "a", [1, 2, 3])
    step(s, 40)
    plan = s.schedule()
    assert plan.decode and plan.rows.num_steps.tolist() == [1]  # decode_steps=1: a block of one step
    assert plan.tokens.ids.tolist() == [40] and positions_of(plan, r) == [3]
    assert plan.tokens.is_output.tolist() == [True] and not plan.tokens.from_prev.any()
    row = row_of(plan, r)
    assert plan.rows.gen_index[row] == 1 and plan.rows.kv_len[row] == 4
    s.update(plan, sampled(plan, 41))
    assert r.output_ids == [40, 41]


def test_a_token_still_in_flight_is_taken_from_the_previous_step():
    # The engine schedules step N+1 before it reads step N's tokens.
    s = make()
    r = add(s, "a", [1, 2, 3])
    first = s.schedule()
    second = s.schedule()
    assert r.num_sampled == 2 and r.output_ids == []
    assert second.tokens.from_prev.tolist() == [True] and second.tokens.ids.tolist() == [0]
    assert positions_of(second, r) == [3] and second.rows.gen_index[row_of(second, r)] == 1
    assert s.update(first, sampled(first, 40)) == [r]
    third = s.schedule()  # 40 is known now; 41 is in flight
    assert third.tokens.from_prev.tolist() == [True] and positions_of(third, r) == [4]
    s.update(second, sampled(second, 41))
    s.update(third, sampled(third, 42))
    assert r.output_ids == [40, 41, 42]


def test_per_row_arrays_carry_each_scheduled_request_and_nothing_else():
    s = make(max_slots=3, eos=(99,))
    a = s.add("a", [1, 2, 3, 4, 5], SamplingParams(temperature=0.5, top_k=3, top_p=0.9, min_p=0.1,
                                                     repetition_penalty=1.2, presence_penalty=0.5,
                                                     frequency_penalty=-0.5, stop_token_ids=(7, 3)), seed=123)
    b = s.add("b", [6], SamplingParams(ignore_eos=True, logprobs=2), seed=5)
    plan = s.schedule()
    # One row per scheduled request, in the order of `scheduled`; a plan has no idle rows (the runner pads
    # rows up to the bucket, with SamplingInputs.NEUTRAL and slot max_slots).
    assert (a.slot, b.slot) == (0, 1) and [(x.request, x.row) for x in plan.scheduled] == [(a, 0), (b, 1)]
    assert plan.num_rows == 2 and plan.rows.slot.tolist() == [0, 1]
    np.testing.assert_allclose(plan.sampling.temperature, [0.5, 1])
    assert plan.sampling.top_k.tolist() == [3, 0] and plan.sampling.seed.tolist() == [123, 5]
    np.testing.assert_allclose(plan.sampling.top_p, [0.9, 1])
    np.testing.assert_allclose(plan.sampling.min_p, [0.1, 0])
    np.testing.assert_allclose(plan.sampling.repetition_penalty, [1.2, 1])
    np.testing.assert_allclose(plan.sampling.presence_penalty, [0.5, 0])
    np.testing.assert_allclose(plan.sampling.frequency_penalty, [-0.5, 0])
    assert plan.sampling.logprobs.tolist() == [False, True] and plan.wants_logprobs
    # 64 tokens of context in pages of 4: 16 columns; a's two pages, b's one, then padding with page 0.
    assert plan.rows.page_table.shape == (2, 16)
    assert plan.rows.page_table.tolist() == [[1, 2] + [0] * 14, [3] + [0] * 15]
    assert plan.rows.reset.tolist() == [True, True]  # new occupants: clear their slots' penalty counts
    assert plan.rows.num_steps.tolist() == [1, 1]
    # Stop ids, sorted and padded with -1 to a fixed width (every stop_token_ids entry plus every EOS id);
    # b ignores EOS and has no stop ids.
    assert plan.rows.stop_ids.shape == (2, MAX_STOP_TOKEN_IDS + 1)
    assert plan.rows.stop_ids[0, :4].tolist() == [3, 7, 99, -1] and (plan.rows.stop_ids[0, 3:] == -1).all()
    assert (plan.rows.stop_ids[1] == -1).all()
    s.update(plan, sampled(plan, 9))
    assert not s.schedule().rows.reset.any()


# ---- admission ---------------------------------------------------------------------------------


def test_admission_is_first_come_first_served_into_free_slots():
    s = make(max_slots=2)
    reqs = [add(s, f"r{i}", [i + 1] * 3, max_tokens=1) for i in range(3)]
    plan = s.schedule()
    assert [x.request for x in plan.scheduled] == reqs[:2]
    assert [r.slot for r in reqs] == [0, 1, None] and s.waiting == [reqs[2]]
    s.update(plan, sampled(plan, 9))  # max_tokens=1: both finish and free their slots
    plan = s.schedule()
    assert [x.request for x in plan.scheduled] == [reqs[2]] and reqs[2].slot == 0


def test_admission_stops_at_the_first_request_that_does_not_fit():
    s = make(num_pages=6, page_size=2)  # 5 usable pages
    add(s, "big0", [1] * 5, max_tokens=1)  # 3 pages
    big = add(s, "big1", [2] * 5, max_tokens=1)  # 3 more: only 2 left
    small = add(s, "small", [3], max_tokens=1)  # 1 page would fit, but it arrived later
    plan = s.schedule()
    assert [x.request.request_id for x in plan.scheduled] == ["big0"]
    assert s.waiting == [big, small] and s.allocator.num_free == 2


def test_add_rejects_a_reused_id_a_full_queue_and_imports_that_leave_nothing_to_compute():
    # Prompt lengths, vocabulary and pool size are checked at the edge (jinfer.inputs), not here.
    s = make(max_waiting=2)
    add(s, "a", [1])
    with pytest.raises(ValueError, match="request_id='a' is already in use"):
        add(s, "a", [1])
    with pytest.raises(ValueError, match=r"num_imported=3 must be an integer in \[0, 3\)"):
        s.add("b", [1, 2, 3], SamplingParams(), seed=0, num_imported=3)
    add(s, "b", [1])
    with pytest.raises(QueueFull, match="waiting queue is full"):
        add(s, "c", [1])
    assert list(s.requests) == ["a", "b"]


# ---- finishing ---------------------------------------------------------------------------------


def assert_gone(s: Scheduler, r, reason: str):
    assert r.status is Status.FINISHED and r.finish_reason == reason
    assert r.pages == [] and r.slot is None and r.request_id not in s.requests
    assert r not in s.running and r not in s.waiting and all(x is not r for x in s.slots)


def test_finish_on_eos_frees_slot_and_pages():
    s = make(eos=(99,))
    r = add(s, "a", [1, 2, 3, 4, 5])
    step(s, 7)
    plan = s.schedule()
    touched = s.update(plan, sampled(plan, 99))
    assert touched == [r] and r.output_ids == [7, 99]  # the stop token is recorded, then the request ends
    assert_gone(s, r, "stop")
    assert s.allocator.num_free == s.allocator.usable_pages - s.prefix_cache.num_evictable
    assert not s.has_work and s.schedule() is None


def test_ignore_eos_keeps_going_but_stop_token_ids_still_stop():
    s = make(eos=(99,))
    r = add(s, "a", [1, 2, 3], ignore_eos=True, stop_token_ids=(42,))
    step(s, 99)
    assert r.status is Status.RUNNING
    step(s, 42)
    assert_gone(s, r, "stop")


def test_finish_on_max_tokens():
    s = make()
    r = add(s, "a", [1, 2, 3], max_tokens=2)
    step(s, 5)
    assert r.status is Status.RUNNING
    step(s, 6)
    assert r.output_ids == [5, 6]
    assert_gone(s, r, "length")


def test_finish_on_context_length():
    s = make(max_model_len=8)
    r = add(s, "a", [1] * 6, max_tokens=100)
    step(s, 5)
    step(s, 6)
    assert len(r.prompt_ids) + len(r.output_ids) == 8
    assert_gone(s, r, "length")


def test_a_request_at_its_length_limit_is_not_scheduled_again_while_its_last_token_is_in_flight():
    s = make()
    r = add(s, "a", [1, 2, 3], max_tokens=2)
    first, second = s.schedule(), s.schedule()
    assert s.schedule() is None  # both tokens sampled (in flight): nothing left to compute
    assert r.status is Status.RUNNING  # it still holds its slot until the tokens reach the host
    s.update(first, sampled(first, 5))
    s.update(second, sampled(second, 6))
    assert_gone(s, r, "length")


def test_the_token_of_a_step_scheduled_before_the_stop_is_discarded():
    s = make(eos=(99,))
    r = add(s, "a", [1, 2, 3])
    first, second = s.schedule(), s.schedule()
    s.update(first, sampled(first, 99))
    assert_gone(s, r, "stop")
    assert s.update(second, sampled(second, 7)) == []
    assert r.output_ids == [99]


def test_cancel_a_waiting_or_running_request():
    s = make(max_slots=1)
    run = add(s, "run", [1, 2, 3])
    wait = add(s, "wait", [4, 5, 6])
    plan = s.schedule()
    assert s.cancel("wait") and s.cancel("run")
    assert_gone(s, wait, "cancelled")
    assert_gone(s, run, "cancelled")
    assert not s.cancel("run") and not s.cancel("nobody")
    assert s.update(plan, sampled(plan, 7)) == [] and run.output_ids == []  # its in-flight token is dropped
    assert s.allocator.num_free == s.allocator.usable_pages and (s.allocator.refcount == 0).all()


# ---- preemption --------------------------------------------------------------------------------


def two_decoding(s: Scheduler):
    """a (3 tokens) and b (4 tokens) in a pool of 5 pages of 2 tokens: after two steps a holds pages
    [1, 2], b holds [3, 4, 5] (its decode at position 4 opened a third page) and none is free."""
    a = add(s, "a", [1, 2, 3], max_tokens=3)
    b = add(s, "b", [4, 5, 6, 7], max_tokens=3)
    step(s, {a: 10, b: 20})
    step(s, {a: 11, b: 21})
    assert (a.pages, b.pages, s.allocator.num_free) == ([1, 2], [3, 4, 5], 0)
    return a, b


def test_out_of_pages_preempts_the_newest_running_request():
    s = make(num_pages=6, page_size=2, token_buckets=(8,), enable_prefix_caching=False)
    a, b = two_decoding(s)
    plan = s.schedule()
    # a's decode at position 4 needs a third page: b, the newest, gives all of its pages back and waits.
    assert [x.request for x in plan.scheduled] == [a]
    assert b.status is Status.WAITING and b.pages == [] and b.slot is None and b.num_computed == 0
    assert (b.num_preemptions, s.num_preemptions) == (1, 1)
    assert s.waiting == [b] and s.running == [a]
    assert a.pages == [1, 2, 3]  # b released 5, 4, 3 in that order; LIFO hands back 3 first
    assert b.output_ids == [20, 21]  # its tokens are kept, to be recomputed
    s.update(plan, sampled(plan, {a: 12}))
    assert_gone(s, a, "length")
    # b recomputes its prompt and both outputs in one chunk and samples its third token.
    plan = s.schedule()
    assert plan.tokens.ids.tolist() == [4, 5, 6, 7, 20, 21] and not plan.tokens.from_prev.any()
    assert plan.tokens.is_output.tolist() == [False] * 4 + [True] * 2
    row = row_of(plan, b)
    assert plan.rows.sample[row] and plan.rows.gen_index[row] == 2 and plan.rows.reset[row]
    s.update(plan, sampled(plan, 22))
    assert b.output_ids == [20, 21, 22]
    assert_gone(s, b, "length")


def test_a_request_that_needs_a_page_and_finds_no_victim_preempts_itself():
    s = make(num_pages=6, page_size=2, token_buckets=(8,), enable_prefix_caching=False)
    a = add(s, "a", [1, 2, 3], max_tokens=3)
    b = add(s, "b", [4, 5, 6], max_tokens=3)
    step(s, {a: 10, b: 20})
    step(s, {a: 11, b: 20})
    assert (a.pages, b.pages, s.allocator.num_free) == ([1, 2], [3, 4], 1)
    plan = s.schedule()
    # Both decode at position 4 and need a third page. a, the oldest, goes first and takes the last one;
    # b's only possible victim is a, already in this plan, so b steps back itself.
    assert [x.request for x in plan.scheduled] == [a] and a.pages == [1, 2, 5]
    assert b.status is Status.WAITING and b.num_preemptions == 1
    # b is not re-admitted into the same plan: its 6 tokens need 3 pages and only its own 2 are free.
    assert s.waiting == [b] and s.allocator.num_free == 2


def test_preempted_request_is_recomputed_from_its_own_cached_pages():
    s = make(num_pages=6, page_size=2, token_buckets=(8,))
    a, b = two_decoding(s)
    # b's full pages 3 and 4 were offered to the prefix cache; page 5 (position 4 only) was not.
    plan = s.schedule()
    assert b.status is Status.WAITING and s.prefix_cache.num_evictable == 2
    assert a.pages == [1, 2, 5]
    s.update(plan, sampled(plan, {a: 12}))
    plan = s.schedule()
    # a's pages: 5 was private and freed; 2 and 1 became evictable. b matches its own [3, 4] and computes
    # only positions 4 and 5 (its two outputs) into the freed page 5.
    assert b.pages == [3, 4, 5] and positions_of(plan, b) == [4, 5]
    assert plan.tokens.ids.tolist() == [20, 21]
    assert b.num_cached_prompt == 0  # only a first admission counts toward the prefix statistics


def test_preempted_with_a_token_in_flight_waits_for_it_and_blocks_later_arrivals():
    s = make(num_pages=6, page_size=2, token_buckets=(8,), enable_prefix_caching=False)
    a = add(s, "a", [1, 2, 3], max_tokens=4)
    b = add(s, "b", [4, 5, 6, 7], max_tokens=4)
    first = s.schedule()
    second = s.schedule()  # b's decode at position 4 takes the last page
    s.update(first, sampled(first, {a: 10, b: 20}))
    c = add(s, "c", [8], max_tokens=1)
    third = s.schedule()  # a needs a page: b is preempted while its second token is still in flight
    assert [x.request for x in third.scheduled] == [a]
    assert b.status is Status.WAITING and (len(b.output_ids), b.num_sampled) == (1, 2)
    # b cannot be recomputed before its in-flight token is known, and c, behind it, is not admitted.
    assert c.status is Status.WAITING and c.slot is None
    assert s.update(second, sampled(second, {a: 11, b: 21})) == [a, b]
    assert b.output_ids == [20, 21] and b.status is Status.WAITING


def test_a_request_waiting_only_for_its_last_token_gives_its_pages_to_a_newer_one():
    s = make(num_pages=4, page_size=2, token_buckets=(8,), enable_prefix_caching=False)  # 3 usable pages
    a = add(s, "a", [1], max_tokens=2)  # page 1
    b = add(s, "b", [2, 2, 2], max_tokens=4)  # pages 2, 3
    first = s.schedule()
    second = s.schedule()  # a samples its last token; b decodes position 3 within its second page
    s.update(first, sampled(first, 5))
    third = s.schedule()
    # b's position 4 needs a page. The only other running request is a, older but at its limit with its
    # last token in flight: it computes nothing more, so taking its page costs no recomputation.
    assert [x.request for x in third.scheduled] == [b] and b.pages == [2, 3, 1]
    assert a.status is Status.WAITING and a.num_preemptions == 1 and s.num_preemptions == 1
    s.update(second, sampled(second, 6))
    assert a.output_ids == [5, 6]
    assert_gone(s, a, "length")


# ---- prefix cache at admission -----------------------------------------------------------------


def test_admission_reuses_cached_full_pages_of_an_equal_prefix():
    s = make()
    a = add(s, "a", list(range(1, 10)))  # 9 tokens: pages 1, 2 full, page 3 partial
    step(s, 50)
    b = add(s, "b", list(range(1, 9)) + [20, 21])  # the same first 8 tokens (2 pages), then different
    plan = s.schedule()
    assert b.pages[:2] == a.pages[:2] and b.pages[2] not in a.pages
    assert s.allocator.refcount[a.pages].tolist() == [2, 2, 1]
    assert positions_of(plan, b) == [8, 9] and b.num_computed == 10
    row = row_of(plan, b)
    assert plan.tokens.ids[plan.tokens.row == row].tolist() == [20, 21]
    assert plan.rows.page_table[row, :3].tolist() == b.pages
    assert b.num_cached_prompt == 8
    stats = s.prefix_cache.stats
    assert (stats.queried_tokens, stats.hit_tokens) == (9 + 10, 0 + 8)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    s = make()
    a = add(s, "a", list(range(1, 9)) + [30], max_tokens=2)  # 9 tokens: pages of [1..4] and [5..8] full
    step(s, 50)
    step(s, 51)
    assert a.finished and s.prefix_cache.num_evictable == 2
    b = add(s, "b", list(range(1, 9)))  # exactly the two cached pages
    plan = s.schedule()
    # Matching both would leave nothing to compute, and the last token's logits give the first output.
    assert b.num_cached_prompt == 4 and positions_of(plan, b) == [4, 5, 6, 7]
    assert plan.rows.sample[row_of(plan, b)]


def test_no_prefix_reuse_when_caching_is_disabled():
    s = make(enable_prefix_caching=False)
    a = add(s, "a", list(range(1, 10)))
    step(s, 50)
    b = add(s, "b", list(range(1, 10)))
    plan = s.schedule()
    assert not set(a.pages) & set(b.pages) and positions_of(plan, b) == list(range(9))
    assert len(s.prefix_cache) == 0 and s.prefix_cache.stats.queried_tokens == 0


def test_cached_pages_are_evicted_before_anyone_is_preempted():
    s = make(num_pages=6, page_size=2, token_buckets=(8,))  # 5 usable pages
    a = add(s, "a", [1, 2, 3, 4, 5], max_tokens=2)  # 3 pages, all full once its first output's KV is computed
    step(s, 9)
    step(s, 9)
    assert a.finished and s.prefix_cache.num_evictable == 3 and s.allocator.num_free == 2
    b = add(s, "b", [6, 7, 8, 9, 10, 11, 12, 13], max_tokens=1)  # 4 pages: two cached pages must go
    plan = s.schedule()
    assert len(b.pages) == 4 and s.num_preemptions == 0
    assert s.prefix_cache.num_evictable == 1 and len(s.prefix_cache) == 1
    # a released its pages last first, so its second page was the LRU victim; its first is still cached.
    s.update(plan, sampled(plan, 9))
    c = add(s, "c", [1, 2, 3, 4, 5, 6])
    s.schedule()
    assert c.num_cached_prompt == 2


def test_a_request_that_finishes_in_its_first_step_still_offers_its_prompt_pages():
    s = make()
    add(s, "a", list(range(1, 10)), max_tokens=1)  # e.g. scoring prompts that share a system prompt
    first = s.schedule()
    assert s.schedule() is None  # the engine schedules the next step before it reads this one's token
    s.update(first, sampled(first, 50))
    b = add(s, "b", list(range(1, 10)))
    s.schedule()
    assert b.num_cached_prompt == 8


# ---- decode blocks -----------------------------------------------------------------------------


def three_decoding():
    """Three requests past their prefill in a context of 12 (pages of 4, decode blocks of up to 4 steps): a
    (3 tokens, max_tokens 16) holds page 1, b (3 tokens, max_tokens 3) page 2, c (10 tokens) pages 3, 4, 5;
    each has sampled one token. Returns the scheduler, the three and the decode block scheduled next."""
    s = make(max_slots=3, decode_steps=4, max_model_len=12)
    a = add(s, "a", [1, 2, 3], logprobs=1)
    b = add(s, "b", [4, 5, 6], max_tokens=3)
    c = add(s, "c", list(range(10, 20)))
    assert not step(s, {a: 10, b: 20, c: 30}).decode  # admissions: a prefill step
    assert (a.pages, b.pages, c.pages) == ([1], [2], [3, 4, 5])
    return s, a, b, c, s.schedule()


def test_a_decode_block_runs_each_row_as_far_as_max_tokens_and_the_context_allow():
    s, a, b, c, plan = three_decoding()
    assert plan.decode
    # a: min(decode_steps 4, max_tokens 16 - 1 sampled, context 12 - 4 tokens) = 4 steps; b: 3 - 1 = 2 left
    # of its max_tokens; c: 12 - 11 = 1 left of the context. Each samples one token per step.
    assert [(x.request, x.row, x.start, x.num_tokens, x.num_samples) for x in plan.scheduled] == [
        (a, 0, 3, 4, 4), (b, 1, 3, 2, 2), (c, 2, 10, 1, 1)]
    assert plan.rows.num_steps.tolist() == [4, 2, 1] and plan.max_steps == 4
    # The plan carries each row's first token only (token r is row r's); the device feeds each later step the
    # token the step before sampled.
    assert plan.num_tokens == 3 and plan.tokens.ids.tolist() == [10, 20, 30]
    assert plan.tokens.row.tolist() == [0, 1, 2] and plan.tokens.positions.tolist() == [3, 3, 10]
    assert plan.tokens.is_output.all() and not plan.tokens.from_prev.any()
    assert plan.rows.query_start.tolist() == [0, 1, 2] and plan.rows.query_len.tolist() == [1, 1, 1]
    assert plan.rows.kv_len.tolist() == [4, 4, 11]  # once the first step's token is written
    assert plan.rows.sample.all() and plan.rows.gen_index.tolist() == [1, 1, 1] and not plan.rows.reset.any()
    # Pages for every step: a writes positions 3..6 (page 1 and a new page 6), b 3..4 (page 2 and a new 7),
    # c position 10 (in its third page already).
    assert (a.pages, b.pages, c.pages) == ([1, 6], [2, 7], [3, 4, 5])
    assert plan.rows.page_table.tolist() == [[1, 6, 0], [2, 7, 0], [3, 4, 5]]
    assert (a.num_sampled, a.num_computed, b.num_sampled, c.num_tokens) == (5, 7, 3, 12)


def test_a_decode_block_takes_only_the_pages_it_can_have_without_preempting():
    s = make(num_pages=6, page_size=2, decode_steps=4, token_buckets=(8,), enable_prefix_caching=False)
    a = add(s, "a", [1, 2, 3])
    b = add(s, "b", [4, 5, 6])
    step(s, {a: 10, b: 20})
    assert (a.pages, b.pages, s.allocator.num_free) == ([1, 2], [3, 4], 1)
    plan = s.schedule()
    # Both feed position 3 (in their second page) and would run 4 steps, writing positions 3..6: two more
    # pages each. a, the oldest, takes the one free page and runs the 3 steps its pages hold (positions
    # 3..5); b finds none and runs 1 step. Nobody is preempted for a block's later steps.
    assert plan.decode and plan.rows.num_steps.tolist() == [3, 1]
    assert (a.pages, b.pages, s.allocator.num_free) == ([1, 2, 5], [3, 4], 0)
    assert s.num_preemptions == 0 and s.running == [a, b]
    s.update(plan, sampled(plan, {a: [11, 12, 13], b: 21}))
    assert (a.output_ids, b.output_ids) == ([10, 11, 12, 13], [20, 21])
    # a's next token, at position 6, needs a fourth page: its first step may still preempt (b, the newest,
    # gives back 4 and 3; LIFO hands a page 3). b's 5 tokens need 3 pages and 1 is left, so nobody is
    # admitted and the plan is a block again, whose later steps take the page that is free: positions 6..9.
    plan = s.schedule()
    assert b.status is Status.WAITING and s.num_preemptions == 1 and s.waiting == [b]
    assert plan.decode and [x.request for x in plan.scheduled] == [a] and plan.rows.num_steps.tolist() == [4]
    assert a.pages == [1, 2, 5, 3, 4] and s.allocator.num_free == 0


def test_update_takes_each_row_its_tokens_step_by_step():
    s, a, b, c, plan = three_decoding()
    # The engine schedules the next block before it reads this one's tokens: b and c are at their limits
    # with their last tokens in flight, so only a goes on, from the token its row samples last.
    ahead = s.schedule()
    assert ahead.decode and [x.request for x in ahead.scheduled] == [a]
    assert ahead.tokens.from_prev.tolist() == [True] and ahead.tokens.positions.tolist() == [7]
    assert ahead.rows.gen_index.tolist() == [5] and ahead.rows.num_steps.tolist() == [4]  # context: 12 - 8
    assert a.pages == [1, 6, 8]  # positions 7..10
    G = 77  # what the device leaves in a row's steps past its end: never read
    tokens = np.array([[11, 21, 31],
                       [12, 22, G],
                       [13, G, G],
                       [14, G, G]], np.int32)  # i32[N steps, R rows]
    assert tokens.shape == sampled(plan, 0).shape
    asked = []
    touched = s.update(plan, tokens, logprobs=lambda j, r: asked.append((j, r)) or (j, r))
    assert touched == [a, b, c]
    assert a.output_ids == [10, 11, 12, 13, 14] and a.status is Status.RUNNING
    assert a.logprobs == [(0, 0), (1, 0), (2, 0), (3, 0)] and asked == a.logprobs  # only a asked for them
    assert b.output_ids == [20, 21, 22]
    assert_gone(s, b, "length")  # max_tokens
    assert c.output_ids == [30, 31]
    assert_gone(s, c, "length")  # the context
    assert s.update(ahead, sampled(ahead, {a: [15, 16, 17, 18]})) == [a]
    assert a.output_ids == [10, 11, 12, 13, 14, 15, 16, 17, 18] and len(a.known_ids()) == 12
    assert_gone(s, a, "length")


def test_a_row_that_samples_a_stop_token_stops_early_and_indexes_only_computed_pages():
    s = make(eos=(99,), page_size=2, decode_steps=4)
    a = add(s, "a", [1, 2, 3])
    b = add(s, "b", [7, 8], ignore_eos=True)
    step(s, {a: 10, b: 20})  # a holds pages 1, 2 and b page 3; the full pages 1 and 3 are indexed
    computed = s.num_computed_tokens
    plan = s.schedule()
    assert plan.decode and plan.rows.num_steps.tolist() == [4, 4]
    # b's first step (position 2) takes page 4, then the later steps a's 5, 6 (positions 3..6), b's 7 (2..5).
    assert (a.pages, b.pages) == ([1, 2, 5, 6], [3, 4, 7])
    assert plan.rows.stop_ids[0, :2].tolist() == [99, -1] and (plan.rows.stop_ids[1] == -1).all()
    # On the device a's row samples 11, then 99, a stop id, and runs no further (its later steps hold
    # garbage, 55); b's row ignores EOS and runs its 4 steps.
    tokens = sampled(plan, {a: [11, 99], b: [21, 99, 22, 23]}, fill=55)
    assert s.update(plan, tokens) == [a, b]
    assert a.output_ids == [10, 11, 99]  # up to and including the stop token
    assert_gone(s, a, "stop")
    assert b.output_ids == [20, 21, 99, 22, 23] and b.status is Status.RUNNING
    assert s.num_computed_tokens == computed + 2 + 4  # a's row ran 2 of its 4 steps, b's all 4
    # a's row computed positions 3 and 4 only (the steps fed 10 and 11): of its pages the prefix cache
    # keeps 1 and 2 (positions 0..3), not 5 (positions 4, 5) although a's known tokens fill it, as
    # position 5 was never written. Pages 5 and 6 went back to the free list.
    assert s.prefix_cache.num_evictable == 2 and len(s.prefix_cache) == 2 + 3  # and b's 3 full pages
    c = add(s, "c", [1, 2, 3, 10, 11, 99, 5])  # may match up to 3 pages (6 tokens)
    plan = s.schedule()
    assert c.num_cached_prompt == 4 and c.pages[:2] == [1, 2] and positions_of(plan, c) == [4, 5, 6]


def test_an_admission_turns_the_next_plan_back_into_a_prefill_step():
    s = make(decode_steps=4)
    a = add(s, "a", [1, 2, 3])
    step(s, 10)
    block = s.schedule()
    assert block.decode and block.rows.num_steps.tolist() == [4]
    b = add(s, "b", [4, 5, 6, 7, 8])  # waits, and a slot is free
    plan = s.schedule()  # scheduled while the block is in flight
    # b's prompt shares the step with a's next token: one token each, as in any prefill step.
    assert not plan.decode and plan.max_steps == 1 and plan.rows.num_steps.tolist() == [1, 1]
    assert [(x.request, x.num_tokens, x.num_samples) for x in plan.scheduled] == [(a, 1, 1), (b, 5, 1)]
    assert positions_of(plan, a) == [7] and plan.tokens.from_prev.tolist() == [True] + [False] * 5
    assert positions_of(plan, b) == [0, 1, 2, 3, 4] and plan.rows.reset.tolist() == [False, True]
    assert plan.rows.gen_index.tolist() == [5, 0]
    assert sampled(plan, 0).shape == (1, 2)
    s.update(block, sampled(block, {a: [11, 12, 13, 14]}))
    s.update(plan, sampled(plan, {a: 15, b: 40}))
    assert a.output_ids == [10, 11, 12, 13, 14, 15] and b.output_ids == [40]
    # Both decode now, and a request waiting without a free slot does not stop the blocks.
    c = add(s, "c", [9])
    plan = s.schedule()
    assert plan.decode and [x.request for x in plan.scheduled] == [a, b] and plan.rows.num_steps.tolist() == [4, 4]
    assert c.status is Status.WAITING and s.waiting == [c]


def test_a_running_request_still_prefilling_keeps_the_step_a_prefill_step():
    s = make(decode_steps=4, max_prefill_chunk=4)
    a = add(s, "a", [1, 2, 3])
    step(s, 10)
    b = add(s, "b", [4, 5, 6, 7, 8, 9])  # chunks of 4 and 2
    plan = step(s, {a: 11})
    assert not plan.decode and [x.num_tokens for x in plan.scheduled] == [1, 4]
    plan = s.schedule()
    # Nobody is admitted, but b still has 2 prompt tokens to compute: a prefill step, a decoding 1 token.
    assert not plan.decode and [(x.request, x.num_tokens) for x in plan.scheduled] == [(a, 1), (b, 2)]
    assert plan.rows.num_steps.tolist() == [1, 1] and positions_of(plan, b) == [4, 5]
    s.update(plan, sampled(plan, {a: 12, b: 40}))
    plan = s.schedule()
    assert plan.decode and plan.rows.num_steps.tolist() == [4, 4]
