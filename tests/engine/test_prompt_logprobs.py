"""Prompt logprobs (SamplingParams.prompt_logprobs) against the dense reference's full-sequence logits on a
tiny random model: over several prefill chunks, batched beside requests that do not ask, with the prefix
cache on, under preemption; and no step compiles again for them. The host's bookkeeping alone (chunks,
preemption, prefix cache, the one-step lookahead) under random workloads over the fake runner."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jinfer.engine.config import EngineConfig
from jinfer.engine.engine import Engine
from jinfer.inputs import SamplingParams
from jinfer.runtime import reference
from jinfer.testing.fake_runner import fake_engine
from jinfer.testing.tiny import TINY

ATOL = 1e-4  # float32: paged chunks against one dense forward differ only in summation order


def reference_logprobs(params, ids) -> np.ndarray:
    """f32[P, V]: log_softmax of the reference's logits at every position of the prompt."""
    logits = reference.full_logits(params, TINY, ids).astype(np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def assert_prompt_logprobs_equal_reference(params, out, k: int):
    ids = out.prompt_token_ids
    lp = reference_logprobs(params, ids)
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(ids) and got[0] is None
    for p in range(1, len(ids)):
        row, tok = lp[p - 1], ids[p]
        entries = got[p]
        assert tok in entries, f"position {p}"
        np.testing.assert_allclose(entries[tok].logprob, row[tok], atol=ATOL, err_msg=f"position {p}")
        assert entries[tok].rank == 1 + int((row > row[tok]).sum()), f"position {p}"
        assert entries[tok].decoded_token == f"w{tok}"
        top = np.argsort(-row, kind="stable")[:k].tolist()
        # The dict: the prompt token, then the top k (the prompt token once, if it is among them).
        assert list(entries) == [tok] + [t for t in top if t != tok], f"position {p}"
        for r, t in enumerate(top):
            np.testing.assert_allclose(entries[t].logprob, row[t], atol=ATOL)
            if t != tok:
                assert entries[t].rank == r + 1


def run(eng: Engine, arrivals):
    """arrivals: (step, prompt, params) -> outputs in arrival order."""
    ids, outs, step = {}, {}, 0
    pending = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0])
    while pending or eng.has_work:
        while pending and arrivals[pending[0]][0] <= step:
            i = pending.pop(0)
            ids[i] = eng.add_request(arrivals[i][1], arrivals[i][2])
        for ev in eng.step():
            if ev.output.finished:
                outs[ev.request_id] = ev.output
        step += 1
        assert step < 2_000
    return [outs[ids[i]] for i in range(len(arrivals))]


def asking(k, n=4, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, prompt_logprobs=k, **kw)


def prompt(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(0, TINY.vocab_size, n)]


def assert_pages_all_returned(eng: Engine):
    s = eng.scheduler
    assert not s.running and not s.waiting and all(x is None for x in s.slots)
    assert (s.allocator.refcount == 0).all()


def test_a_prompt_over_several_chunks(engine, params):
    ids = prompt(1, 50)  # chunks of 16: four steps
    (out,) = run(engine, [(0, ids, asking(3))])
    assert_prompt_logprobs_equal_reference(params, out, 3)
    want = reference.generate(params, TINY, [ids], [asking(3)])[0].token_ids
    assert out.token_ids == want
    assert_pages_all_returned(engine)


def test_batched_beside_requests_that_do_not_ask(engine, params):
    arrivals = [(0, prompt(2, 30), asking(0)), (0, prompt(3, 9), asking(None, logprobs=2)),
                (1, prompt(4, 21), asking(5, n=6)), (2, prompt(5, 3), asking(None, n=9)),
                (2, prompt(6, 2), asking(2, n=1)), (5, prompt(7, 40), asking(1, logprobs=1))]
    outs = run(engine, arrivals)
    want = reference.generate(params, TINY, [a[1] for a in arrivals], [a[2] for a in arrivals])
    for (_, _, sp), out, w in zip(arrivals, outs, want):
        assert out.token_ids == w.token_ids
        if sp.prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            assert_prompt_logprobs_equal_reference(params, out, sp.prompt_logprobs)
    assert_pages_all_returned(engine)


def test_a_one_token_prompt_has_one_entry(engine):
    (out,) = run(engine, [(0, [7], asking(2))])
    assert out.prompt_logprobs == [None]


