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


def test_logit_bias_then_penalties_match_numpy(setup):
    """vLLM's order: the bias is added first, then penalties apply to the biased logits; a slot's bias does not
    leak into the next request that takes the slot."""
    params, eng = setup
    prompt = [3, 8, 3, 21]
    bias = {5: 4.0, 17: -100.0, 40: 2.5}
    sp = SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.5, logit_bias=bias, ignore_eos=True)
    plain = SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.5, ignore_eos=True)
    outs = run_workload(eng, [(0, prompt, sp), (40, prompt, plain)])  # the second takes the first's freed slot
    got, after = outs[0].token_ids, outs[1].token_ids
    b = np.zeros(TINY.vocab_size)
    b[list(bias)] = list(bias.values())

    def greedy(bias_vec):
        seq, out = list(prompt), []
        for _ in range(10):
            z = _next_logits(params, seq) + bias_vec
            seen = np.isin(np.arange(TINY.vocab_size), seq)
            t = int(np.where(seen, np.where(z > 0, z / 1.5, z * 1.5), z).argmax())
            out.append(t)
            seq.append(t)
        return out

    assert got == greedy(b) and 17 not in got
    assert after == greedy(np.zeros(TINY.vocab_size)) != got


def test_min_tokens_bans_stop_tokens_and_strings_until_reached(setup):
    params, eng = setup
    prompt = [11, 12, 13]
    first = run_workload(eng, [(0, prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))])[0]
    stop_tok = first.token_ids[0]
    # Without min_tokens the first token stops it; with min_tokens=5 the stop token is banned for 5 tokens.
    early = run_workload(eng, [(0, prompt, SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_tok]))])
    assert early[0].token_ids == [stop_tok] and early[0].finish_reason == "stop" and early[0].stop_reason == stop_tok
    sp = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_tok], min_tokens=5)
    got = run_workload(eng, [(0, prompt, sp)])[0]
    seq, want = list(prompt), []
    for _ in range(8):
        z = _next_logits(params, seq)
        if len(want) < 5:
            z[stop_tok] = -np.inf
        t = int(z.argmax())
        want.append(t)
        seq.append(t)
        if t == stop_tok:
            break
    assert got.token_ids == want and stop_tok not in got.token_ids[:5]
    # A stop string that appears before min_tokens does not end the output either.
    text = tiny_tokenizer().decode(first.token_ids[:1])
    s = run_workload(eng, [(0, prompt, SamplingParams(max_tokens=6, temperature=0, stop=[text], min_tokens=3,
                                                      ignore_eos=True))])[0]
    assert s.token_ids[:3] == first.token_ids[:3] and s.text.startswith(text)


def test_include_stop_str_in_output(setup):
    _, eng = setup
    prompt = [11, 12, 13]
    ref = run_workload(eng, [(0, prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))])[0]
    stop = ref.text.split()[2]
    cut = run_workload(eng, [(0, prompt, SamplingParams(max_tokens=8, temperature=0, stop=[stop], ignore_eos=True)),
                             (0, prompt, SamplingParams(max_tokens=8, temperature=0, stop=[stop], ignore_eos=True,
                                                        include_stop_str_in_output=True))])
    head = ref.text[:ref.text.index(stop)]
    assert cut[0].text == head and cut[1].text == head + stop
    assert cut[0].stop_reason == cut[1].stop_reason == stop
