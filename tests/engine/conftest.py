"""Fixtures of the engine tests: the tiny model's params and tokenizer, and an engine over them built once per
module (`tests.engine.test_engine.make_engine`'s small pool and buckets)."""

from __future__ import annotations

import pytest

from jinfer.testing.tiny import tiny_params, tiny_tokenizer


@pytest.fixture(scope="module")
def params():
    return tiny_params()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def engine(params, tok):
    from tests.engine.test_engine import make_engine

    return make_engine(params, tok)
