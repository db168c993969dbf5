"""Speculative decoding in the engine on a tiny random model: greedy outputs equal the dense reference for every
proposer under random arrivals, preemption and prefix caching; seeded sampling with prompt lookup gives the very
tokens of a run without speculation; stops, logprobs and the compiled set behave as without it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jinfer.engine.spec.config import SpeculativeConfig
from jinfer.inputs import SamplingParams
from jinfer.runtime import reference
from jinfer.runtime.spec.drafters import UniformDrafter
from jinfer.testing.tiny import TINY
from tests.engine.test_engine import assert_pages_all_returned, greedy, make_engine, run_workload

MOTIF = list(np.random.default_rng(321).integers(0, TINY.vocab_size, 10))  # repeated, so prompt lookup has matches


def first_layers(params, config, m: int):
    """The target's first m layers as a model of their own (early exit's drafts, through the draft-model path)."""
    return dataclasses.replace(config, num_layers=m), dict(params, layers={n: w[:m] for n, w in params["layers"].items()})


def spec_engine(params, tok, method: str, k: int = 3, **kw):
    """An engine speculating with `method`: ngram (suffixes down to one token, so the random model's text finds
    matches, and not adaptive), early_exit (1 of 2 layers), draft (the target's first layer as a separate model with its own
    cache) or uniform (random tokens). One decode bucket, so each engine compiles four steps."""
    # Costs of zero: the policy adapts k to acceptance alone (the CPU's measured costs would stop these models
    # from speculating at all, which is right for speed and wrong for a test of speculation).
    spec = dict(method=method, num_speculative_tokens=k, disable_by_batch_size=kw.pop("disable_by_batch_size", 8),
                verify_step_cost=0.0, verify_token_cost=0.0, draft_cost=0.0)
    extra = {}
    if method == "ngram":  # proposes whenever it can: the tests want verify steps, not speed
        spec.update(prompt_lookup_min=1, adaptive=False)
    if method == "draft":
        spec["model"] = "first layer"
        extra["draft_model"] = first_layers(params, TINY, 1)
    if method == "uniform":
        spec["method"], extra["drafter"] = "early_exit", UniformDrafter()
    kw.setdefault("decode_buckets", (4,))
    return make_engine(params, tok, speculative=SpeculativeConfig(**spec), **kw, **extra)


METHODS = ["ngram", "early_exit", "draft", "uniform"]


@pytest.fixture(scope="module")
def engines(params, tok):
    """One engine per proposer, shared by the tests (each test leaves its engine empty)."""
    return {m: spec_engine(params, tok, m) for m in METHODS}


request_strategy = st.tuples(
    st.integers(0, 8),  # arrival step
    st.integers(0, 4),  # repeats of the motif
    st.lists(st.integers(0, TINY.vocab_size - 1), min_size=1, max_size=12),  # own tokens
    st.integers(1, 20),  # max_tokens
)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(request_strategy, min_size=1, max_size=8))
def test_greedy_outputs_equal_the_reference_under_load(engines, params, method, reqs):
    spec = engines[method]
    arrivals = [(step, MOTIF * n + own + MOTIF[:3], greedy(m)) for step, n, own, m in reqs]
    outs = run_workload(spec, arrivals)
    want = reference.generate(params, TINY, [a[1] for a in arrivals], [a[2] for a in arrivals])
    for i, w in enumerate(want):
        assert outs[i].token_ids == w.token_ids, f"request {i} of {len(arrivals)}"
    assert_pages_all_returned(spec)


@pytest.mark.parametrize("method", ["ngram", "early_exit", "draft"])
def test_preemption_and_prefix_caching_keep_greedy_exact(engines, params, method):
    eng = engines[method]  # 27 pages of 4 tokens: six requests of 64 tokens, three at a time, preempt one another
    preempted = eng.scheduler.num_preemptions
    rng = np.random.default_rng(5)
    prompts = [MOTIF * 2 + list(rng.integers(0, 128, 4)) for _ in range(6)]
    arrivals = [(i // 3, p, greedy(40)) for i, p in enumerate(prompts)]
    outs = run_workload(eng, arrivals)
    again = run_workload(eng, arrivals[:2])  # the motif's pages come from the prefix cache now
    assert eng.scheduler.num_preemptions > preempted
    want = reference.generate(params, TINY, prompts, [greedy(40)] * 6)
    assert [outs[i].token_ids for i in range(6)] == [w.token_ids for w in want]
    assert [again[i].token_ids for i in range(2)] == [w.token_ids for w in want[:2]]
    assert again[0].num_cached_tokens > 0
    assert_pages_all_returned(eng)


def test_a_draft_model_of_the_targets_first_layer_drafts_what_early_exit_drafts(engines):
    """The draft model keeps its own cache through prefill, decode blocks, verify steps and rejections; if any
    of its K/V were stale its proposals would differ from early exit's, whose K/V are the target's own."""
    arrivals = [(0, MOTIF + [7], greedy(30)), (1, [3, 1, 4], greedy(30)), (2, MOTIF * 2, greedy(25))]
    a = run_workload(engines["early_exit"], arrivals)
    b = run_workload(engines["draft"], arrivals)
    for i in range(3):
        ma, mb = a[i].metrics, b[i].metrics
        assert a[i].token_ids == b[i].token_ids
        assert (ma.spec_draft_tokens, ma.spec_accepted_tokens, ma.spec_verify_steps) == (
            mb.spec_draft_tokens, mb.spec_accepted_tokens, mb.spec_verify_steps)
        assert ma.spec_verify_steps > 0


SAMPLED = [
    dict(temperature=0.9, seed=7),
    dict(temperature=1.3, top_k=5, seed=8, logprobs=3),
    dict(temperature=0.8, top_p=0.7, min_p=0.05, seed=9),
    dict(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3, seed=10),
]


@pytest.mark.parametrize("sampling", SAMPLED)
def test_prompt_lookup_samples_what_a_run_without_speculation_samples(engine, engines, sampling):
    """Lookup proposals are functions of the context, so the target samples each position with its own key and
    the kept tokens are exactly the tokens of a run without speculation, penalties and logprobs included."""
    sp = SamplingParams(max_tokens=32, ignore_eos=True, **sampling)
    # Half the vocabulary in the prompt: a sampled token is often found there, and what followed it proposed.
    arrivals = [(0, list(range(0, 128, 2)), sp), (0, list(range(1, 128, 2)), dataclasses.replace(sp, seed=sp.seed + 1))]
    plain = run_workload(engine, arrivals)
    fast = run_workload(engines["ngram"], arrivals)
    for i in range(2):
        assert fast[i].token_ids == plain[i].token_ids
        if sp.logprobs:
            for a, b in zip(fast[i].logprobs, plain[i].logprobs):
                assert a.token_id == b.token_id and a.top.keys() == b.top.keys()
                np.testing.assert_allclose(a.logprob, b.logprob, atol=1e-5)
    assert sum(fast[i].metrics.spec_verify_steps for i in range(2)) >= 2


@pytest.mark.parametrize("method", ["ngram", "early_exit"])
def test_stops_and_limits_behave_as_without_speculation(engine, engines, method):
    eng = engines[method]
    want = run_workload(engine, [(0, MOTIF * 3, greedy(40))])[0]
    stop_tok = want.token_ids[9]
    stop_text = " ".join(f"w{t}" for t in want.token_ids[5:7])
    cases = [greedy(7), dataclasses.replace(greedy(40), stop_token_ids=(stop_tok,)),
             dataclasses.replace(greedy(40), stop=(stop_text,))]
    for sp in cases:
        a = run_workload(engine, [(0, MOTIF * 3, sp)])[0]
        b = run_workload(eng, [(0, MOTIF * 3, sp)])[0]
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason), sp
    assert_pages_all_returned(eng)


def test_no_compilation_after_warmup_with_speculation(engines):
    eng = engines["early_exit"]
    shapes = len(eng.runner.all_shapes())
    assert eng.runner.num_compilations == shapes == 4  # decode and verify (4 rows), prefill (8 and 32 tokens)
    rng = np.random.default_rng(11)
    arrivals = []
    for i in range(60):
        prompt = MOTIF * int(rng.integers(0, 3)) + list(rng.integers(0, 128, int(rng.integers(1, 20))))
        sp = SamplingParams(max_tokens=int(rng.integers(1, 12)), temperature=float(rng.choice([0, 0.7, 1.2])),
                            top_k=int(rng.choice([0, 5])), top_p=float(rng.choice([1.0, 0.8])),
                            repetition_penalty=float(rng.choice([1, 1.2])), logprobs=int(rng.choice([0, 3])),
                            seed=int(rng.integers(0, 1000)))
        arrivals.append((i // 3, prompt, sp))
    outs = run_workload(eng, arrivals)
    assert all(o is not None and o.finished for o in outs.values())
    assert eng.runner.num_compilations == shapes
    assert_pages_all_returned(eng)


def test_no_verify_step_beyond_the_batch_limit(params, tok):
    eng = spec_engine(params, tok, "early_exit", disable_by_batch_size=2)
    verified = []
    schedule = eng.scheduler.schedule

    def spy():
        plan = schedule()
        if plan is not None and plan.verify:
            verified.append(plan.num_rows)
        return plan

    eng.scheduler.schedule = spy
    run_workload(eng, [(0, [i, 2, 3], greedy(n)) for i, n in enumerate([4, 6, 20, 20])])
    assert verified and max(verified) <= 2  # once the two short requests are done


def test_the_adaptive_lookup_verifies_first_then_scores_and_stays_exact(params, tok, monkeypatch):
    """Prompt lookup under its adaptive policy, looking up every token (the CPU's default): a request verifies its
    first proposal; once verifying stops paying (the random model does not copy), its proposals are only scored
    against what it then decodes (shadows); the output is still the target's greedy one."""
    from jinfer.engine.spec.policy import AdaptivePolicy

    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_min=1, disable_by_batch_size=8,
                             verify_step_cost=1.2, verify_token_cost=0.0, keep_looking=True)
    eng = make_engine(params, tok, speculative=spec, decode_buckets=(4,))
    events = []
    shadow, verify = AdaptivePolicy.shadow, eng.scheduler.schedule

    def spy_shadow(self, state, at, proposal):
        events.append("shadow")
        shadow(self, state, at, proposal)

    def spy_schedule():
        plan = verify()
        if plan is not None and plan.verify:
            events.append("verify")
        return plan

    monkeypatch.setattr(AdaptivePolicy, "shadow", spy_shadow)
    monkeypatch.setattr(eng.scheduler, "schedule", spy_schedule)
    arrivals = [(0, MOTIF * 3, greedy(40))]
    out = run_workload(eng, arrivals)[0]
    assert out.token_ids == reference.generate(params, TINY, [arrivals[0][1]], [greedy(40)])[0].token_ids
    assert events[0] == "verify" and "shadow" in events and out.metrics.spec_verify_steps > 0
    assert_pages_all_returned(eng)


