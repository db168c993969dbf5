"""The LLM API end to end on the real SmolLM2 model: text in, text out, checked against transformers."""

from __future__ import annotations

import pytest
import torch

from jinfer import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    # Two decode and two prefill shapes rather than the CPU's default eight: compiling SmolLM2's steps is most of
    # this module's time, and these tests batch at most three short prompts.
    from jinfer.engine.config import EngineConfig

    return LLM(model=str(smollm2_gguf), dtype="float32",
               engine_config=EngineConfig(max_slots=4, decode_buckets=(1, 4), token_buckets=(16, 64),
                                            max_prefill_chunk=64))


def test_greedy_text_matches_transformers_generate(llm, hf_smollm2):
    model, hf_tok = hf_smollm2
    prompts = ["The capital of France is", "def add(a, b):"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        assert out.token_ids == want
        assert out.text == hf_tok.decode(want, skip_special_tokens=True)
        assert out.finish_reason == ("stop" if want[-1] in llm.eos_token_ids else "length")


def test_stream_deltas_concatenate_to_generate_text(llm):
    params = SamplingParams(max_tokens=40, temperature=0.8, seed=12)  # seed 11 draws EOS at once
    deltas = list(llm.stream("Write a haiku about the sea.", params))
    assert len(deltas) > 1
    assert "".join(deltas) == llm.generate("Write a haiku about the sea.", params)[0].text


def test_seeded_output_does_not_depend_on_the_batch(llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    alone = llm.generate(["Tell me a story"], params, use_tqdm=False)[0]
    others = SamplingParams(max_tokens=16, temperature=0.7, seed=5)
    mixed = llm.generate(["Hi", "Tell me a story", "1 2 3"], [others, params, others], use_tqdm=False)[1]
    assert alone.token_ids == mixed.token_ids


def test_stop_string_and_length(llm):
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=20, temperature=0, stop=["."]))[0]
    assert out.finish_reason == "stop" and out.text == " Paris"
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=3, temperature=0))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_chat_ends_its_turn(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                   SamplingParams(max_tokens=32, temperature=0))[0]
    assert "<|im_start|>assistant" in out.prompt
    assert "Paris" in out.text and out.finish_reason == "stop"


@pytest.mark.parametrize("prompt, match", [
    ("", r"prompts\[0\] is an empty string"),
    ([], r"prompts\[0\] has no tokens"),
    ([5, 49152], r"prompts\[0\]\[1\]=49152 is not a token id"),
    ([5, -1], r"prompts\[0\]\[1\]=-1"),
    ([1] * 9000, "9000 tokens; the context is 8192"),
])
def test_bad_prompts_raise(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], SamplingParams(max_tokens=2))


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype='float64'"):
        LLM(model="smollm2", dtype="float64")
