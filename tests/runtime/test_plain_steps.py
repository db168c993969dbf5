"""The branch-free steps the GPU runs (`StepShape.plain`, chosen by the host from `StepPlan.plain_sampler`)
against the general steps: the same tokens for greedy and seeded sampling, a stop token inside a block (whose
plain loop runs its fixed count of steps), and steps that need the general path (logprobs, penalties,
min_tokens, logit bias) beside plain rows; no compile after warm-up."""

from __future__ import annotations

import sys

import jax
import pytest

from jinfer.engine.config import EngineConfig
from jinfer.inputs import SamplingParams
from jinfer.runtime import step
from jinfer.runtime.build import build_engine
from jinfer.testing.tiny import TINY, tiny_params, tiny_tokenizer
from tests.engine.test_engine import run_workload


def _engine(params, plain: bool):
    # One bucket of each kind: the plain engine compiles each shape three times.
    cfg = EngineConfig(max_slots=4, page_size=4, num_pages=40, token_buckets=(32,), decode_buckets=(4,),
                       max_prefill_chunk=16, decode_steps=8)
    eng = build_engine(TINY, params, tiny_tokenizer(), cfg, seed=0)
    eng.runner.plain_steps = plain
    eng.warmup()
    return eng


TAKEN: list[str] = []  # the plain loops' kinds, as their steps run (a debug callback fires only when its branch runs)


@pytest.fixture(scope="module")
def engines():
    head = step._head

    def recording_head(*args, plain=None, **kw):
        if plain is not None:
            jax.debug.callback(lambda: TAKEN.append(plain))
        return head(*args, plain=plain, **kw)

    params = tiny_params(3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step, "_head", recording_head)
        return _engine(params, False), _engine(params, True)


@pytest.fixture(autouse=True)
def taken():
    TAKEN.clear()
    return TAKEN


def _tokens(eng, arrivals):
    return [o.token_ids for o in run_workload(eng, arrivals).values()]


def _logprobs(eng, arrivals):
    return [[(lp.token_id, round(lp.logprob, 4)) for lp in o.logprobs or []]
            for o in run_workload(eng, arrivals).values()]


PROMPTS = [[5, 9, 5, 17, 33], [1, 2, 3], [40, 41, 42, 43, 44, 45, 46], [7]]


def test_greedy_and_sampled_blocks_match_the_general_loop(engines, taken):
    general, plain = engines
    for kind, sp in zip(["greedy", "sampled"],  (SamplingParams(max_tokens=21, temperature=0, ignore_eos=True),
               SamplingParams(max_tokens=19, temperature=0.9, top_k=20, top_p=0.8, seed=7, ignore_eos=True))):
        arrivals = [(i, p, sp) for i, p in enumerate(PROMPTS)]
        assert _tokens(plain, arrivals) == _tokens(general, arrivals)
        assert set(taken) == {kind}
        taken.clear()


def test_a_stop_token_inside_a_block_ends_the_row_there(engines):
    general, plain = engines
    free = _tokens(general, [(0, PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))])[0]
    # Stop on a token that first appears inside the first decode block, not at its first or last step.
    at = next(i for i, t in enumerate(free) if i >= 3 and t not in free[:i])
    sp = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[free[at]])
    for eng in engines:
        out = _tokens(eng, [(0, PROMPTS[0], sp), (0, PROMPTS[1], SamplingParams(max_tokens=5, ignore_eos=True,
                                                                                  temperature=0))])
        assert out[0] == free[:at + 1]
    assert _tokens(plain, [(0, PROMPTS[2], sp)]) == _tokens(general, [(0, PROMPTS[2], sp)])


