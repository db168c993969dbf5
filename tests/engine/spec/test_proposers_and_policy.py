"""The host side of speculation: prompt lookup against a brute-force search, and the adaptive policy's choice of
k against the expected-tokens-per-cost it maximizes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jinfer.engine.spec.policy import (
    COPY_GRACE,
    MAX_BACKOFF,
    MISS_LIMIT,
    REPROBE_AFTER,
    AdaptivePolicy,
    SpecState,
    best_k,
)
from jinfer.engine.spec.proposers import NgramProposer
from jinfer.engine.spec.step_costs import WINDOW, StepCosts


def brute_force_lookup(seq: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        if n >= len(seq):
            continue
        suffix = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):  # latest earlier occurrence first
            if seq[start:start + n] == suffix:
                after = seq[start + n:]  # what followed; past the end, the text repeats with its period
                return [after[i % len(after)] for i in range(k)]
    return []


@given(st.lists(st.integers(0, 5), max_size=60), st.integers(1, 6), st.integers(1, 3), st.integers(0, 3))
def test_prompt_lookup_equals_a_brute_force_search(seq, k, min_n, extra):
    max_n = min_n + extra
    assert NgramProposer(min_n, max_n).propose(seq, k) == brute_force_lookup(seq, k, min_n, max_n)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    code = "def f ( x ) : return x + 1 \n def g ( x ) : return x + 2".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(code))}
    ids = [vocab[w] for w in code] + [vocab["def"], vocab["f"], vocab["("]]
    assert NgramProposer(2, 3).propose(ids, 4) == [vocab[w] for w in ["x", ")", ":", "return"]]
    assert NgramProposer(2, 3).propose([1, 2, 3], 4) == []
    assert NgramProposer(2, 3).propose([1, 2, 3, 1, 2, 3, 1, 2], 5) == [3, 1, 2, 3, 1]  # a loop keeps looping


@pytest.mark.parametrize("rate", np.linspace(0, 1, 21))
@pytest.mark.parametrize("cost", [0.02, 0.12, 0.5])
def test_best_k_maximizes_expected_tokens_per_cost(rate, cost):
    def value(k):
        return sum(rate ** i for i in range(k + 1)) / (1 + cost * k)

    k = best_k(rate, 8, cost)
    assert value(k) >= max(value(j) for j in range(9)) - 1e-9


def test_a_request_that_stops_paying_stops_speculating_and_probes_ever_less_often():
    policy = AdaptivePolicy(k_max=4, token_cost=0.12)
    s = SpecState()
    assert policy.k(s) == 4  # the prior: speculate from the start
    while policy.k(s):
        policy.record(s, policy.k(s), 0)
    waits = []
    for _ in range(3):  # each failed probe doubles the wait before the next
        idle = 0
        while policy.k(s) == 0:
            policy.record(s, 0, 0)
            idle += 1
        waits.append(idle)
        assert policy.k(s) == 1
        policy.record(s, 1, 0)
    assert waits[0] >= REPROBE_AFTER and all(b == min(2 * a, MAX_BACKOFF) for a, b in zip(waits, waits[1:]))
    fresh = SpecState(rate=0.0)  # not paying from the start: waits 16, then 32 after a failed probe
    for wait in (REPROBE_AFTER, 2 * REPROBE_AFTER):
        for _ in range(wait):
            assert policy.k(fresh) == 0
            policy.record(fresh, 0, 0)
        assert policy.k(fresh) == 1
        policy.record(fresh, 1, 0)
    for _ in range(12):  # it became copyable: back to full speed, and the next wait is short again
        policy.record(s, max(policy.k(s), 1), max(policy.k(s), 1))
    assert policy.k(s) == 4 and s.backoff == REPROBE_AFTER
    assert AdaptivePolicy(k_max=3, token_cost=0.12, adaptive=False).k(SpecState(rate=0.0)) == 3


def test_a_costly_drafter_needs_a_higher_acceptance_to_speculate():
    assert best_k(0.5, 4, 0.12) >= 2
    assert best_k(0.5, 4, 0.52) == 0  # early exit at a quarter of SmolLM2's layers costs 0.40 per draft
    assert best_k(0.8, 4, 0.52) >= 1


def test_a_request_whose_lookups_find_nothing_waits_before_looking_again():
    policy = AdaptivePolicy(k_max=4, token_cost=0.12)
    s = SpecState()
    for _ in range(MISS_LIMIT):
        assert policy.k(s) > 0
        policy.record_miss(s)
    assert policy.k(s) == 0
    for _ in range(REPROBE_AFTER):
        policy.record(s, 0, 0)
    assert policy.k(s) > 0
    policy.record_miss(s)  # still nothing: the next wait is twice as long
    assert policy.k(s) == 0 and s.backoff == 2 * REPROBE_AFTER


def test_draft_cost_is_the_drafters_share_of_the_weights():
    from jinfer.engine.spec.config import SpeculativeConfig
    from jinfer.models import llama
    from jinfer.models.config import ModelConfig
    from jinfer.runtime.build import draft_cost

    smollm2 = ModelConfig(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                          intermediate_size=1536, max_position_embeddings=8192, tie_word_embeddings=True)
    assert draft_cost(SpeculativeConfig("ngram"), smollm2, None) == 0
    ee = draft_cost(SpeculativeConfig("early_exit"), smollm2, None)  # 7 of 30 layers and the LM head
    head = 49152 * 576
    layers = llama.num_params(smollm2) - head
    assert abs(ee - (7 * layers / 30 + head) / (layers + head)) < 1e-9 and 0.35 < ee < 0.45


def test_a_draft_models_request_is_retired_once_speculation_stops_paying():
    """With a cache of its own to feed, a draft model's request does not wait and probe again: it retires (its
    draft stops advancing) the first time no k pays, or when it runs in a step too large to speculate in."""
    policy = AdaptivePolicy(k_max=4, token_cost=0.25, step_cost=0.8, retire=True)
    s = SpecState()
    assert policy.k(s) > 0 and not s.retired
    while policy.k(s):
        policy.record(s, policy.k(s), 0)
    assert s.retired
    for _ in range(4 * MAX_BACKOFF):  # never probes again, however long it decodes
        policy.record(s, 0, 0)
        assert policy.k(s) == 0
    crowded = SpecState()
    policy.sit_out(crowded)
    assert crowded.retired and policy.k(crowded) == 0
    lookup = AdaptivePolicy(k_max=4, token_cost=0.0, step_cost=0.8)  # prompt lookup: nothing to feed, no retiring
    policy_free = SpecState()
    lookup.sit_out(policy_free)
    assert not policy_free.retired and lookup.k(policy_free) > 0


def test_a_lookup_verifies_while_its_mean_accepted_run_pays_and_scores_its_guesses_otherwise():
    """Prompt lookup's guesses cost nothing: a new request verifies its first proposal, and its outcome is the
    request's gain; while the gain does not beat the verify step's extra cost, proposals are only scored against
    what the request then decodes (a shadow), and verifying resumes once they score; a shadow waits while every
    token so far matches."""
    policy = AdaptivePolicy(k_max=4, token_cost=0.0, step_cost=1.2, host=True, keep_looking=True)
    s = policy.new_state()
    assert policy.k(s) == 4 and policy.verifies(s)  # untried: its first proposal is verified
    policy.record(s, 4, 1)
    assert s.gain == pytest.approx(1.0) and not policy.verifies(s)  # one of four does not pay: scores from now on
    out = [5, 6]
    policy.shadow(s, len(out), [7, 8, 9, 1])
    policy.score_shadow(s, out + [7])  # all matched so far: not scored yet
    assert s.shadow is not None and s.gain == pytest.approx(1.0)
    policy.score_shadow(s, out + [7, 8, 9, 1])
    assert s.shadow is None and s.gain == pytest.approx(0.5 * 1.0 + 0.5 * 4) and policy.verifies(s)
    assert s.drafted == 4 and s.steps == 1  # a shadow is not a verify step: the metrics count real ones only
    policy.record(s, 4, 0)  # copying stopped
    assert s.gain == pytest.approx(1.25) and policy.verifies(s)
    policy.record(s, 4, 0)
    assert s.gain == pytest.approx(0.625) and not policy.verifies(s)
    s.gain = 1.0
    policy.shadow(s, 10, [1, 2, 3, 4])
    policy.score_shadow(s, [0] * 10 + [1, 2, 0])  # a mismatch at the third token: a verify keeps two
    assert s.gain == pytest.approx(0.5 * 1.0 + 0.5 * 2) and policy.verifies(s)
    s.gain = 1.0
    policy.shadow(s, 0, [1, 2, 3, 4])
    policy.score_shadow(s, [1])  # one match: 0.5 * 1.0 + 0.5 * 1 does not pay yet
    assert s.shadow is not None
    policy.score_shadow(s, [1, 2])  # two already pay for a verify step: the request verifies from its next lookup
    assert s.shadow is None and s.gain == pytest.approx(1.5) and policy.verifies(s)
    gaps, s.misses = [], 0
    for _ in range(COPY_GRACE + 5):  # while its gain pays (it copies), the doubling waits COPY_GRACE lookups
        gaps.append(policy.lookup_gap(s, 8))
        policy.record_miss(s)
    assert gaps == [1] * (COPY_GRACE + 2) + [2, 4, 8]  # COPY_GRACE more lookups after every token
    s.gain, gaps, s.misses = 1.0, [], 0
    for _ in range(6):  # it keeps looking: misses never make it wait, they space its lookups 1, 2, 4, 8, 8 apart
        gaps.append(policy.lookup_gap(s, 8))
        policy.record_miss(s)
        assert policy.k(s) == 4
    assert gaps == [1, 1, 2, 4, 8, 8] and s.misses == 6
    assert AdaptivePolicy(k_max=4, token_cost=0.0, step_cost=1.2, host=True, adaptive=False).verifies(SpecState())


def test_where_a_one_token_step_costs_more_a_lookup_that_gives_no_verify_counts_as_a_miss():
    policy = AdaptivePolicy(k_max=4, token_cost=0.0, step_cost=0.2, host=True, keep_looking=False)
    s = policy.new_state()
    policy.shadow(s, 0, [1, 2])
    policy.record_miss(s)
    assert policy.k(s) == 0  # waits `backoff` tokens, a decode block at a time
    for _ in range(REPROBE_AFTER):
        policy.record(s, 0, 0)
    assert policy.k(s) == 4


@pytest.mark.parametrize("step_cost, token_cost", [(1.7, 0.4), (0.21, 0.05), (0.8, 0.0)])
def test_a_drafters_probes_cost_at_most_the_exploration_budget(step_cost, token_cost):
    """A request at k = 0 probes (one drafted token) no sooner than its cost allows within EXPLORE_BUDGET of
    the tokens it decodes meanwhile; each failed probe doubles the wait."""
    from jinfer.engine.spec.policy import EXPLORE_BUDGET

    policy = AdaptivePolicy(k_max=8, token_cost=token_cost, step_cost=step_cost)
    s = policy.new_state()
    s.rate = 0.0
    probes, tokens = 0, 0
    for _ in range(4096):
        k = policy.k(s)
        if k:
            probes += 1
            policy.record(s, k, 0)
        else:
            policy.record(s, 0, 0)
            tokens += 1
    assert probes >= 1 and probes * (step_cost + token_cost) <= EXPLORE_BUDGET * tokens + 1e-9


def test_measured_step_costs_are_medians_per_batch_size_and_wait_for_enough_steps():
    costs = StepCosts()
    for seconds in (0.02, 0.02, 0.06):  # verify steps of one row
        costs.observe(1, True, 1, seconds)
    costs.observe(1, False, 8, 0.08)  # a decode block: 10 ms a token
    costs.observe(1, False, 1, 0.01)
    assert costs.verify_extra(1) is None  # two decode steps seen: too few yet
    costs.observe(1, False, 2, 5.0)  # the caller paused before reading this one: the median ignores it
    assert costs.verify_extra(1) == pytest.approx(0.02 / 0.01 - 1)
    assert costs.verify_extra(2) is None  # another batch size has costs of its own
    for _ in range(WINDOW):  # only the latest steps count
        costs.observe(1, True, 1, 0.04)
    assert costs.verify_extra(1) == pytest.approx(3.0)
