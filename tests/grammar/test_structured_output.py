"""Structured output in the engine (tiny random model over SmolLM2's real 49k tokenizer, so the grammar masks
are real ones): 50 generated JSON schemas and 20 regexes, greedy and sampled, every output parses and
validates (jsonschema, re.fullmatch); requests without a grammar give the same tokens whether or not grammar
requests share their batch; bad constraints are refused naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from jinfer.grammar import StructuredOutputs
from jinfer.inputs import SamplingParams
from tests.engine.test_fake_engine import run
from tests.grammar.schemas import REGEXES, random_schema

PROMPT = "Answer in JSON:"


def constrained(kind: str, value, temperature: float, seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=200, temperature=temperature, seed=seed, structured_outputs={kind: value})


def test_fifty_generated_schemas_greedy_and_sampled_all_validate(engine):
    rng = np.random.default_rng(0)
    schemas = [random_schema(rng) for _ in range(50)]
    reqs = [(PROMPT, constrained("json", s, t, seed)) for seed, s in enumerate(schemas) for t in (0.0, 1.0)]
    outs = run(engine, reqs)
    for (_, sp), out in zip(reqs, outs):
        schema = json.loads(sp.structured_outputs.json)
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)
    assert len({o.text for o in outs}) > 50  # the model's own choices, not one canned instance


def test_twenty_regexes_greedy_and_sampled_all_match(engine):
    reqs = [(PROMPT, constrained("regex", r, t, seed)) for seed, r in enumerate(REGEXES) for t in (0.0, 0.7)]
    for (_, sp), out in zip(reqs, run(engine, reqs)):
        assert re.fullmatch(sp.structured_outputs.regex, out.text), (sp.structured_outputs.regex, out.text)


def test_choice_json_object_and_grammar(engine):
    choices = ["the first answer", "second", "3rd"]
    reqs = [(PROMPT, constrained("choice", choices, t, s)) for s, t in enumerate((0.0, 1.0, 1.0, 1.0))]
    # Any object: a random model would write one string forever, so a bias on '"' and '}' ends it.
    ends = {engine.tokenizer.encode(c, add_special_tokens=False)[0]: 20.0 for c in ('"', "}")}
    reqs += [(PROMPT, SamplingParams(max_tokens=120, temperature=0, logit_bias=ends,
                                     structured_outputs={"json_object": True}))]
    reqs += [(PROMPT, constrained("grammar", 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/', 1.0, 9))]
    reqs += [(PROMPT, constrained("grammar", 'root ::= "x" [0-9] [0-9]?', 1.0, 9))]  # llama.cpp GBNF
    outs = run(engine, reqs)
    assert all(o.text in choices for o in outs[:4])
    assert isinstance(json.loads(outs[4].text), dict)
    assert re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", outs[5].text)
    assert re.fullmatch(r"x[0-9]{1,2}", outs[6].text)


def test_requests_without_a_grammar_are_unchanged_by_grammar_requests_beside_them(engine):
    plain = [("Once upon a time", SamplingParams(max_tokens=24, temperature=0)),
             ("The weather today", SamplingParams(max_tokens=24, temperature=0.9, seed=5)),
             ("Numbers: 1 2 3", SamplingParams(max_tokens=24, temperature=1.0, top_k=50, seed=6))]
    alone = run(engine, plain)
    rng = np.random.default_rng(1)
    guided = [(PROMPT, constrained("json", random_schema(rng), 1.0, k)) for k in range(5)]
    mixed = run(engine, guided[:3] + plain + guided[3:])
    assert [o.token_ids for o in mixed[3:6]] == [o.token_ids for o in alone]
    assert all(o.finish_reason == "stop" for o in mixed[:3] + mixed[6:])


@pytest.mark.parametrize("spec, match", [
    ({"json": "{"}, r"structured_outputs\.json: "),
    ({"json": {"type": "nonsense"}}, r"structured_outputs\.json: .*nonsense"),
    ({"regex": "(unclosed"}, r"structured_outputs\.regex: .*unclosed"),
    ({"grammar": "start: undefined_rule"}, r"structured_outputs\.grammar: .*undefined_rule"),
    ({"choice": []}, r"structured_outputs\.choice is empty"),
    ({"choice": "yes"}, r"structured_outputs\.choice must be a list"),
    ({"regex": "a", "choice": ["b"]}, r"structured_outputs: exactly one of .* not 2"),
    ({}, r"structured_outputs: exactly one of"),
    ({"jsn": "{}"}, r"structured_outputs: jsn is not a field"),
])
def test_bad_constraints_are_refused_naming_the_field(engine, spec, match):
    with pytest.raises(ValueError, match=match):
        engine.inputs.request("hi", {"structured_outputs": spec}, sampling_field=None)


def test_structured_outputs_needs_a_tokenizer():
    from jinfer.inputs import InputChecker

    checker = InputChecker(vocab_size=10, max_model_len=32, max_logprobs=0, usable_pages=8, page_size=4)
    with pytest.raises(ValueError, match="structured_outputs: this model has no tokenizer"):
        checker.request([1, 2], SamplingParams(structured_outputs=StructuredOutputs(regex="a")))
