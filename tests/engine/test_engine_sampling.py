"""Engine sampling features against numpy recomputations from the dense reference model:
penalties, min-p, logprobs."""

from __future__ import annotations

import numpy as np
import pytest

from jinfer.inputs import SamplingParams
from jinfer.runtime import reference
from jinfer.testing.tiny import TINY, tiny_params, tiny_tokenizer
from tests.engine.test_engine import make_engine, run_workload


@pytest.fixture(scope="module")
def setup():
    params = tiny_params(1)
    return params, make_engine(params, tiny_tokenizer(), num_pages=64)


def _next_logits(params, seq):
    return reference.full_logits(params, TINY, seq)[-1].astype(np.float64)


def _log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def test_penalized_greedy_matches_numpy(setup):
    params, eng = setup
    prompt = [5, 9, 5, 17, 33, 9, 2]
    sp = SamplingParams(max_tokens=14, temperature=0, repetition_penalty=1.8, presence_penalty=0.7,
                        frequency_penalty=0.4, ignore_eos=True)
    got = run_workload(eng, [(0, prompt, sp)])[0].token_ids
    seq, out = list(prompt), []
    for _ in range(14):
        z = _next_logits(params, seq)
        counts = np.bincount(out, minlength=TINY.vocab_size)
        seen = np.isin(np.arange(TINY.vocab_size), prompt) | (counts > 0)
        z = np.where(seen, np.where(z > 0, z / 1.8, z * 1.8), z) - 0.4 * counts - 0.7 * (counts > 0)
        t = int(z.argmax())
        out.append(t)
        seq.append(t)
    assert got == out


def test_min_p_only_samples_allowed_tokens(setup):
    params, eng = setup
    prompt = [7, 7, 1, 2]
    sp = SamplingParams(max_tokens=12, temperature=1.0, min_p=0.3, seed=4, ignore_eos=True)
    got = run_workload(eng, [(0, prompt, sp)])[0].token_ids
    seq = list(prompt)
    for t in got:
        p = np.exp(_log_softmax(_next_logits(params, seq)))
        assert p[t] >= 0.3 * p.max() - 1e-6
        seq.append(t)


def test_logprobs_are_the_models(setup):
    params, eng = setup
    prompt = [11, 22, 33]
    sp = SamplingParams(max_tokens=6, temperature=0.9, seed=1, logprobs=3, ignore_eos=True)
    out = run_workload(eng, [(0, prompt, sp)])[0]
    seq = list(prompt)
    for t, lp in zip(out.token_ids, out.logprobs):
        want = _log_softmax(_next_logits(params, seq))
        assert lp.token_id == t
        assert lp.logprob == pytest.approx(want[t], abs=1e-4)
        top = np.argsort(-want)[:3]
        assert list(lp.top) == [int(i) for i in top]
        np.testing.assert_allclose(list(lp.top.values()), want[top], atol=1e-4)
        seq.append(t)
