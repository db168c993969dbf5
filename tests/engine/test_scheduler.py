"""Scheduler: the plans it builds, admission, preemption, prefix hits and finishing, checked by hand (host only).

The configurations are tiny (pages of 2 or 4 tokens, a few pages, one or two slots) so that every page
number and position below can be worked out on paper; the comments show the working.
"""

from __future__ import annotations

import numpy as np
import pytest

from jinfer.engine.config import EngineConfig
from jinfer.engine.request import Status
from jinfer.engine.scheduler import QueueFull, Scheduler
from jinfer.inputs import SamplingParams


def make(num_pages: int = 32, max_model_len: int = 64, eos: tuple[int, ...] = (), **cfg) -> Scheduler:
    kw = {"max_slots": 2, "page_size": 4, "token_buckets": (8, 16), "max_prefill_chunk": 16, **cfg}
    return Scheduler(EngineConfig(num_pages=num_pages, **kw), max_model_len, num_pages, eos)


def add(s: Scheduler, rid: str, prompt: list[int], **sampling):
    return s.add(rid, prompt, SamplingParams(**sampling), seed=7)


def sampled(s: Scheduler, tok: int | dict[int, int]) -> np.ndarray:
    """The engine's i32[max_slots] of sampled tokens: one id for every slot, or {slot: id}."""
    out = np.zeros(s.config.max_slots, np.int32)
    if isinstance(tok, dict):
        for slot, t in tok.items():
            out[slot] = t
    else:
        out[:] = tok
    return out


def positions_of(plan, slot: int) -> list[int]:
    return plan.tokens.positions[plan.tokens.slot == slot].tolist()


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
        assert plan.tokens.ids.tolist() == tokens
        assert positions_of(plan, r.slot) == [t - 10 for t in tokens]
        assert plan.slots.sample[r.slot] == samples and plan.scheduled[0].samples == samples
        assert plan.slots.kv_len[r.slot] == tokens[-1] - 10 + 1
        assert len(r.pages) == num_pages  # pages of 4 tokens are allocated as the chunks reach them
        s.update(plan, sampled(s, 99))
    assert r.output_ids == [99]
    assert plan.slots.gen_index[r.slot] == 0 and not plan.tokens.is_output.any()


def test_one_step_stays_within_the_token_budget():
    s = make(token_buckets=(8,), max_prefill_chunk=8)
    a = add(s, "a", [1] * 6)
    b = add(s, "b", [2] * 6)
    plan = s.schedule()
    # The budget is the largest bucket, 8: a takes 6, b the remaining 2.
    assert plan.num_tokens == 8
    assert (plan.slots.query_start[a.slot], plan.slots.query_len[a.slot]) == (0, 6)
    assert (plan.slots.query_start[b.slot], plan.slots.query_len[b.slot]) == (6, 2)
    assert plan.slots.sample[a.slot] and not plan.slots.sample[b.slot]
    s.update(plan, sampled(s, 5))
    plan = s.schedule()
    # Decode and the rest of a prefill share the step: a decodes 1 token, b prefills its last 4.
    assert positions_of(plan, a.slot) == [6]
    assert positions_of(plan, b.slot) == [2, 3, 4, 5]
    assert plan.slots.sample.tolist() == [True, True]


def test_decode_feeds_the_sampled_token_back_as_a_generated_token():
    s = make()
    r = add(s, "a", [1, 2, 3])
    s.update(s.schedule(), sampled(s, 40))
    plan = s.schedule()
    assert plan.tokens.ids.tolist() == [40] and positions_of(plan, r.slot) == [3]
    assert plan.tokens.is_output.tolist() == [True] and not plan.tokens.from_prev.any()
    assert plan.slots.gen_index[r.slot] == 1 and plan.slots.kv_len[r.slot] == 4
    s.update(plan, sampled(s, 41))
    assert r.output_ids == [40, 41]


def test_a_token_still_in_flight_is_taken_from_the_previous_step():
    # The engine schedules step N+1 before it reads step N's tokens.
    s = make()
    r = add(s, "a", [1, 2, 3])
    first = s.schedule()
    second = s.schedule()
    assert r.num_sampled == 2 and r.output_ids == []
    assert second.tokens.from_prev.tolist() == [True] and second.tokens.ids.tolist() == [0]
    assert positions_of(second, r.slot) == [3] and second.slots.gen_index[r.slot] == 1
    assert s.update(first, sampled(s, 40)) == [r]
    third = s.schedule()  # 40 is known now; 41 is in flight
    assert third.tokens.from_prev.tolist() == [True] and positions_of(third, r.slot) == [4]
    s.update(second, sampled(s, 41))
    s.update(third, sampled(s, 42))
    assert r.output_ids == [40, 41, 42]


