"""Sampled outputs with speculation follow the target's own distribution, for every proposer, a deliberately
bad one (uniformly random drafts) included.

The tiny model's distribution over a request's first four output tokens is computed exactly: the dense
reference's logits at every prefix of the tree of outcomes, cut and penalized by an independent numpy version
of the sampling rules (vLLM's semantics). N requests per case are sampled by the engine (k = 2 proposals after
the first token, so each sample exercises one verify step's accept, reject and bonus paths) and compared with
it by chi-square tests of each position's marginal and of the pair (x2, x3) (outcomes expected fewer than 5
times pooled), Bonferroni-corrected: a case fails falsely with probability at most 1e-4 (the file: 1.6e-3).
Power: moving 2% of the probability between two outcomes of probability <= 0.2 gives a noncentrality of at
least N x 2 x 0.02^2 / 0.2 = 48 at N = 12,000: caught with probability 0.97 by a test of 5 degrees of freedom
(a position's marginal under top-k 4 or 5), 0.91 at 10 and 0.75 at 20 (the pair's), at the corrected level
(scipy.stats.ncx2). Two cases per proposer: temperature 0.7 with top-k, and temperature 1.3 with top-k, top-p,
min-p and the frequency and presence penalties.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from jinfer.inputs import SamplingParams
from jinfer.runtime import reference
from jinfer.testing.tiny import TINY
from tests.engine.spec.test_speculative_engine import spec_engine

N = 12_000
NEW = 4
ALPHA = 1e-4  # per case
PROMPT = list(range(0, 128, 2))  # half the vocabulary: prompt lookup finds a sampled token there about half the time
CASES = {
    "t0.7-topk4": dict(temperature=0.7, top_k=4),
    # Penalties of the output only: a repetition penalty would steer sampling away from the prompt, where
    # prompt lookup finds its proposals (it is covered by tests/engine/spec/test_speculative_engine.py).
    "t1.3-topk5-topp0.8-minp0.1-penalties": dict(temperature=1.3, top_k=5, top_p=0.8, min_p=0.1,
                                                 frequency_penalty=0.7, presence_penalty=0.4),
}


def cut_probs(logits, sp: SamplingParams, prompt, outputs) -> np.ndarray:
    """f64[V]: the next-token distribution after penalties, temperature, top-k, top-p and min-p (numpy)."""
    x = logits.astype(np.float64).copy()
    counts = np.bincount(np.asarray(outputs, int), minlength=len(x)) if outputs else np.zeros(len(x), int)
    seen = np.isin(np.arange(len(x)), prompt) | (counts > 0)
    x = np.where(seen, np.where(x > 0, x / sp.repetition_penalty, x * sp.repetition_penalty), x)
    x = x - sp.frequency_penalty * counts - sp.presence_penalty * (counts > 0)
    x = x / sp.temperature
    keep = np.ones(len(x), bool)
    if sp.top_k > 0:
        keep &= x >= np.sort(x)[-sp.top_k]
    p = np.where(keep, np.exp(x - x[keep].max()), 0)
    p /= p.sum()
    more_likely = np.array([p[p > v].sum() for v in p])
    keep &= more_likely < sp.top_p
    keep &= p >= sp.min_p * p.max()
    p = np.where(keep, p, 0)
    return p / p.sum()


def exact_distribution(params, sp: SamplingParams) -> dict[tuple, float]:
    """P(first NEW output tokens) under the target alone, by walking the tree of outcomes."""
    out = {}

    def walk(prefix: tuple, prob: float):
        if len(prefix) == NEW:
            out[prefix] = prob
            return
        logits = reference.full_logits(params, TINY, PROMPT + list(prefix))[-1]
        p = cut_probs(logits, sp, PROMPT, list(prefix))
        for t in np.flatnonzero(p > 0):
            walk(prefix + (int(t),), prob * p[t])

    walk((), 1.0)
    return out


def chi_square_p(observed: dict, expected: dict, n: int) -> float:
    assert set(observed) <= set(expected), f"impossible outcomes sampled: {sorted(set(observed) - set(expected))[:5]}"
    big = [o for o, p in expected.items() if p * n >= 5]
    obs = [observed.get(o, 0) for o in big]
    exp = [expected[o] * n for o in big]
    if n - sum(exp) > 1e-6:
        obs.append(n - sum(obs))
        exp.append(n - sum(exp))
    return float(stats.chisquare(obs, exp).pvalue)


def marginal(dist: dict[tuple, float], positions: tuple[int, ...]) -> dict[tuple, float]:
    out: dict[tuple, float] = {}
    for outcome, p in dist.items():
        key = tuple(outcome[i] for i in positions)
        out[key] = out.get(key, 0) + p
    return out


@pytest.fixture(scope="module")
def engines(params, tok):
    kw = dict(max_slots=64, num_pages=600, token_buckets=(256,), decode_buckets=(64,), max_waiting=N)
    return {m: spec_engine(params, tok, m, k=2, disable_by_batch_size=64, **kw)
            for m in ("ngram", "early_exit", "draft", "uniform")}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", ["ngram", "early_exit", "draft", "uniform"])
def test_sampled_outputs_follow_the_targets_distribution(engines, params, method, case):
    sp = SamplingParams(max_tokens=NEW, ignore_eos=True, **CASES[case])
    eng = engines[method]
    ids = [eng.add_request(PROMPT, sp) for _ in range(N)]
    done = {}
    while eng.has_work:
        for ev in eng.step():
            if ev.output.finished:
                done[ev.request_id] = ev.output
    samples = [done[i] for i in ids]
    assert sum(o.metrics.spec_draft_tokens for o in samples) > N // 4, "the engine hardly speculated"
    exact = exact_distribution(params, sp)
    tests = [(i,) for i in range(NEW)] + [(1, 2)]
    for positions in tests:
        seen = marginal({tuple(o.token_ids): 1 for o in samples}, positions)  # the outcomes' keys
        observed = dict.fromkeys(seen, 0)
        for o in samples:
            observed[tuple(o.token_ids[i] for i in positions)] += 1
        p = chi_square_p(observed, marginal(exact, positions), N)
        assert p > ALPHA / len(tests), f"{method} {case}, tokens {positions}: chi-square p = {p:.2e}"
