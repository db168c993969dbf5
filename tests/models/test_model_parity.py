"""The functional model and the GGUF importer against Hugging Face transformers on the same GGUF file.

Transformers dequantizes the file with its own code and runs its own Llama in PyTorch float32, so
agreement checks our dequantization, the Q/K un-permutation, RoPE, GQA, the norms and the loop.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jinfer.inputs import SamplingParams
from jinfer.runtime import reference

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n",
    "SELECT name, COUNT(*) FROM users",
    "東京は日本の首都であり、",
    "Москва — столица России, и",
    "List three colors:\n1.",
    "The quick brown fox",
]
CHAT = [{"role": "user", "content": "What is the boiling point of water in Celsius?"}]
NEW_TOKENS = 32


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding with transformers' KV cache, never stopping early."""
    out, past = [], None
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            t = int(res.logits[0, -1].argmax())
            out.append(t)
            x = torch.tensor([[t]])
    return out


def _prompt_ids(hf_tok):
    ids = [hf_tok(p).input_ids for p in PROMPTS]
    chat = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids.append(hf_tok(chat, add_special_tokens=False).input_ids)
    return ids


def test_logits_match_transformers(smollm2, hf_smollm2):
    model, hf_tok = hf_smollm2
    worst = 0.0
    for ids in _prompt_ids(hf_tok)[:5]:
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        got = reference.full_logits(smollm2.params, smollm2.config, ids)
        diff = float(np.abs(got - want).max())
        rel = diff / float(np.abs(want).max())
        worst = max(worst, rel)
        print(f"{len(ids)} tokens: max |jinfer - transformers| = {diff:.3e} (relative {rel:.2e})")
        assert rel < 1e-4, f"logits differ by {diff} (relative {rel}) on prompt {ids}"
    print(f"worst relative logit difference: {worst:.2e}")


def test_greedy_continuations_match_transformers(smollm2, hf_smollm2):
    model, hf_tok = hf_smollm2
    prompts = _prompt_ids(hf_tok)
    assert len(prompts) >= 8
    # All prompts in one batch: this also checks that rows of different lengths do not interact.
    ours = reference.generate(smollm2.params, smollm2.config, prompts,
                              [SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)] * len(prompts))
    for ids, out in zip(prompts, ours):
        want = _hf_greedy(model, ids, NEW_TOKENS)
        assert out.token_ids == want, (
            f"prompt {hf_tok.decode(ids)!r}:\n jinfer {hf_tok.decode(out.token_ids)!r}\n hf     {hf_tok.decode(want)!r}")