class FakeClock:
    """Stands in for the engine's clock: time advances only when a step's tokens are read, by that step's cost (a
    verify step 3 s, a decode block 1 s a step, anything else 0.25 s)."""

    def __init__(self, runner, monkeypatch):
        import jinfer.engine.engine as engine_module

        self.now = 0.0
        dispatch = runner.dispatch

        def timed_dispatch(plan):
            out, clock = dispatch(plan), self
            cost = self.cost(plan)

            class Timed:
                def fetch(self):
                    clock.now += cost
                    return out.fetch()

            return Timed()

        monkeypatch.setattr(engine_module, "perf_counter", lambda: self.now)
        monkeypatch.setattr(runner, "dispatch", timed_dispatch)

    @staticmethod
    def cost(plan) -> float:
        return 3.0 if plan.verify else plan.max_steps * 1.0 if plan.decode else 0.25


def test_the_engine_times_each_step_from_when_the_device_could_start_it(params, tok, monkeypatch):
    """Without speculation the engine dispatches step N + 1 before it reads step N: each step is timed from the
    later of its dispatch and the previous step's end, so it is charged its own cost, not its predecessor's."""
    eng = make_engine(params, tok)
    FakeClock(eng.runner, monkeypatch)
    seen = []
    monkeypatch.setattr(eng.scheduler, "observe_step", lambda plan, seconds: seen.append((FakeClock.cost(plan), seconds)))
    run_workload(eng, [(0, MOTIF, greedy(20)), (1, MOTIF[:4], greedy(9))])
    assert len(seen) > 3 and all(s == pytest.approx(c) for c, s in seen), seen
    assert_pages_all_returned(eng)


