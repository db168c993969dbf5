"""SamplingParams.n through LLM.generate: n completions of one prompt, seeded ones equal to n separate requests
with seeds seed, seed + 1, ...; the later completions read the prompt's KV pages from the prefix cache rather
than computing them; vLLM's RequestOutput.outputs view."""

from __future__ import annotations

import pytest

from jinfer.entrypoints.llm import LLM
from jinfer.inputs import SamplingParams
from jinfer.testing.tiny import tiny_params, tiny_tokenizer
from tests.engine.test_engine import assert_pages_all_returned, make_engine


@pytest.fixture(scope="module")
def llm():
    llm = object.__new__(LLM)  # the constructor loads a checkpoint by name; generate needs only an engine
    llm.engine = make_engine(tiny_params(2), tiny_tokenizer(), num_pages=64)
    llm.tokenizer = llm.engine.tokenizer
    return llm


def test_n_completions_share_the_prompt_pages_and_repeat_separate_seeded_requests(llm):
    prompt = list(range(3, 30))  # 27 tokens: 6 full pages of 4
    sp = SamplingParams(max_tokens=6, temperature=1.0, seed=40, n=3, logprobs=2, ignore_eos=True)
    (out,) = llm.generate([prompt], sp, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    separate = llm.generate([prompt] * 3, [SamplingParams(max_tokens=6, temperature=1.0, seed=40 + j, logprobs=2,
                                                          ignore_eos=True) for j in range(3)], use_tqdm=False)
    assert [c.token_ids for c in out.outputs] == [o.token_ids for o in separate]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # The first computes the prompt; the other two find its 6 full pages cached.
    assert [c.num_cached_tokens for c in out.completions][1:] == [24, 24]
    c = out.outputs[1]
    assert c.text == out.completions[1].text and c.finish_reason == "length" and len(c.logprobs) == 6
    for tok, entry in zip(c.token_ids, c.logprobs):
        assert next(iter(entry)) == tok and len(entry) in (2, 3)
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))
    assert out.text == out.outputs[0].text  # the flat fields are the first completion's
    assert_pages_all_returned(llm.engine)


def test_chat_over_several_conversations_and_get_tokenizer(llm):
    llm.engine.tokenizer  # the tiny tokenizer has no chat template: each conversation is refused by index
    with pytest.raises(ValueError, match=r"messages\[1\]: this model has no chat_template"):
        llm.engine.inputs.chat([{"role": "user", "content": "w1"}], "messages[1]")
    assert llm.get_tokenizer() is llm.tokenizer
