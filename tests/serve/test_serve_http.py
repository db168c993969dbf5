"""The OpenAI-compatible HTTP front of a real `jinfer serve --http-port` process (tiny random model), through the
official `openai` client, sync and async, streaming and not: greedy text equals the dense reference's, streams
concatenate to the unary text, usage counts, n choices, logprobs equal gRPC's, every bad field a 400 naming
its `param`, a wrong key 401, a full queue 429, and SIGTERM draining HTTP and gRPC streams together."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request

import openai
import pytest

from jinfer.inputs import SamplingParams
from jinfer.runtime import reference
from jinfer.serve.client import JinferClient
from jinfer.testing.tiny import TINY, tiny_params, tiny_tokenizer
from tests.serve.test_serve_process import ServerProcess, wait_serving

TOKEN = "s3cret-http"
TEMPLATE = "{% for m in messages %}w1 {{ m.content }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
MODEL = "tiny-random"


@pytest.fixture(scope="module")
def server():
    p = ServerProcess("--http-port", "0", "--chat-template", TEMPLATE, env={"JINFER_AUTH_TOKEN": TOKEN})
    try:
        listening = p.wait_event("listening")
        p.wait_event("serving")
        yield p, listening["port"], listening["http_port"]
    finally:
        p.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[2]}/v1", api_key=TOKEN, max_retries=0)


def reference_text(ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
    out = reference.generate(tiny_params(), TINY, [ids], [SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                         ignore_eos=True)])[0]
    return tiny_tokenizer().decode(out.token_ids), out.token_ids


def test_greedy_completion_equals_the_reference_and_the_stream_concatenates_to_it(client):
    prompt = "w5 w6 w7 w8"
    want, ids = reference_text(tiny_tokenizer().encode(prompt), 12)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 12, 16)
    parts = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == want
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == 12
    counted = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                             stream_options={"include_usage": True, "continuous_usage_stats": True},
                                             extra_body={"ignore_eos": True}))
    so_far = [p.usage.completion_tokens for p in counted if p.choices]  # vLLM's usage on every chunk
    assert so_far == sorted(so_far) and so_far[-1] == 12
    assert sum(len(p.choices[0].text.split()) for p in counted if p.choices) == 12
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "length"
    by_ids = client.completions.create(model=MODEL, prompt=tiny_tokenizer().encode(prompt), max_tokens=12,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == want


def test_chat_greedy_stream_and_unary_agree(client):
    messages = [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": [{"type": "text", "text": "w20"},
                                                                                        {"type": "text", "text": " w21"}]}]
    rendered = "w1 w10 w11 w2 w1 w20 w21 w2 w3"
    want, _ = reference_text(tiny_tokenizer().encode(rendered), 10)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == 9 and r.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_seeded_sampling_repeats(client):
    kw = dict(model=MODEL, prompt="w9 w8", max_tokens=8, temperature=1.0, n=3, seed=11)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # seeds 11, 12, 13
    assert a.usage.prompt_tokens == 2 and a.usage.completion_tokens == sum(len(c.text.split()) for c in a.choices)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w4"}], n=2,
                                          max_tokens=4, temperature=0.9, seed=3)
    assert len(chat.choices) == 2


def test_logprobs_equal_grpcs(server, client):
    grpc_port = server[1]
    prompt = "w30 w31 w32"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    with JinferClient(f"127.0.0.1:{grpc_port}", token=TOKEN) as g:
        final = g.generate(prompt, max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    tok = tiny_tokenizer()
    assert lp.tokens == [tok.decode([t.token_id]) for t in final.logprobs]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in final.logprobs], abs=1e-6)
    for mine, theirs in zip(lp.top_logprobs, final.logprobs):
        assert mine == pytest.approx({tok.decode([t.token_id]): t.logprob for t in theirs.top}, abs=1e-6)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w30"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)  # greedy takes the most likely


@pytest.mark.parametrize("body, param", [
    ({"prompt": "w1", "temperature": -1}, "temperature"),
    ({"prompt": "w1", "top_p": 2}, "top_p"),
    ({"prompt": "w1", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "w1", "n": 0}, "n"),
    ({"prompt": "w1", "logprobs": 99}, "logprobs"),
    ({"prompt": "w1", "stop": [""]}, "stop[0]"),
    ({"prompt": [1, 999999]}, "prompt[1]"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "w1", "temprature": 0.5}, "temprature"),
    ({"prompt": "w1", "logit_bias": {"5": 101}}, "logit_bias[5]"),
    ({"prompt": "w1", "logit_bias": {"w5": 1}}, "logit_bias"),
    ({"prompt": "w1", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema"),
    ({"prompt": "w1", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"prompt": "w1", "response_format": {"type": "yaml"}}, "response_format"),
    ({"prompt": "w1", "guided_regex": "(a"}, "guided_regex"),
    ({"prompt": "w1", "guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"prompt": "w1", "min_tokens": 99, "max_tokens": 5}, "min_tokens"),
    ({}, "prompt"),
])
def test_each_bad_completion_field_is_a_400_naming_it(client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=body.get("prompt"),
                                  extra_body={k: v for k, v in body.items() if k != "prompt"})
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "w1"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "w1"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "w1"}], "max_completion_tokens": 10 ** 9}, "max_completion_tokens"),
])
def test_each_bad_chat_field_is_a_400_naming_it(client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=body["messages"],
                                       extra_body={k: v for k, v in body.items() if k != "messages"})
    assert err.value.body["param"] == param, err.value.body


def test_logit_bias_and_a_tokenizer_without_grammar_support(client):
    biased = client.completions.create(model=MODEL, prompt="w1 w2", max_tokens=5, temperature=0,
                                       logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    assert biased.choices[0].text == " ".join(["w42"] * 5)
    # The tiny word-level tokenizer is not one llguidance reads (tests/grammar serves a real one).
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="w1", extra_body={"guided_choice": ["w7"]})
    assert err.value.body["param"] == "guided_choice" and "cannot read" in err.value.body["message"]


def test_wrong_key_and_model_and_the_open_endpoints(server, client):
    port = server[2]
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="w1")
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="w1")
    assert err.value.body["code"] == "model_not_found"
    assert [m.id for m in client.models.list()] == [MODEL]
    for path in ("/health", "/metrics"):  # no token needed, as gRPC health
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            assert resp.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert b"jinfer_generated_tokens_total" in resp.read()


def post(port: int, path: str, body: dict, token: str = TOKEN) -> dict:
    r = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                               headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=10) as resp:
        return json.loads(resp.read())


def test_tokenize_and_detokenize(server):
    port = server[2]
    assert post(port, "/tokenize", {"prompt": "w7 w8"})["tokens"] == [7, 8]
    assert post(port, "/tokenize", {"messages": [{"role": "user", "content": "w4"}]})["tokens"] == [1, 4, 2, 3]
    assert post(port, "/detokenize", {"tokens": [7, 8]})["prompt"] == "w7 w8"
    with pytest.raises(urllib.error.HTTPError) as err:
        post(port, "/detokenize", {"tokens": [-1]})
    assert err.value.code == 400 and json.loads(err.value.read())["error"]["param"] == "tokens[0]"


def test_async_client_streams_many_at_once(server, client):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server[2]}/v1", api_key=TOKEN, max_retries=0)

        async def one(i):
            stream = await aclient.completions.create(model=MODEL, prompt=f"w{i} w{i + 1}", max_tokens=6,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
            return "".join([c.choices[0].text async for c in stream])

        texts = await asyncio.gather(*(one(i) for i in range(6)))
        await aclient.close()
        return texts

    texts = asyncio.run(main())
    for i, t in enumerate(texts):
        assert t == client.completions.create(model=MODEL, prompt=f"w{i} w{i + 1}", max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].text


def test_full_queue_is_429_and_sigterm_drains_both_fronts():
    # Two slots and one waiting place: a gRPC stream and an HTTP stream decode, one HTTP stream waits, the rest
    # of the HTTP calls are refused with 429; then SIGTERM: the three admitted streams run to their end.
    max_tokens = 200
    p = ServerProcess("--http-port", "0", "--max-slots", "2", "--max-waiting", "1", "--drain-grace", "120")
    try:
        listening = p.wait_event("listening")
        p.wait_event("serving")
        http = openai.OpenAI(base_url=f"http://127.0.0.1:{listening['http_port']}/v1", api_key="x", max_retries=0)
        with JinferClient(f"127.0.0.1:{listening['port']}") as g:
            wait_serving(g)
            grpc_call = g.stream("w5", max_tokens=max_tokens, temperature=0, ignore_eos=True)
            first = next(grpc_call)
            streams = [http.completions.create(model=MODEL, prompt="w3 w4", max_tokens=max_tokens, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}) for _ in range(2)]
            with pytest.raises(openai.RateLimitError) as err:
                http.completions.create(model=MODEL, prompt="w3", max_tokens=4)
            assert err.value.status_code == 429 and err.value.body["code"] == "queue_full"
            p.proc.send_signal(signal.SIGTERM)
            draining = p.wait_event("draining", timeout=30)
            assert draining["in_flight"] == 1 and draining["http_in_flight"] == 2
            with pytest.raises(openai.APIStatusError) as err:
                http.completions.create(model=MODEL, prompt="w3", max_tokens=4)
            assert err.value.status_code == 503
            texts = ["".join(c.choices[0].text for c in s) for s in streams]
            assert all(len(t.split()) == max_tokens for t in texts)
            assert sum(len(m.token_ids) for m in [first, *grpc_call]) == max_tokens
        assert p.proc.wait(60) == 0
    finally:
        p.stop()
