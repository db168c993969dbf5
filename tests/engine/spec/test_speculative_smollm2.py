"""Speculative decoding on the real model: with each proposer, greedy output equals non-speculative greedy output
(the dense reference loop, itself checked against transformers in tests/models/test_model_parity.py) token for
token on the model-parity prompt set, all at once and (the first and the chat prompt) request by request."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from jinfer.engine.config import EngineConfig
from jinfer.inputs import SamplingParams
from jinfer.models import llama
from jinfer.runtime import reference
from jinfer.runtime.build import build_engine
from tests.models.test_model_parity import CHAT, NEW_TOKENS, PROMPTS

pytestmark = pytest.mark.slow

# Few compiled steps: one decode bucket (a lone request runs in it padded, as it would beside idle slots), one
# prefill bucket: a prefill, a decode block and a verify step per method.
SMALL = dict(max_slots=9, decode_buckets=(9,), token_buckets=(256,), num_pages=256)
BATCH_LIMIT = 16  # speculate in the batch of nine too (the CPU default stops at four)


@pytest.fixture(scope="module")
def prompts(smollm2):
    tok = smollm2.tokenizer
    return [tok.encode(p) for p in PROMPTS] + [tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False)]


@pytest.fixture(scope="module")
def want(smollm2, prompts):
    sp = [SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)] * len(prompts)
    return [g.token_ids for g in reference.generate(smollm2.params, smollm2.config, prompts, sp)]


def random_draft(config):
    """A random-weight model of the target's vocabulary (it proposes nonsense: everything is rejected)."""
    c = dataclasses.replace(config, num_layers=2, hidden_size=64, intermediate_size=128, num_heads=2,
                            num_kv_heads=1, head_dim=32)
    return c, llama.init_params(c, jax.random.key(1))


@pytest.mark.parametrize("method", ["ngram", "early_exit", "draft"])
def test_greedy_with_speculation_equals_greedy_without(smollm2, prompts, want, method):
    # Costs of zero: k follows acceptance alone (on this CPU the measured costs would rightly turn the model-based
    # drafters off), so a drafter that is always wrong stops after a few verify steps instead of paying for one
    # every token.
    spec = {"method": method, "num_speculative_tokens": 4, "disable_by_batch_size": BATCH_LIMIT,
            "verify_step_cost": 0.0, "verify_token_cost": 0.0, "draft_cost": 0.0}
    draft = None
    if method == "draft":
        spec["model"] = "random"
        draft = random_draft(smollm2.config)
    eng = build_engine(smollm2.config, smollm2.params, smollm2.tokenizer,
                       EngineConfig(speculative=spec, **SMALL), seed=0, draft_model=draft)
    eng.warmup()
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)

    def run(batch):
        ids = [eng.add_request(p, sp) for p in batch]
        done = {}
        while eng.has_work:
            for ev in eng.step():
                if ev.output.finished:
                    done[ev.request_id] = ev.output
        return [done[i] for i in ids]

    # Alone: the first prompt and the chat one (each alone is a batch-1 run of the same code; the suite's time went
    # mostly to these).
    alone = (0, len(prompts) - 1)
    one_by_one = {i: run([prompts[i]])[0] for i in alone}
    together = run(prompts)
    for i, w in enumerate(want):
        if i in one_by_one:
            assert one_by_one[i].token_ids == w, f"prompt {i} alone"
        assert together[i].token_ids == w, f"prompt {i} in the batch"
    assert sum(o.metrics.spec_verify_steps for o in together) > 0
    print(f"{method}: acceptance {[round(o.metrics.spec_acceptance_rate or 0, 2) for o in one_by_one.values()]}")
