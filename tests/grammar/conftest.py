"""The engine of the structured-output tests: a tiny random model over SmolLM2's real 49k tokenizer (so the
grammar masks are real ones), warmed once for the package."""

from __future__ import annotations

import dataclasses

import pytest

from jinfer.engine.config import EngineConfig
from jinfer.testing.tiny import TINY, tiny_params

# SmolLM2's vocabulary; EOS <|im_end|> (2), as the real model's.
CONFIG = dataclasses.replace(TINY, vocab_size=49152, eos_token_ids=(2,), max_position_embeddings=512)


@pytest.fixture(scope="package")
def engine(smollm2):
    from jinfer.runtime.build import make_engine

    eng = make_engine(CONFIG, tiny_params(3, CONFIG), smollm2.tokenizer,
                      EngineConfig(max_slots=8, page_size=16, num_pages=256, token_buckets=(64,),
                                   decode_buckets=(8,), max_prefill_chunk=64))
    eng.warmup()
    return eng
