"""EngineConfig: platform defaults fill what the user left open, and a bad field is refused by name."""

from __future__ import annotations

import re

import pytest

from jinfer.engine.config import EngineConfig


def test_platform_defaults_fill_only_open_fields():
    cpu, gpu = EngineConfig().resolve("cpu"), EngineConfig().resolve("cuda")
    assert cpu.resolved and gpu.resolved
    assert cpu.per_layer_weights is True and gpu.per_layer_weights is False
    assert cpu.decode_buckets[0] == 1 and cpu.decode_buckets[-1] == cpu.max_slots
    mine = EngineConfig(max_slots=4, per_layer_weights=False, decode_steps=2).resolve("cpu")
    assert (mine.max_slots, mine.per_layer_weights, mine.decode_steps) == (4, False, 2)
    assert mine.decode_buckets == (1, 4)
    with pytest.raises(ValueError, match="platform='mps'"):
        EngineConfig().resolve("mps")


@pytest.mark.parametrize("field, value", [
    ("per_layer_weights", "yes"),
    ("decode_steps", 0),
    ("token_buckets", (64, 16)),
    ("max_logprobs", -1),
    ("quantization", "int3"),
    ("quantization_group_size", -32),
    ("kv_cache_dtype", "int4"),
])
def test_bad_fields_are_named(field, value):
    with pytest.raises(ValueError, match=re.escape(f"EngineConfig.{field}={value!r}")):
        EngineConfig(**{field: value})