def test_the_engine_measures_what_a_verify_step_costs(params, tok, monkeypatch):
    """With `measure_costs`, the policy's verify cost is the engine's own timing of its steps: with the fake clock a
    verify step costs two decode tokens beyond one, whatever the config said before the first steps."""
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_min=1, adaptive=False,
                             verify_step_cost=0.0, verify_token_cost=0.0, measure_costs=True)
    eng = make_engine(params, tok, speculative=spec, decode_buckets=(4,))
    FakeClock(eng.runner, monkeypatch)
    assert eng.scheduler.policy.step_cost == 0.0
    # One request at a time, so every step has one row (the random model's text finds lookups now and then).
    for i in range(4):
        run_workload(eng, [(0, MOTIF[i:] * 2, greedy(12))])
    assert eng.scheduler.costs.verify_extra(1) == pytest.approx(2.0)
    eng.add_request(MOTIF * 2, greedy(3))
    eng.step()
    eng.step()  # its first proposal: the policy now holds the measured cost
    assert eng.scheduler.policy.step_cost == pytest.approx(2.0)
    run_workload(eng, [])
    assert_pages_all_returned(eng)


def test_a_retired_draft_stops_advancing_and_greedy_stays_exact(engines, params, monkeypatch):
    """Three requests at once are too many to speculate for (limit 1 here): the draft model's requests retire and
    its cache stops following them; a fourth, alone later, speculates; every output is the target's greedy one."""
    eng = engines["draft"]
    monkeypatch.setattr(eng.scheduler, "spec", dataclasses.replace(eng.scheduler.spec, disable_by_batch_size=1))
    live: dict[str, list[bool]] = {}
    schedule = eng.scheduler.schedule

    def spy():
        plan = schedule()
        for item in plan.scheduled if plan is not None else ():
            live.setdefault(item.request.request_id, []).append(bool(plan.rows.draft_live[item.row]))
        return plan

    monkeypatch.setattr(eng.scheduler, "schedule", spy)
    arrivals = [(0, MOTIF * 2 + [i], greedy(24)) for i in range(3)] + [(80, MOTIF * 2 + [9], greedy(24))]
    outs = run_workload(eng, arrivals)
    want = reference.generate(params, TINY, [a[1] for a in arrivals], [a[2] for a in arrivals])
    assert [outs[i].token_ids for i in range(4)] == [w.token_ids for w in want]
    crowd = [live[outs[i].request_id] for i in range(3)]
    assert all(flags[0] and not flags[-1] for flags in crowd)  # fed with the prompt, then retired
    assert all(outs[i].metrics.spec_verify_steps == 0 for i in range(3))
    assert outs[3].metrics.spec_verify_steps > 0 and all(live[outs[3].request_id])
    assert_pages_all_returned(eng)


