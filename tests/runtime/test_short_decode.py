"""Decode blocks of short contexts on their own sizes (`PallasBackend.decode_short`: one context split, no
combine kernel): the runner marks a block short exactly when no context passes `short_context` by its last
step, compiles both kinds at warm-up, and the engine's greedy tokens equal the dense reference's, for requests
that start short and grow long. The Triton kernel runs interpreted here."""

from __future__ import annotations

import numpy as np
import pytest

from jinfer.attention.pallas import PallasBackend
from jinfer.engine.config import EngineConfig
from jinfer.inputs import SamplingParams
from jinfer.kernels.paged_attention.kernel import BlockSizes
from jinfer.runtime import reference
from jinfer.runtime.build import build_engine
from jinfer.testing.tiny import TINY, tiny_params, tiny_tokenizer
from tests.engine.test_engine import run_workload

LIMIT = 24


def backend(short: bool) -> PallasBackend:
    split = BlockSizes(block_q=8, pages_per_block=2, num_splits=2)
    return PallasBackend(decode=split, prefill=BlockSizes(block_q=8, pages_per_block=2), interpret=True,
                         decode_short=BlockSizes(block_q=8, pages_per_block=2) if short else None,
                         short_context=LIMIT if short else 0)


def test_short_blocks_give_the_reference_tokens():
    params = tiny_params(4)
    cfg = EngineConfig(max_slots=4, page_size=4, num_pages=40, token_buckets=(16,), decode_buckets=(4,),
                       max_prefill_chunk=16, decode_steps=4)
    eng = build_engine(TINY, params, tiny_tokenizer(), cfg, attention_backend=backend(True))
    runner = eng.runner
    assert runner.short_attention.decode.num_splits == 1
    seen = []
    shape_for = runner.shape_for

    def recording(plan):
        shape = shape_for(plan)
        if shape.decode:
            seen.append((shape.short, int(plan.rows.kv_len.max())))
        return shape

    runner.shape_for = recording
    eng.warmup()
    warm = runner.num_compilations
    assert sum(s.short for s in runner.all_shapes()) == sum(s.decode for s in runner.all_shapes()) // 2
    rng = np.random.default_rng(2)
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    prompts = [list(rng.integers(0, 128, n)) for n in (3, 9, 14)]
    outs = run_workload(eng, [(i, p, sp) for i, p in enumerate(prompts)])
    want = reference.generate(params, TINY, prompts, [sp] * 3)
    assert [outs[i].token_ids for i in range(3)] == [w.token_ids for w in want]
    # Short exactly while the longest context stays within the limit through the block's 4 steps.
    assert {short for short, _ in seen} == {True, False}
    assert all(short == (longest + 3 <= LIMIT) for short, longest in seen)
    assert runner.num_compilations == warm


@pytest.mark.parametrize("kw, match", [
    (dict(decode_short=BlockSizes(block_q=8)), "go together"),
    (dict(short_context=16), "go together"),
    (dict(decode_short=BlockSizes(block_q=4), short_context=16), "must equal decode.block_q"),
])
def test_bad_short_sizes_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        PallasBackend(decode=BlockSizes(block_q=8), **kw)
