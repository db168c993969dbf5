"""Long prompts: ring-attention prefill handed to the engine, then decoded there (tests/scripts/long_prompt_check.py
runs it on 8 CPU devices in a fresh process); and bad inputs refused with errors that name them, before any
device work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jinfer.engine.config import EngineConfig
from jinfer.inputs import SamplingParams
from jinfer.runtime import sharding
from jinfer.runtime.build import build_engine
from jinfer.runtime.long_prompt import RingPrefill
from jinfer.testing.tiny import TINY, tiny_params


def test_ring_prefilled_long_prompt_decodes_in_the_engine_exactly():
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, str(root / "tests" / "scripts" / "long_prompt_check.py")], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(": ok") == 9  # every check of long_prompt_check.py ran and held


def never_called(ids):
    raise AssertionError(f"prefill called with {len(ids)} tokens")


@pytest.fixture(scope="module")
def params():
    return tiny_params()


@pytest.fixture(scope="module")
def engine(params):
    # Never stepped here, so nothing compiles.
    return build_engine(TINY, params, None, EngineConfig(max_slots=2, page_size=8, num_pages=16,
                                                          token_buckets=(8, 32), max_model_len=64))


def test_ring_prefill_needs_the_mesh_axis(params):
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(ValueError, match=r"no axis 'seq' to ring over \(its axes: \('data',\)\)"):
        RingPrefill(params, TINY, mesh)
    with pytest.raises(ValueError, match="no axis 'ring'"):
        RingPrefill(params, TINY, sharding.make_mesh(), axis="ring")


@pytest.mark.parametrize("prompt, match", [
    ([], "prompt has no tokens"),
    (list(range(64)), "prompt has 64 tokens; the context is 64"),
    ([1, 2, 999], r"prompt\[2\]=999 is not a token id"),
])
def test_bad_long_prompts_are_refused_before_the_prefill_runs(engine, prompt, match):
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, SamplingParams(max_tokens=4), prefill=never_called)
    assert not engine.scheduler.has_work


def test_prefill_of_the_wrong_shape_is_refused_and_leaves_nothing_queued(engine):
    def short_by_one(ids):
        z = np.zeros((TINY.num_layers, len(ids) - 1, TINY.num_kv_heads, TINY.head_dim), np.float32)
        return z, z

    with pytest.raises(ValueError, match=r"prefill returned K/V of shapes k=\(2, 9, 2, 16\).*expected "
                                         r"\[L, m, K, H\] with L, K, H = 2, 2, 16 and m >= 10"):
        engine.add_request(list(range(11)), SamplingParams(max_tokens=4), request_id="r", prefill=short_by_one)
    assert not engine.scheduler.has_work and "r" not in engine.scheduler.requests


def test_one_token_prompt_needs_no_prefill_and_a_cancelled_request_drops_its_kv(engine):
    rid = engine.add_request([5], SamplingParams(max_tokens=4), prefill=never_called)
    assert engine.scheduler.requests[rid].num_imported == 0
    assert engine.cancel(rid)

    def zeros(ids):
        z = np.zeros((TINY.num_layers, len(ids), TINY.num_kv_heads, TINY.head_dim), np.float32)
        return z, z

    rid = engine.add_request(list(range(20)), SamplingParams(max_tokens=4), prefill=zeros)
    assert engine.scheduler.requests[rid].num_imported == 19
    assert engine.cancel(rid)
    assert not engine.scheduler.has_work and not engine._imports


def test_scheduler_refuses_an_import_that_leaves_no_token_to_compute(engine):
    with pytest.raises(ValueError, match=r"num_imported=3 must be an integer in \[0, 3\)"):
        engine.scheduler.add("x", [1, 2, 3], SamplingParams(max_tokens=4), 0, num_imported=3)