def test_per_slot_arrays_carry_each_request_and_idle_defaults():
    s = make(max_slots=3)
    r = s.add("a", [1, 2, 3, 4, 5], SamplingParams(temperature=0.5, top_k=3, top_p=0.9, min_p=0.1,
                                                     repetition_penalty=1.2, presence_penalty=0.5,
                                                     frequency_penalty=-0.5), seed=123)
    plan = s.schedule()
    assert r.slot == 0
    np.testing.assert_allclose(plan.sampling.temperature, [0.5, 0, 0])
    assert plan.sampling.top_k.tolist() == [3, 0, 0] and plan.sampling.seed.tolist() == [123, 0, 0]
    np.testing.assert_allclose(plan.sampling.top_p, [0.9, 1, 1])
    np.testing.assert_allclose(plan.sampling.min_p, [0.1, 0, 0])
    np.testing.assert_allclose(plan.sampling.repetition_penalty, [1.2, 1, 1])
    np.testing.assert_allclose(plan.sampling.presence_penalty, [0.5, 0, 0])
    np.testing.assert_allclose(plan.sampling.frequency_penalty, [-0.5, 0, 0])
    # 64 tokens of context in pages of 4: 16 columns; the two pages used, then padding with page 0.
    assert plan.slots.page_table.shape == (3, 16)
    assert plan.slots.page_table[0].tolist() == [1, 2] + [0] * 14 and not plan.slots.page_table[1:].any()
    assert plan.slots.reset.tolist() == [True, False, False]  # a new occupant: clear its slot's penalty counts
    s.update(plan, sampled(s, 9))
    assert not s.schedule().slots.reset.any()


# ---- admission ---------------------------------------------------------------------------------


def test_admission_is_first_come_first_served_into_free_slots():
    s = make(max_slots=2)
    reqs = [add(s, f"r{i}", [i + 1] * 3, max_tokens=1) for i in range(3)]
    plan = s.schedule()
    assert [x.request for x in plan.scheduled] == reqs[:2]
    assert [r.slot for r in reqs] == [0, 1, None] and s.waiting == [reqs[2]]
    s.update(plan, sampled(s, 9))  # max_tokens=1: both finish and free their slots
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
    s.update(s.schedule(), sampled(s, 7))
    touched = s.update(s.schedule(), sampled(s, 99))
    assert touched == [r] and r.output_ids == [7, 99]  # the stop token is recorded, then the request ends
    assert_gone(s, r, "stop")
    assert s.allocator.num_free == s.allocator.usable_pages - s.prefix_cache.num_evictable
    assert not s.has_work and s.schedule() is None


def test_ignore_eos_keeps_going_but_stop_token_ids_still_stop():
    s = make(eos=(99,))
    r = add(s, "a", [1, 2, 3], ignore_eos=True, stop_token_ids=(42,))
    s.update(s.schedule(), sampled(s, 99))
    assert r.status is Status.RUNNING
    s.update(s.schedule(), sampled(s, 42))
    assert_gone(s, r, "stop")


def test_finish_on_max_tokens():
    s = make()
    r = add(s, "a", [1, 2, 3], max_tokens=2)
    s.update(s.schedule(), sampled(s, 5))
    assert r.status is Status.RUNNING
    s.update(s.schedule(), sampled(s, 6))
    assert r.output_ids == [5, 6]
    assert_gone(s, r, "length")


def test_finish_on_context_length():
    s = make(max_model_len=8)
    r = add(s, "a", [1] * 6, max_tokens=100)
    s.update(s.schedule(), sampled(s, 5))
    s.update(s.schedule(), sampled(s, 6))
    assert len(r.prompt_ids) + len(r.output_ids) == 8
    assert_gone(s, r, "length")


def test_a_request_at_its_length_limit_is_not_scheduled_again_while_its_last_token_is_in_flight():
    s = make()
    r = add(s, "a", [1, 2, 3], max_tokens=2)
    first, second = s.schedule(), s.schedule()
    assert s.schedule() is None  # both tokens sampled (in flight): nothing left to compute
    assert r.status is Status.RUNNING  # it still holds its slot until the tokens reach the host
    s.update(first, sampled(s, 5))
    s.update(second, sampled(s, 6))
    assert_gone(s, r, "length")


