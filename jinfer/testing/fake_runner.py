"""A hand-computable device side for the host engine: no model, no jax.

`FakeRunner` stands where `jinfer.runtime.runner.Runner` stands (the engine takes its runner by injection)
and "samples", for every slot that samples, the token after the last one the step fed it: (t + 1) % V.
So a prompt ending in token t generates t+1, t+2, ... and a test knows every output without a model; the
engine's scheduling, one-step lookahead (`from_prev`), stop tokens, stop strings, streaming and
cancellation run for real. `fake_engine()` builds such an engine with the tiny word-level tokenizer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jinfer.engine.config import EngineConfig
from jinfer.engine.engine import Engine
from jinfer.engine.step_plan import StepPlan
from jinfer.models.config import ModelConfig


@dataclasses.dataclass
class FakeStepOutput:
    sampled: np.ndarray  # i32[S]
    top: int  # logprob alternatives per token
    want_logprobs: bool

    def fetch(self):
        if not self.want_logprobs:
            return self.sampled, None
        S = len(self.sampled)
        top_ids = (self.sampled[:, None] + np.arange(self.top)[None]) % np.iinfo(np.int32).max
        top_lp = np.broadcast_to(-np.arange(self.top, dtype=np.float32), (S, self.top))
        return self.sampled, (np.zeros(S, np.float32), top_ids.astype(np.int32), top_lp)


class FakeRunner:
    def __init__(self, vocab_size: int, engine_config: EngineConfig):
        self.vocab_size = vocab_size
        self.config = engine_config
        self.last_sampled = np.zeros(engine_config.max_slots, np.int32)
        self.num_steps = 0
        self.seeded: list[tuple[int, list[int], int]] = []  # (slot, token ids, prompt length) per seeding

    def warmup(self) -> None:
        pass

    def dispatch(self, plan: StepPlan, want_logprobs: bool = False) -> FakeStepOutput:
        self.num_steps += 1
        tokens = np.where(plan.tokens.from_prev, self.last_sampled[plan.tokens.slot], plan.tokens.ids)
        new = self.last_sampled.copy()
        for s in np.flatnonzero(plan.slots.sample):
            last = tokens[plan.slots.query_start[s] + plan.slots.query_len[s] - 1]
            new[s] = (last + 1) % self.vocab_size
        self.last_sampled = new
        return FakeStepOutput(new.copy(), self.config.max_logprobs, want_logprobs)

    def import_kv(self, k, v, pages, slot: int, n: int) -> None:
        pass

    def seed_penalty_state(self, slot: int, token_ids, num_prompt: int) -> None:
        self.seeded.append((slot, list(token_ids), num_prompt))


def fake_engine(engine_config: EngineConfig | None = None, tokenizer=None, vocab_size: int = 128) -> Engine:
    """An Engine over a FakeRunner; `tokenizer` defaults to the tiny word-level one (token i is 'w{i}')."""
    from jinfer.testing.tiny import tiny_tokenizer

    cfg = engine_config or EngineConfig(max_slots=4, page_size=4, num_pages=64, token_buckets=(8, 32),
                                        max_prefill_chunk=16)
    model = ModelConfig(vocab_size=vocab_size, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                        intermediate_size=8, max_position_embeddings=256, eos_token_ids=(), bos_token_id=None)
    num_pages = cfg.num_pages or cfg.cpu_default_pages
    tok = tokenizer if tokenizer is not None else tiny_tokenizer(vocab_size)
    return Engine(model, FakeRunner(vocab_size, cfg), tok, cfg, num_pages)
