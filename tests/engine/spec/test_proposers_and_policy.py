"""The host side of speculation: prompt lookup against a brute-force search, and the adaptive policy's choice of
k against the expected-tokens-per-cost it maximizes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jinfer.engine.spec.policy import MISS_LIMIT, REPROBE_AFTER, AdaptivePolicy, SpecState, best_k
from jinfer.engine.spec.proposers import NgramProposer


def brute_force_lookup(seq: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        if n >= len(seq):
            continue
        suffix = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):  # latest earlier occurrence first
            if seq[start:start + n] == suffix:
                return seq[start + n:start + n + k]
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


@pytest.mark.parametrize("rate", np.linspace(0, 1, 21))
@pytest.mark.parametrize("cost", [0.02, 0.12, 0.5])
def test_best_k_maximizes_expected_tokens_per_cost(rate, cost):
    def value(k):
        return sum(rate ** i for i in range(k + 1)) / (1 + cost * k)

    k = best_k(rate, 8, cost)
    assert value(k) >= max(value(j) for j in range(9)) - 1e-9


def test_a_request_that_stops_paying_stops_speculating_and_probes_again():
    policy = AdaptivePolicy(k_max=4, token_cost=0.12)
    s = SpecState()
    assert policy.k(s) == 4  # the prior: speculate from the start
    for _ in range(12):
        policy.record(s, policy.k(s) or 1, 0)
    assert policy.k(s) == 0
    for _ in range(REPROBE_AFTER):
        policy.record(s, 0, 0)
    assert policy.k(s) == 1  # tries again
    for _ in range(12):
        policy.record(s, policy.k(s), policy.k(s))
    assert policy.k(s) == 4
    assert AdaptivePolicy(k_max=3, token_cost=0.12, adaptive=False).k(SpecState(rate=0.0)) == 3


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