def test_the_token_of_a_step_scheduled_before_the_stop_is_discarded():
    s = make(eos=(99,))
    r = add(s, "a", [1, 2, 3])
    first, second = s.schedule(), s.schedule()
    s.update(first, sampled(s, 99))
    assert_gone(s, r, "stop")
    assert s.update(second, sampled(s, 7)) == []
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
    assert s.update(plan, sampled(s, 7)) == [] and run.output_ids == []  # its in-flight token is dropped
    assert s.allocator.num_free == s.allocator.usable_pages and (s.allocator.refcount == 0).all()


# ---- preemption --------------------------------------------------------------------------------


def two_decoding(s: Scheduler):
    """a (3 tokens) and b (4 tokens) in a pool of 5 pages of 2 tokens: after two steps a holds pages
    [1, 2], b holds [3, 4, 5] (its decode at position 4 opened a third page) and none is free."""
    a = add(s, "a", [1, 2, 3], max_tokens=3)
    b = add(s, "b", [4, 5, 6, 7], max_tokens=3)
    s.update(s.schedule(), sampled(s, {0: 10, 1: 20}))
    s.update(s.schedule(), sampled(s, {0: 11, 1: 21}))
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
    s.update(plan, sampled(s, {0: 12}))
    assert_gone(s, a, "length")
    # b recomputes its prompt and both outputs in one chunk and samples its third token.
    plan = s.schedule()
    assert plan.tokens.ids.tolist() == [4, 5, 6, 7, 20, 21] and not plan.tokens.from_prev.any()
    assert plan.tokens.is_output.tolist() == [False] * 4 + [True] * 2
    assert plan.slots.sample[b.slot] and plan.slots.gen_index[b.slot] == 2 and plan.slots.reset[b.slot]
    s.update(plan, sampled(s, 22))
    assert b.output_ids == [20, 21, 22]
    assert_gone(s, b, "length")


def test_a_request_that_needs_a_page_and_finds_no_victim_preempts_itself():
    s = make(num_pages=6, page_size=2, token_buckets=(8,), enable_prefix_caching=False)
    a = add(s, "a", [1, 2, 3], max_tokens=3)
    b = add(s, "b", [4, 5, 6], max_tokens=3)
    s.update(s.schedule(), sampled(s, {0: 10, 1: 20}))
    s.update(s.schedule(), sampled(s, {0: 11, 1: 20}))
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
    s.update(plan, sampled(s, {0: 12}))
    plan = s.schedule()
    # a's pages: 5 was private and freed; 2 and 1 became evictable. b matches its own [3, 4] and computes
    # only positions 4 and 5 (its two outputs) into the freed page 5.
    assert b.pages == [3, 4, 5] and positions_of(plan, b.slot) == [4, 5]
    assert plan.tokens.ids.tolist() == [20, 21]
    assert b.num_cached_prompt == 0  # only a first admission counts toward the prefix statistics


def test_preempted_with_a_token_in_flight_waits_for_it_and_blocks_later_arrivals():
    s = make(num_pages=6, page_size=2, token_buckets=(8,), enable_prefix_caching=False)
    a = add(s, "a", [1, 2, 3], max_tokens=4)
    b = add(s, "b", [4, 5, 6, 7], max_tokens=4)
    first = s.schedule()
    second = s.schedule()  # b's decode at position 4 takes the last page
    s.update(first, sampled(s, {0: 10, 1: 20}))
    c = add(s, "c", [8], max_tokens=1)
    third = s.schedule()  # a needs a page: b is preempted while its second token is still in flight
    assert [x.request for x in third.scheduled] == [a]
    assert b.status is Status.WAITING and (len(b.output_ids), b.num_sampled) == (1, 2)
    # b cannot be recomputed before its in-flight token is known, and c, behind it, is not admitted.
    assert c.status is Status.WAITING and c.slot is None
    assert s.update(second, sampled(s, {0: 11, 1: 21})) == [a, b]
    assert b.output_ids == [20, 21] and b.status is Status.WAITING


