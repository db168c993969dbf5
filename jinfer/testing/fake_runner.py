"""A hand-computable device side for the host engine: no model, no jax.

`FakeRunner` stands where `jinfer.runtime.runner.Runner` stands (the engine takes its runner by injection)
and "samples", for every row that samples, the token after the last one the step fed it: (t + 1) % V (a
decode block's rows count on, step after step, until a stop id). So a prompt ending in token t generates t+1,
t+2, ... and a test knows every output without a model (prompt logprobs too: the next prompt token t's logprob is
-t / V, its rank 1, the top ones t, t+1, ...); the engine's scheduling, decode blocks, one-step
lookahead (`from_prev`), stop tokens, stop strings, streaming and cancellation run for real. `fake_engine()` builds such an engine with the tiny word-level tokenizer.
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
    sampled: np.ndarray  # i32[N, R]
    top: int  # logprob alternatives per token
    want_logprobs: bool
    next_id: np.ndarray  # i32[T]: the plan's TokenInputs.next_id
    vocab_size: int

    def fetch(self):
        lp = plp = None
        if self.want_logprobs:
            N, R = self.sampled.shape
            top_ids = (self.sampled[..., None] + np.arange(self.top)) % np.iinfo(np.int32).max
            top_lp = np.broadcast_to(-np.arange(self.top, dtype=np.float32), (N, R, self.top))
            lp = (np.zeros((N, R), np.float32), top_ids.astype(np.int32), top_lp)
        if (self.next_id >= 0).any():
            T, nxt = len(self.next_id), np.maximum(self.next_id, 0)
            top_ids = ((nxt[:, None] + np.arange(self.top)) % self.vocab_size).astype(np.int32)
            plp = (-nxt.astype(np.float32) / self.vocab_size, np.ones(T, np.int32), top_ids,
                   np.broadcast_to(-np.arange(self.top, dtype=np.float32), (T, self.top)))
        return self.sampled, lp, plp


class FakeRunner:
    def __init__(self, vocab_size: int, engine_config: EngineConfig):
        self.vocab_size = vocab_size
        self.config = engine_config
        self.last_sampled = np.zeros(engine_config.max_slots, np.int32)
        self.num_steps = 0
        self.seeded: list[tuple[int, list[int], int]] = []  # (slot, token ids, prompt length) per seeding

    def warmup(self, stop_width: int) -> None:
        pass

    def dispatch(self, plan: StepPlan) -> FakeStepOutput:
        self.num_steps += 1
        rows = plan.rows
        tokens = np.where(plan.tokens.from_prev, self.last_sampled[rows.slot[plan.tokens.row]], plan.tokens.ids)
        steps = max(plan.max_steps, 1) if plan.decode else 1
        out = np.zeros((steps, plan.num_rows), np.int32)
        for r in np.flatnonzero(rows.sample):
            t = tokens[rows.query_start[r] + rows.query_len[r] - 1]
            for i in range(rows.num_steps[r]):
                t = (t + 1) % self.vocab_size
                out[i, r] = t
                if t in rows.stop_ids[r]:  # a decode block stops the row's steps on its stop ids
                    break
            self.last_sampled[rows.slot[r]] = t
        return FakeStepOutput(out, self.config.max_logprobs, plan.wants_logprobs, plan.tokens.next_id,
                              self.vocab_size)

    def import_kv(self, k, v, pages, slot: int, n: int) -> None:
        pass

    def set_logit_bias(self, slot: int, bias) -> None:
        pass

    def seed_penalty_state(self, slot: int, token_ids, num_prompt: int) -> None:
        self.seeded.append((slot, list(token_ids), num_prompt))


def fake_engine(engine_config: EngineConfig | None = None, tokenizer=None, vocab_size: int = 128) -> Engine:
    """An Engine over a FakeRunner; `tokenizer` defaults to the tiny word-level one (token i is 'w{i}')."""
    from jinfer.testing.tiny import tiny_tokenizer

    cfg = (engine_config or EngineConfig(max_slots=4, page_size=4, num_pages=64, token_buckets=(8, 32),
                                         max_prefill_chunk=16)).resolve("cpu")
    model = ModelConfig(vocab_size=vocab_size, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                        intermediate_size=8, max_position_embeddings=256, eos_token_ids=(), bos_token_id=None)
    num_pages = cfg.num_pages or cfg.cpu_default_pages
    tok = tokenizer if tokenizer is not None else tiny_tokenizer(vocab_size)
    return Engine(model, FakeRunner(vocab_size, cfg), tok, cfg, num_pages)