def test_prefix_cache_is_skipped_for_it_and_still_filled_by_it(engine, params):
    eng = engine  # prefix caching is on
    ids = prompt(8, 41)
    first, second = run(eng, [(0, ids, asking(2))]), run(eng, [(0, ids, asking(2))])
    for (out,) in (first, second):
        assert out.num_cached_tokens == 0
        assert_prompt_logprobs_equal_reference(params, out, 2)
    (plain,) = run(eng, [(0, ids, asking(None))])  # pages published by the requests that asked
    assert plain.num_cached_tokens == 40
    assert plain.token_ids == first[0].token_ids
    assert_pages_all_returned(eng)


def test_preemption_neither_loses_nor_repeats_an_entry(engine, params):
    # 27 usable pages of 4 tokens: two 60-token prompts prefilled side by side (16 tokens a step each) run out
    # of pages before either is done, so the newer is preempted with part of its prompt's entries recorded.
    eng = engine
    preempted_mid_prompt = []
    preempt = eng.scheduler._preempt

    def spy(victim):
        preempted_mid_prompt.append(victim.needs_prompt_logprobs)
        preempt(victim)

    eng.scheduler._preempt = spy
    arrivals = [(i // 2, prompt(10 + i, 60 - 20 * (i % 2)), asking(i % 3, n=10)) for i in range(5)]
    try:
        outs = run(eng, arrivals)
    finally:
        del eng.scheduler._preempt
    assert any(preempted_mid_prompt), preempted_mid_prompt
    want = reference.generate(params, TINY, [a[1] for a in arrivals], [a[2] for a in arrivals])
    for (_, _, sp), out, w in zip(arrivals, outs, want):
        assert out.token_ids == w.token_ids
        assert_prompt_logprobs_equal_reference(params, out, sp.prompt_logprobs)
    assert_pages_all_returned(eng)


def test_no_step_compiles_again(engine):
    # Every test above ran on this engine (or on its own); the branch lives inside the compiled steps.
    run(engine, [(0, prompt(20, 33), asking(5)), (0, prompt(21, 5), asking(None))])
    assert engine.runner.num_compilations == len(engine.runner.all_shapes())


@pytest.mark.parametrize("value, match", [
    (-1, r"prompt_logprobs=-1 must be an integer >= 0"),
    (6, r"prompt_logprobs=6 exceeds the engine's max_logprobs=5"),
    (1.5, r"prompt_logprobs=1.5 must be an integer >= 0"),
    (True, r"prompt_logprobs=True must be an integer >= 0"),
])
def test_bad_values_name_the_field(engine, value, match):
    with pytest.raises(ValueError, match=match):
        engine.add_request([1, 2, 3], SamplingParams(prompt_logprobs=value))
    with pytest.raises(ValueError, match=r"sampling\." + match):
        engine.inputs.sampling({"prompt_logprobs": value}, "sampling")
    assert not engine.scheduler.waiting


fake_request = st.tuples(
    st.integers(0, 6),  # arrival step
    st.integers(0, 24),  # length of a shared prefix
    st.lists(st.integers(0, 127), min_size=1, max_size=30),  # own suffix
    st.sampled_from([None, 0, 1, 3]),  # prompt_logprobs
    st.integers(1, 12),  # max_tokens
)


@settings(max_examples=40, deadline=None)
@given(st.lists(fake_request, min_size=1, max_size=8))
def test_every_entry_once_in_order_over_the_fake_runner(reqs):
    """The fake runner scores prompt token t with -t / V and tops t, t + 1, ...: every asking request gets
    exactly one entry per prompt token, whatever chunks, preemptions and prefix-cache hits did."""
    eng = fake_engine(EngineConfig(max_slots=4, page_size=4, num_pages=18, token_buckets=(8, 32),
                                   max_prefill_chunk=8, max_logprobs=3))
    base = list(range(100, 124))
    arrivals = [(at, base[:k] + suffix, asking(n, n=m)) for at, k, suffix, n, m in reqs]
    for (_, ids, sp), out in zip(arrivals, run(eng, arrivals)):
        if sp.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        V, n = 128, sp.prompt_logprobs
        assert out.num_cached_tokens == 0
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        for tok, entries in zip(ids[1:], out.prompt_logprobs[1:]):
            assert list(entries) == [tok] + [(tok + r) % V for r in range(1, n)]
            assert entries[tok].logprob == np.float32(-tok / V) and entries[tok].rank == 1