def test_a_request_waiting_only_for_its_last_token_gives_its_pages_to_a_newer_one():
    s = make(num_pages=4, page_size=2, token_buckets=(8,), enable_prefix_caching=False)  # 3 usable pages
    a = add(s, "a", [1], max_tokens=2)  # page 1
    b = add(s, "b", [2, 2, 2], max_tokens=4)  # pages 2, 3
    first = s.schedule()
    second = s.schedule()  # a samples its last token; b decodes position 3 within its second page
    s.update(first, sampled(s, 5))
    third = s.schedule()
    # b's position 4 needs a page. The only other running request is a, older but at its limit with its
    # last token in flight: it computes nothing more, so taking its page costs no recomputation.
    assert [x.request for x in third.scheduled] == [b] and b.pages == [2, 3, 1]
    assert a.status is Status.WAITING and a.num_preemptions == 1 and s.num_preemptions == 1
    s.update(second, sampled(s, 6))
    assert a.output_ids == [5, 6]
    assert_gone(s, a, "length")


# ---- prefix cache at admission -----------------------------------------------------------------


def test_admission_reuses_cached_full_pages_of_an_equal_prefix():
    s = make()
    a = add(s, "a", list(range(1, 10)))  # 9 tokens: pages 1, 2 full, page 3 partial
    s.update(s.schedule(), sampled(s, 50))
    b = add(s, "b", list(range(1, 9)) + [20, 21])  # the same first 8 tokens (2 pages), then different
    plan = s.schedule()
    assert b.pages[:2] == a.pages[:2] and b.pages[2] not in a.pages
    assert s.allocator.refcount[a.pages].tolist() == [2, 2, 1]
    assert positions_of(plan, b.slot) == [8, 9] and b.num_computed == 10
    assert plan.tokens.ids[plan.tokens.slot == b.slot].tolist() == [20, 21]
    assert plan.slots.page_table[b.slot, :3].tolist() == b.pages
    assert b.num_cached_prompt == 8
    stats = s.prefix_cache.stats
    assert (stats.queried_tokens, stats.hit_tokens) == (9 + 10, 0 + 8)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    s = make()
    a = add(s, "a", list(range(1, 9)) + [30], max_tokens=2)  # 9 tokens: pages of [1..4] and [5..8] full
    s.update(s.schedule(), sampled(s, 50))
    s.update(s.schedule(), sampled(s, 51))
    assert a.finished and s.prefix_cache.num_evictable == 2
    b = add(s, "b", list(range(1, 9)))  # exactly the two cached pages
    plan = s.schedule()
    # Matching both would leave nothing to compute, and the last token's logits give the first output.
    assert b.num_cached_prompt == 4 and positions_of(plan, b.slot) == [4, 5, 6, 7]
    assert plan.slots.sample[b.slot]


def test_no_prefix_reuse_when_caching_is_disabled():
    s = make(enable_prefix_caching=False)
    a = add(s, "a", list(range(1, 10)))
    s.update(s.schedule(), sampled(s, 50))
    b = add(s, "b", list(range(1, 10)))
    plan = s.schedule()
    assert not set(a.pages) & set(b.pages) and positions_of(plan, b.slot) == list(range(9))
    assert len(s.prefix_cache) == 0 and s.prefix_cache.stats.queried_tokens == 0


def test_cached_pages_are_evicted_before_anyone_is_preempted():
    s = make(num_pages=6, page_size=2, token_buckets=(8,))  # 5 usable pages
    a = add(s, "a", [1, 2, 3, 4, 5], max_tokens=2)  # 3 pages, all full once its first output's KV is computed
    s.update(s.schedule(), sampled(s, 9))
    s.update(s.schedule(), sampled(s, 9))
    assert a.finished and s.prefix_cache.num_evictable == 3 and s.allocator.num_free == 2
    b = add(s, "b", [6, 7, 8, 9, 10, 11, 12, 13], max_tokens=1)  # 4 pages: two cached pages must go
    plan = s.schedule()
    assert len(b.pages) == 4 and s.num_preemptions == 0
    assert s.prefix_cache.num_evictable == 1 and len(s.prefix_cache) == 1
    # a released its pages last first, so its second page was the LRU victim; its first is still cached.
    s.update(plan, sampled(s, 9))
    c = add(s, "c", [1, 2, 3, 4, 5, 6])
    s.schedule()
    assert c.num_cached_prompt == 2


def test_a_request_that_finishes_in_its_first_step_still_offers_its_prompt_pages():
    s = make()
    add(s, "a", list(range(1, 10)), max_tokens=1)  # e.g. scoring prompts that share a system prompt
    first = s.schedule()
    assert s.schedule() is None  # the engine schedules the next step before it reads this one's token
    s.update(first, sampled(s, 50))
    b = add(s, "b", list(range(1, 10)))
    s.schedule()
    assert b.num_cached_prompt == 8
