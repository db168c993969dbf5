"""The edge (jinfer.inputs): every prompt form and sampling field checked once, errors naming the field."""

from __future__ import annotations

import math

import pytest

from jinfer.inputs import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    CheckedRequest,
    InputChecker,
    Prompt,
    SamplingParams,
    check_request_id,
)
from jinfer.testing.tiny import tiny_tokenizer
from jinfer.text.tokenizer import Tokenizer

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"


class CountingTokenizer(Tokenizer):
    """The tiny word-level tokenizer (with a chat template), counting how often it encodes."""

    def __init__(self):
        super().__init__(tiny_tokenizer().backend, chat_template=TEMPLATE)
        self.encodes = 0

    def encode(self, text, add_special_tokens=True):
        self.encodes += 1
        return super().encode(text, add_special_tokens)


def checker(**kw) -> InputChecker:
    limits = dict(vocab_size=128, max_model_len=64, max_logprobs=3, usable_pages=10, page_size=4)
    limits.update(kw)
    return InputChecker(**limits)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=math.inf), "temperature=inf must be a finite number"),
    (dict(temperature=math.nan), "temperature=nan"),
    (dict(repetition_penalty=math.inf), "repetition_penalty=inf must be a finite number > 0"),
    (dict(top_p=math.nan), "top_p=nan"),
    (dict(stop=["x"] * (MAX_STOP_STRINGS + 1)), f"stop has {MAX_STOP_STRINGS + 1} strings; at most"),
    (dict(stop=["y" * (MAX_STOP_STRING_CHARS + 1)]), r"stop\[0\] has 257 characters"),
    (dict(stop=["a", ""]), r"stop\[1\]=''"),
    (dict(stop_token_ids=[1, -2]), r"stop_token_ids\[1\]=-2"),
    (dict(ignore_eos="yes"), "ignore_eos='yes' must be true or false"),
])
def test_sampling_values_that_mean_nothing_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_errors_quote_a_huge_value_only_in_part():
    with pytest.raises(ValueError) as e:
        SamplingParams(stop_token_ids=["z" * 100_000])
    assert len(str(e.value)) < 200


def test_sampling_against_the_engine_names_the_field():
    c = checker()
    with pytest.raises(ValueError, match=r"sampling\.stop_token_ids\[1\]=128 is not a token id in the vocabulary"):
        c.sampling({"stop_token_ids": [5, 128]}, "sampling")
    with pytest.raises(ValueError, match="sampling.logprobs=4 exceeds the engine's max_logprobs=3"):
        c.sampling(SamplingParams(logprobs=4), "sampling")
    with pytest.raises(ValueError, match="sampling.temprature is not a sampling field"):
        c.sampling({"temprature": 0.5}, "sampling")
    with pytest.raises(ValueError, match="sampling.top_p=1.5 must be in"):
        c.sampling({"top_p": 1.5}, "sampling")
    assert c.sampling({"stop": ["a"], "max_tokens": 3}) == SamplingParams(stop=("a",), max_tokens=3)


@pytest.mark.parametrize("prompt, match", [
    ("", "p is an empty string"),
    ([], "p has no tokens"),
    ([1, 128], r"p\[1\]=128 is not a token id in the vocabulary \[0, 128\)"),
    ([1, True], r"p\[1\]=True is not a token id"),
    ([1] * 64, "p has 64 tokens; the context is 64"),
    (b"w1", "p must be a string or a list of token ids, not bytes"),
    ({"ids": [1]}, "p must be a string or a list of token ids, not dict"),
])
def test_bad_prompts_name_the_field(prompt, match):
    with pytest.raises(ValueError, match=match):
        checker(tokenizer=tiny_tokenizer()).prompt(prompt, "p")


def test_text_is_tokenized_once_and_kept_with_its_ids():
    tok = CountingTokenizer()
    c = checker(tokenizer=tok)
    req = c.request("w5 w6 w7", {"max_tokens": 4})
    assert tok.encodes == 1
    assert req == CheckedRequest(Prompt((5, 6, 7), "w5 w6 w7"), SamplingParams(max_tokens=4))
    assert c.request(req.prompt, {"max_tokens": 4}) == req and tok.encodes == 1  # a Prompt is not re-encoded


def test_chat_is_rendered_once_with_known_roles_only():
    tok = CountingTokenizer()
    c = checker(tokenizer=tok)
    p = c.chat([{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"}])
    assert p.text == "<system>w1<user>w2 w3<a>" and tok.encodes == 1
    with pytest.raises(ValueError, match=r"m\[1\]\.role='hacker' is not one of \['system', 'user', 'assistant'"):
        c.chat([{"role": "user", "content": "w1"}, {"role": "hacker", "content": "w2"}], "m")
    with pytest.raises(ValueError, match=r"m\[0\]\.role is empty"):
        c.chat([{"content": "w1"}], "m")
    with pytest.raises(ValueError, match=r"m\[0\]\.content must be a string"):
        c.chat([{"role": "user", "content": 5}], "m")
    with pytest.raises(ValueError, match="m is empty"):
        c.chat([], "m")
    with pytest.raises(ValueError, match="m: this model has no chat_template"):
        checker(tokenizer=tiny_tokenizer()).chat([{"role": "user", "content": "w1"}], "m")


def test_a_request_the_pool_can_never_hold_is_refused_naming_pages_and_pool():
    with pytest.raises(ValueError, match=r"prompt \(20 tokens\) \+ max_tokens=30 needs 13 KV pages; the pool has 10"):
        checker().request(list(range(20)), {"max_tokens": 30})
    # Capped at the context: a long max_tokens alone is not refused when the context fits the pool.
    assert checker(max_model_len=40).request([1], {"max_tokens": 10_000}).sampling.max_tokens == 10_000


def test_request_ids_are_short_and_printable():
    assert check_request_id("abc-1") == "abc-1"
    with pytest.raises(ValueError, match="request_id has 300 characters; at most 256"):
        check_request_id("x" * 300)
    with pytest.raises(ValueError, match="request_id='a\\\\nb' has unprintable characters"):
        check_request_id("a\nb")
