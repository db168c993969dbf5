"""The engine against the dense-cache reference loop on a tiny random model: exact greedy outputs under
random arrivals, preemption and prefix caching; no recompilation; every page returned."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jinfer.engine.config import EngineConfig
from jinfer.engine.engine import Engine
from jinfer.inputs import SamplingParams
from jinfer.runtime import reference
from jinfer.runtime.build import build_engine
from jinfer.testing.tiny import TINY

BASE = list(np.random.default_rng(123).integers(0, TINY.vocab_size, 40))  # a shared prefix for some prompts


def make_engine(params, tok, drafter=None, draft_model=None, plain_steps=None, warm=True, **kw) -> Engine:
    """plain_steps: override the platform's choice of branch-free steps (the GPU's) before warm-up; warm=False
    leaves every step shape untraced."""
    cfg = dict(max_slots=4, page_size=4, num_pages=28, token_buckets=(8, 32), max_prefill_chunk=16)
    cfg.update(kw)
    eng = build_engine(TINY, params, tok, EngineConfig(**cfg), seed=0, drafter=drafter, draft_model=draft_model)
    if plain_steps is not None:
        eng.runner.plain_steps = plain_steps
    if warm:
        eng.warmup()
    return eng


def assert_pages_all_returned(eng: Engine):
    s = eng.scheduler
    assert not s.running and not s.waiting and all(x is None for x in s.slots)
    assert (s.allocator.refcount == 0).all()
    assert s.allocator.num_free + s.prefix_cache.num_evictable == s.allocator.usable_pages


def run_workload(eng: Engine, arrivals: list[tuple[int, list[int], SamplingParams]], cancel_at=None):
    """arrivals: (step, prompt ids, params); cancel_at: {index: step}. Returns outputs by index."""
    cancel_at = cancel_at or {}
    ids: dict[int, str] = {}
    outs = {}
    step = 0
    pending = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0])
    while pending or eng.has_work:
        while pending and arrivals[pending[0]][0] <= step:
            i = pending.pop(0)
            ids[i] = eng.add_request(arrivals[i][1], arrivals[i][2])
        for i, at in cancel_at.items():
            if at == step and i in ids:
                eng.cancel(ids[i])
        for ev in eng.step():
            if ev.output.finished:
                outs[ev.request_id] = ev.output
        step += 1
        assert step < 10_000
    return {i: outs.get(rid) for i, rid in ids.items()}


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


request = st.tuples(
    st.integers(0, 12),  # arrival step
    st.integers(0, len(BASE)),  # length of the shared prefix
    st.lists(st.integers(0, TINY.vocab_size - 1), min_size=1, max_size=30),  # own suffix
    st.integers(1, 20),  # max_tokens
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(request, min_size=1, max_size=10))
def test_greedy_outputs_equal_the_reference_under_load(engine, params, reqs):
    arrivals = [(step, BASE[:k] + suffix, greedy(n)) for step, k, suffix, n in reqs]
    outs = run_workload(engine, arrivals)
    want = reference.generate(params, TINY, [a[1] for a in arrivals], [a[2] for a in arrivals])
    for i, w in enumerate(want):
        assert outs[i].token_ids == w.token_ids, f"request {i} of {len(arrivals)}"
        assert outs[i].finish_reason == "length"
    assert_pages_all_returned(engine)


def test_preemption_happens_and_loses_nothing(params, tok):
    eng = make_engine(params, tok, num_pages=14)  # 13 usable pages of 4 tokens for up to 4 requests
    rng = np.random.default_rng(5)
    arrivals = [(0, list(rng.integers(0, 128, 20)), greedy(24)) for _ in range(6)]
    outs = run_workload(eng, arrivals)
    assert eng.scheduler.num_preemptions > 0
    want = reference.generate(params, TINY, [a[1] for a in arrivals], [a[2] for a in arrivals])
    assert [outs[i].token_ids for i in range(6)] == [w.token_ids for w in want]
    assert_pages_all_returned(eng)


def test_cancellation_frees_pages_and_spares_the_rest(engine, params):
    rng = np.random.default_rng(7)
    arrivals = [(int(rng.integers(0, 4)), list(rng.integers(0, 128, int(rng.integers(3, 30)))), greedy(15))
                for _ in range(8)]
    cancel = {1: 2, 4: 6, 6: 0}
    outs = run_workload(engine, arrivals, cancel)
    keep = [i for i in range(8) if i not in cancel]
    want = reference.generate(params, TINY, [arrivals[i][1] for i in keep], [arrivals[i][2] for i in keep])
    for i, w in zip(keep, want):
        assert outs[i].token_ids == w.token_ids
    assert_pages_all_returned(engine)


def test_no_compilation_after_warmup(engine):
    shapes = len(engine.runner.all_shapes())
    assert engine.runner.num_compilations == shapes
    rng = np.random.default_rng(11)
    arrivals = []
    for i in range(200):
        prompt = list(rng.integers(0, 128, int(rng.integers(1, 60))))
        sp = SamplingParams(max_tokens=int(rng.integers(1, 12)), temperature=float(rng.choice([0, 0.7, 1.2])),
                            top_k=int(rng.choice([0, 5])), top_p=float(rng.choice([1.0, 0.8])),
                            min_p=float(rng.choice([0, 0.05])), repetition_penalty=float(rng.choice([1, 1.2])),
                            presence_penalty=float(rng.choice([0, 0.5])), logprobs=int(rng.choice([0, 3])),
                            seed=int(rng.integers(0, 1000)))
        arrivals.append((i // 4, prompt, sp))
    outs = run_workload(engine, arrivals, {5: 3, 50: 20})
    assert sum(o is not None and o.finished for o in outs.values()) == 198
    assert engine.runner.num_compilations == shapes
    assert engine.runner._step._cache_size() == shapes
    assert_pages_all_returned(engine)


def test_seeded_sampling_is_independent_of_the_batch(engine):
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    alone = run_workload(engine, [(0, [3, 1, 4, 1, 5], sp)])[0].token_ids
    rng = np.random.default_rng(3)
    others = [(0, list(rng.integers(0, 128, 9)), SamplingParams(max_tokens=20, temperature=0.8, seed=i))
              for i in range(3)]
    mixed = run_workload(engine, others + [(1, [3, 1, 4, 1, 5], sp)])[3].token_ids
    assert alone == mixed


def test_prefix_cache_hits_and_saves_prefill(params, tok):
    system = list(np.random.default_rng(9).integers(0, 128, 128))
    rng = np.random.default_rng(10)
    prompts = [system + list(rng.integers(0, 128, 2)) for _ in range(20)]
    results = {}
    for caching in (True, False):
        eng = make_engine(params, tok, num_pages=200, enable_prefix_caching=caching)
        # The first request computes the shared pages; the rest arrive once it has.
        arrivals = [(0, prompts[0], greedy(8))] + [(12, p, greedy(8)) for p in prompts[1:]]
        outs = run_workload(eng, arrivals)
        results[caching] = ([outs[i].token_ids for i in range(20)], eng.scheduler.num_computed_tokens,
                            eng.load().prefix_hit_rate)
        assert_pages_all_returned(eng)
    assert results[True][0] == results[False][0]
    assert results[True][2] > 0.9, results[True][2]
    assert results[True][1] < results[False][1] / 4


@pytest.mark.parametrize("prompt, kwargs, match", [
    ([1] * 256, {}, "prompt has 256 tokens; the context is 256"),
    ([], {}, "prompt has no tokens"),
    ([1, 128], {}, r"prompt\[1\]=128 is not a token id"),
    ("", {}, "prompt is an empty string"),
])
def test_bad_requests_name_the_field(engine, prompt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, SamplingParams(**kwargs))
    assert not engine.scheduler.waiting


def test_request_that_cannot_fit_the_pool_is_refused(params, tok):
    eng = make_engine(params, tok, num_pages=6)
    with pytest.raises(ValueError, match="needs 8 KV pages; the pool has 5"):
        eng.add_request(list(range(20)), greedy(12))


def _pallas_gpu_backend():
    from jinfer.attention.pallas import PallasBackend
    from jinfer.kernels.paged_attention.kernel import BlockSizes

    return PallasBackend(decode=BlockSizes(block_q=8, pages_per_block=2, num_splits=3),
                         prefill=BlockSizes(block_q=8, pages_per_block=2, num_splits=1), interpret=True)


def _pallas_tpu_backend():
    from jinfer.attention.pallas import TPUPallasBackend
    from jinfer.kernels.paged_attention.kernel_tpu import TPUBlockSizes

    return TPUPallasBackend(decode=TPUBlockSizes(block_q=8, pages_per_block=2),
                            prefill=TPUBlockSizes(block_q=8, pages_per_block=3), interpret=True)


@pytest.mark.parametrize("make_backend", [_pallas_gpu_backend, _pallas_tpu_backend], ids=["triton", "mosaic-tpu"])
def test_exact_with_the_pallas_kernel_in_interpret_mode(params, tok, make_backend):
    backend = make_backend()
    eng = build_engine(TINY, params, tok, EngineConfig(max_slots=4, page_size=4, num_pages=20, token_buckets=(8, 32),
                                                 max_prefill_chunk=16), attention_backend=backend)
    eng.warmup()
    rng = np.random.default_rng(21)
    arrivals = [(int(rng.integers(0, 6)), BASE[:int(rng.integers(0, 30))] + list(rng.integers(0, 128, int(rng.integers(1, 20)))),
                 greedy(int(rng.integers(1, 16)))) for _ in range(8)]
    outs = run_workload(eng, arrivals)
    want = reference.generate(params, TINY, [a[1] for a in arrivals], [a[2] for a in arrivals])
    assert [outs[i].token_ids for i in range(8)] == [w.token_ids for w in want]
    assert eng.scheduler.num_preemptions > 0
    assert_pages_all_returned(eng)


@pytest.mark.parametrize("penalty", [dict(repetition_penalty=1.5), dict(frequency_penalty=1.5, presence_penalty=0.5)])
def test_penalties_count_the_tokens_the_prefix_cache_supplied(params, tok, penalty):
    """A prompt served from the prefix cache is penalized as if computed: the same greedy request gives the
    tokens of an engine without caching, also the second time (it once diverged at the fifth token)."""
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **penalty)
    prompt = list(range(40))
    want = run_workload(make_engine(params, tok, enable_prefix_caching=False), [(0, prompt, sp)])[0].token_ids
    eng = make_engine(params, tok)
    first = run_workload(eng, [(0, prompt, sp)])[0]
    second = run_workload(eng, [(0, prompt, sp)])[0]
    assert second.num_cached_tokens == 40 - 40 % 4 - 4  # whole pages, one token left to compute
    assert first.token_ids == want and second.token_ids == want


def test_a_preempted_request_keeps_its_penalty_counts(params, tok):
    """Recomputed after preemption, partly from cached pages that hold generated tokens: frequency and
    presence penalties still count every generated token once."""
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=1.0)
    rng = np.random.default_rng(5)
    arrivals = [(i, list(rng.integers(0, 128, 9)), sp) for i in range(4)]
    roomy = run_workload(make_engine(params, tok, num_pages=200), arrivals)
    tight = make_engine(params, tok, num_pages=14)
    squeezed = run_workload(tight, arrivals)
    assert tight.scheduler.num_preemptions > 0
    assert [squeezed[i].token_ids for i in range(4)] == [roomy[i].token_ids for i in range(4)]
