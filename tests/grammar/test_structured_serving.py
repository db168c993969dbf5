"""Structured output through the fronts, in-process over a tiny random model with SmolLM2's tokenizer: the
official openai client (response_format json_schema / json_object, guided_regex, guided_choice,
structured_outputs) and the gRPC client (SamplingParams.structured_outputs); outputs validate, bad schemas are
400s naming the body field."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import openai
import pytest

from jinfer.serve.app import ServeOptions
from jinfer.serve.background import BackgroundServer
from jinfer.serve.client import JinferClient
from tests.grammar.schemas import random_schema


@pytest.fixture(scope="module")
def server(engine):
    srv = BackgroundServer(engine, ServeOptions(host="127.0.0.1", port=0, http_port=0, metrics_port=0,
                                                model_name="tiny-49k"), warmup=lambda: None)
    try:
        yield srv
    finally:
        srv.drain(grace=0.0)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.app.http_port}/v1", api_key="none", max_retries=0)


def server_tokenizer(client):
    from jinfer.checkpoints.gguf_vocab import tokenizer_from_gguf
    from jinfer.checkpoints.pull import gguf_path

    return tokenizer_from_gguf(str(gguf_path("smollm2")))


def test_response_format_json_schema_and_json_object(client):
    rng = np.random.default_rng(7)
    for k in range(4):
        schema = random_schema(rng)
        r = client.chat.completions.create(
            model="tiny-49k", messages=[{"role": "user", "content": "Give me JSON."}], max_tokens=200,
            temperature=1.0, seed=k,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        assert r.choices[0].finish_reason == "stop"
    # Any object: a random model would write one string forever, so a logit bias on '"' and '}' ends it (the
    # grammar decides where they may go).
    tok = server_tokenizer(client)
    bias = {str(tok.encode(c, add_special_tokens=False)[0]): 20 for c in ('"', "}")}
    r = client.completions.create(model="tiny-49k", prompt="JSON:", max_tokens=150, temperature=0, logit_bias=bias,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(r.choices[0].text), dict) and r.choices[0].finish_reason == "stop"


def test_guided_regex_choice_and_structured_outputs_streamed(client):
    parts = list(client.completions.create(model="tiny-49k", prompt="Date:", max_tokens=30, temperature=1.0,
                                           seed=1, stream=True,
                                           extra_body={"guided_regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}))
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", "".join(p.choices[0].text for p in parts))
    r = client.completions.create(model="tiny-49k", prompt="Pick:", max_tokens=10, n=3, temperature=1.0, seed=2,
                                  extra_body={"guided_choice": ["red", "green", "blue"]})
    assert all(c.text in ("red", "green", "blue") for c in r.choices)
    r = client.completions.create(model="tiny-49k", prompt="Pick:", max_tokens=10,
                                  extra_body={"structured_outputs": {"choice": ["on", "off"]}})
    assert r.choices[0].text in ("on", "off")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}, "response_format"),
    ({"guided_json": {"properties": 5}}, "guided_json"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs"),
])
def test_bad_constraints_are_400s_naming_the_body_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-49k", prompt="x", max_tokens=5, extra_body=extra)
    assert err.value.body["param"] == param, err.value.body


def test_grpc_structured_outputs(server):
    with JinferClient(f"127.0.0.1:{server.port}") as g:
        out = g.generate("Time:", max_tokens=20, temperature=1.0, seed=3,
                         structured_outputs={"regex": r"[0-2][0-9]:[0-5][0-9]"})
        assert re.fullmatch(r"[0-2][0-9]:[0-5][0-9]", out.text)
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        out = g.generate("JSON:", max_tokens=40, temperature=0, structured_outputs={"json": json.dumps(schema)})
        jsonschema.validate(json.loads(out.text), schema)
