"""`jinfer perplexity` on a tiny random model: the engine's perplexity equals exp(mean NLL) of the dense
reference's logits over the same windows; bad windows are refused; the command runs end to end on an orbax
checkpoint."""

from __future__ import annotations

import functools
import math
import re

import jax
import numpy as np
import pytest

from jinfer import LLM
from jinfer.entrypoints import cli
from jinfer.entrypoints import llm as llm_module
from jinfer.entrypoints.perplexity import perplexity, windows
from jinfer.runtime import reference
from jinfer.testing.tiny import TINY, tiny_tokenizer
from tests.entrypoints.conftest import ENGINE

IDS = [int(t) for t in np.random.default_rng(0).integers(0, TINY.vocab_size, 100)]
TEXT = " ".join(f"w{t}" for t in IDS)  # the tiny tokenizer's word i is token i




def reference_perplexity(params, ids, window) -> float:
    nll = []
    for w in windows(ids, window):
        logits = reference.full_logits(params, TINY, w).astype(np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += [lse[p - 1] - logits[p - 1, w[p]] for p in range(1, window)]
    return math.exp(np.mean(nll))


def test_equals_the_reference(llm, params):
    r = perplexity(llm, TEXT, window=24)  # 4 windows of 24 (each over two prefill chunks of 16); 4 dropped
    assert (r.num_windows, r.num_scored, r.num_tokens, r.num_dropped) == (4, 4 * 23, 100, 4)
    np.testing.assert_allclose(r.perplexity, reference_perplexity(params, IDS, 24), rtol=1e-5)
    assert "the last 4 tokens (a partial window) dropped" in r.summary()
    again = perplexity(llm, IDS[:96], window=24)  # token ids in, the same windows
    assert again.perplexity == pytest.approx(r.perplexity, rel=1e-6)
    assert (again.num_scored, again.num_dropped) == (r.num_scored, 0)
    s = llm.engine.scheduler
    assert not s.running and not s.waiting


def test_more_windows_than_the_engine_holds_at_once(llm, params):
    r = perplexity(llm, IDS, window=2)  # 50 windows through 4 slots
    assert (r.num_windows, r.num_scored, r.num_dropped) == (50, 50, 0)
    np.testing.assert_allclose(r.perplexity, reference_perplexity(params, IDS, 2), rtol=1e-5)


@pytest.mark.parametrize("window, match", [
    (1, "window=1 must be an integer >= 2"),
    (256, "window=256 must be below the engine's context of 256"),
    (101, "text has 100 tokens, fewer than one window of 101"),
])
def test_bad_windows_name_the_field(llm, window, match):
    with pytest.raises(ValueError, match=match):
        perplexity(llm, TEXT, window)


def test_the_command_end_to_end(tmp_path, capsys, monkeypatch, params):
    from jinfer.checkpoints.orbax_io import save_orbax

    ckpt = tmp_path / "tiny"
    save_orbax(ckpt, TINY, jax.tree.map(np.asarray, params), tiny_tokenizer())
    (tmp_path / "text.txt").write_text(TEXT)
    monkeypatch.setattr(cli, "_enable_compile_cache", lambda: None)  # keep the test session's XLA cache
    # The engine of the other tests (the platform's default shapes would compile for minutes on 2 cores).
    monkeypatch.setattr(llm_module, "LLM", functools.partial(LLM, engine_config=ENGINE))
    assert cli.main(["perplexity", str(tmp_path / "text.txt"), "--model", str(ckpt), "--window", "32"]) == 0
    out = capsys.readouterr().out
    ppl = float(re.search(r"perplexity: ([0-9.]+)", out).group(1))
    assert ppl == pytest.approx(reference_perplexity(params, IDS, 32), rel=1e-4)
    assert "93 scored tokens in 3 windows of 32" in out and "the last 4 tokens" in out
    assert cli.main(["perplexity", str(tmp_path / "missing.txt"), "--model", str(ckpt)]) == 2


def test_llm_generate_returns_prompt_logprobs(llm, params):
    from jinfer.inputs import SamplingParams

    ids = IDS[:10]
    (out,) = llm.generate([ids], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1), use_tqdm=False)
    logits = reference.full_logits(params, TINY, ids).astype(np.float64)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for p in range(1, len(ids)):
        entries = out.prompt_logprobs[p]
        assert entries[ids[p]].logprob == pytest.approx(lp[p - 1, ids[p]], abs=1e-4)
        assert int(np.argmax(lp[p - 1])) in entries and len(entries) <= 2
    with pytest.raises(ValueError, match=r"sampling_params\[0\].prompt_logprobs=6 exceeds the engine's max_logprobs=5"):
        llm.generate([ids, ids], SamplingParams(prompt_logprobs=6))