@pytest.mark.parametrize("bad, match", [
    (dict(method="medusa"), "speculative_config.method='medusa' must be one of"),
    (dict(method="ngram", num_speculative_tokens=0), "num_speculative_tokens=0 must be a positive integer"),
    (dict(method="ngram", prompt_lookup_min=5, prompt_lookup_max=3), "prompt_lookup_min=5 must not exceed"),
    (dict(method="draft"), "speculative_config.model must name the draft model"),
    (dict(method="early_exit", model="x"), "model is only for method 'draft'"),
    (dict(method="ngram", lookahead=3), r"unknown keys \['lookahead'\]"),
    (dict(num_speculative_tokens=3), "speculative_config.method is required"),
    (dict(method="ngram", keep_looking="yes"), r"speculative_config.keep_looking='yes' must be true or false"),
    (dict(method="ngram", measure_costs=1), r"speculative_config.measure_costs=1 must be true or false"),
    (dict(method="early_exit", measure_costs=True), "measure_costs is only for method 'ngram'"),
])
def test_bad_speculative_configs_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.from_dict(bad)


def test_prompt_lookup_measures_its_costs_unless_a_cost_is_given():
    assert SpeculativeConfig(method="ngram").resolve("cpu").measure_costs
    assert not SpeculativeConfig(method="ngram", verify_step_cost=0.3).resolve("cpu").measure_costs
    assert not SpeculativeConfig(method="ngram", measure_costs=False).resolve("gpu").measure_costs
    assert not SpeculativeConfig(method="early_exit").resolve("cpu").measure_costs


def test_early_exit_layers_must_leave_a_layer_to_verify(params, tok):
    with pytest.raises(ValueError, match="early_exit_layers=2 must be fewer than the model's 2 layers"):
        make_engine(params, tok, speculative={"method": "early_exit", "early_exit_layers": 2})
