"""Fixtures of the entry-point tests: the tiny model's params and an `LLM` over them (built once per module)."""

from __future__ import annotations

import pytest

from jinfer import LLM
from jinfer.checkpoints.load import LoadedModel
from jinfer.engine.config import EngineConfig
from jinfer.testing.tiny import TINY, tiny_params, tiny_tokenizer

ENGINE = EngineConfig(max_slots=4, page_size=4, num_pages=64, token_buckets=(8, 32), max_prefill_chunk=16)


@pytest.fixture(scope="module")
def params():
    return tiny_params(3)


@pytest.fixture(scope="module")
def llm(params):
    return LLM(LoadedModel(TINY, params, tiny_tokenizer()), engine_config=ENGINE)