@pytest.mark.parametrize("sp", [
    SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.5, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.7, seed=3, min_tokens=12),
    SamplingParams(max_tokens=12, temperature=0, logit_bias={3: 5.0}, ignore_eos=True),
], ids=["logprobs", "penalty", "min_tokens", "logit_bias"])
def test_blocks_needing_the_general_loop_take_it(engines, taken, sp):
    general, plain = engines
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    arrivals = [(0, PROMPTS[0], sp), (0, PROMPTS[3], greedy)]
    assert _tokens(plain, arrivals) == _tokens(general, arrivals)
    assert _logprobs(plain, arrivals) == _logprobs(general, arrivals)
    assert not taken


def test_no_compile_after_warmup(engines):
    _, plain = engines
    before = plain.runner.num_compilations
    _tokens(plain, [(0, PROMPTS[0], SamplingParams(max_tokens=9, temperature=0.5, seed=1, ignore_eos=True))])
    assert plain.runner.num_compilations == before


def _spec_engine(params, method: str, plain: bool, warm: bool = True):
    from tests.engine.spec.test_speculative_engine import spec_engine

    # draft: speculates alone; two requests decode plainly, the draft following in those blocks.
    return spec_engine(params, tiny_tokenizer(), method, plain_steps=plain, warm=warm, num_pages=60,
                       token_buckets=(32,), decode_steps=4, disable_by_batch_size=1 if method == "draft" else 4)


def _runtime_branches(eng, shape) -> list[str]:
    """The modules of the step's code (`jinfer.runtime`: steps, sampler, speculation) that trace a `lax.cond`
    into `shape` (the attention's own branches, in CPU code the GPU kernels do not have, are not counted).
    `eng` must not have traced `shape` before (a traced step is cached)."""
    cond, callers = jax.lax.cond, []

    def recording_cond(*args, **kw):
        callers.append(sys._getframe(1).f_globals["__name__"])
        return cond(*args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax.lax, "cond", recording_cond)
        eng.runner.lowered(shape, eng.scheduler.stop_width)
    return [c for c in callers if c.startswith("jinfer.runtime")]


@pytest.mark.parametrize("method", ["ngram", "early_exit", "draft"])
def test_plain_verify_steps_match_the_general_ones(method):
    """Verify steps compile plain too (no penalty branch, the drafter's loop and the acceptance rule without
    runtime branches), and a plain decode block of one token (after a missed lookup) has a shape of its own:
    greedy and seeded sampled tokens equal the general engine's (which the speculation tests hold to the dense
    reference), also while a draft model follows plain decode blocks, and nothing compiles after warm-up."""
    params = tiny_params(5)
    general, plain = _spec_engine(params, method, False), _spec_engine(params, method, True)
    launch, shapes = plain.runner._launch, []

    def recording_launch(p, shape):
        shapes.append(shape)
        return launch(p, shape)

    motif = [5, 9, 5, 17, 33, 2]
    arrivals = [(0, motif * 3, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)),
                (5, PROMPTS[2], SamplingParams(max_tokens=14, temperature=0.9, top_p=0.9, seed=4, ignore_eos=True))]
    before = plain.runner.num_compilations
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plain.runner, "_launch", recording_launch)
        outs = list(run_workload(plain, arrivals).values())
    assert [o.token_ids for o in outs] == _tokens(general, arrivals)
    assert sum(o.metrics.spec_verify_steps for o in outs) > 0
    assert plain.runner.num_compilations == before
    assert any(s.verify and s.plain for s in shapes)
    if method == "ngram":  # a missed lookup decodes one token
        assert any(s.decode and s.plain and s.steps == 1 for s in shapes)
    if method == "draft":  # two requests, over the batch limit: plain blocks advance the draft model
        assert any(s.decode and s.plain and s.steps == 0 for s in shapes)
    fresh = _spec_engine(params, method, True, warm=False)
    verify = next(s for s in fresh.runner.all_shapes() if s.verify and s.plain is None)
    assert _runtime_branches(fresh, verify)  # the general verify step branches at run time
    for s in fresh.runner.all_shapes():
        if s.plain and (s.verify or s.decode):
            assert not _runtime_branches(fresh, s), s
