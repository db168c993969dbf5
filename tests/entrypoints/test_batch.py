"""`jinfer batch` on a tiny random model: outputs in input order equal the reference loop's, bad lines
become error records naming the problem, and an interrupted run resumes without redoing finished lines."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from jinfer.entrypoints.batch import run_batch
from jinfer.inputs import SamplingParams
from jinfer.runtime import reference
from jinfer.testing.tiny import TINY, tiny_tokenizer


def good_lines(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        prompt = [int(t) for t in rng.integers(0, TINY.vocab_size, int(rng.integers(1, 40)))]
        if i % 3 == 0:  # as text: the tiny tokenizer's word i is token i
            prompt = " ".join(f"w{t}" for t in prompt)
        lines.append({"id": f"q{i}", "prompt": prompt, "max_tokens": int(rng.integers(1, 12)),
                      "temperature": 0, "ignore_eos": True})
    return lines


def expected_tokens(llm, params, lines: list[dict]) -> list[list[int]]:
    prompts = [list(llm.engine.inputs.prompt(line["prompt"]).ids) for line in lines]
    sps = [SamplingParams(max_tokens=line["max_tokens"], temperature=0, ignore_eos=True) for line in lines]
    return [o.token_ids for o in reference.generate(params, TINY, prompts, sps)]


def write_jsonl(path, lines) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def untimed(rec: dict) -> dict:
    """A record without what legitimately differs between runs: timing, and prefix-cache reuse."""
    rec = {k: v for k, v in rec.items() if k != "time_to_first_token_s"}
    rec["usage"] = {k: v for k, v in rec["usage"].items() if k != "cached_prompt_tokens"}
    return rec


BAD = [
    ("{not json", "not valid JSON"),
    ('["a list"]', "must be a JSON object"),
    ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens=0"),
    ({"prompt": [1, 2], "top_p": 1.5}, "top_p=1.5"),
    ({"prompt": [5, 999]}, r"prompt\[1\]=999 is not a token id"),
    ({"prompt": ""}, "prompt is an empty string"),
    ({"prompt": [1], "temprature": 0.5}, r"unknown field\(s\) \['temprature'\]"),
    ({"max_tokens": 3}, "exactly one of 'prompt'"),
    ({"prompt": [1] * 300}, "the context is 256"),
    ({"messages": "hi"}, "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages: .*chat_template"),  # the tiny tokenizer has none
    ("", "not valid JSON"),
]


def test_outputs_in_input_order_equal_the_reference_and_bad_lines_are_reported(llm, params, tmp_path):
    good = good_lines(14)
    lines: list = []
    bad_at = {}
    for i, g in enumerate(good):
        lines.append(g)
        if i < len(BAD):
            bad_at[len(lines)] = BAD[i][1]
            lines.append(BAD[i][0])
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, lines)
    counts = run_batch(llm, src, dst, progress=False)
    assert counts == {"skipped": 0, "completed": len(good), "errors": len(BAD)}
    recs = read_jsonl(dst)
    assert [r["index"] for r in recs] == list(range(len(lines)))
    want = iter(expected_tokens(llm, params, good))
    for i, rec in enumerate(recs):
        if i in bad_at:
            assert "token_ids" not in rec
            assert re.search(bad_at[i], rec["error"]), (i, rec["error"])
        else:
            assert rec["id"] == lines[i]["id"]
            assert rec["token_ids"] == next(want), i
            assert rec["finish_reason"] == "length"
            assert rec["usage"]["completion_tokens"] == lines[i]["max_tokens"]
            assert rec["text"] == llm.tokenizer.decode(rec["token_ids"], skip_special_tokens=True)
    s = llm.engine.scheduler
    assert not s.running and not s.waiting and (s.allocator.refcount == 0).all()


def test_an_interrupted_run_resumes_without_redoing_finished_lines(llm, params, tmp_path):
    lines = good_lines(10, seed=1)
    src, full, part = tmp_path / "in.jsonl", tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    write_jsonl(src, lines)
    run_batch(llm, src, full, progress=False)
    finished = full.read_text().splitlines(keepends=True)
    # A run killed while writing line 4: three whole lines and half of the fourth.
    part.write_text("".join(finished[:3]) + finished[3][: len(finished[3]) // 2])
    counts = run_batch(llm, src, part, progress=False)
    assert counts == {"skipped": 3, "completed": 7, "errors": 0}
    assert [untimed(r) for r in read_jsonl(part)] == [untimed(r) for r in read_jsonl(full)]
    assert run_batch(llm, src, part, progress=False) == {"skipped": 10, "completed": 0, "errors": 0}


def test_an_output_that_is_not_ours_is_refused(llm, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, good_lines(2))
    dst.write_text('{"something": "else"}\n')
    with pytest.raises(ValueError, match="line 1 is not record 0"):
        run_batch(llm, src, dst, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_batch(llm, tmp_path / "missing.jsonl", dst, progress=False)


def test_cli_batch_on_a_checkpoint_directory(params, tmp_path):
    from jinfer.checkpoints.safetensors_io import save_hf_dir

    model_dir = tmp_path / "tiny"
    save_hf_dir(model_dir, TINY, params)
    tiny_tokenizer().save(model_dir)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "ignore_eos": True},
                      {"prompt": [1], "max_tokens": -1}])
    res = subprocess.run([sys.executable, "-m", "jinfer.entrypoints.cli", "batch", str(src), str(dst), "--model",
                          str(model_dir), "--max-slots", "2", "--decode-buckets", "2", "--token-buckets", "16"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "1 completed, 1 errors, 0 already done" in res.stderr
    recs = read_jsonl(dst)
    want = reference.generate(params, TINY, [[1, 2, 3]], [SamplingParams(max_tokens=4, temperature=0,
                                                                          ignore_eos=True)])[0]
    assert recs[0]["token_ids"] == want.token_ids
    assert "max_tokens=-1" in recs[1]["error"]


def test_prompt_logprobs_in_and_out(llm, params, tmp_path):
    ids = [5, 9, 2, 7, 100]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"prompt": ids, "max_tokens": 1, "prompt_logprobs": 2}, {"prompt": [1, 2], "prompt_logprobs": 9}])
    assert run_batch(llm, src, dst, progress=False)["errors"] == 1
    ok, bad = read_jsonl(dst)
    logits = reference.full_logits(params, TINY, ids).astype(np.float64)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    pl = ok["prompt_logprobs"]
    assert len(pl) == len(ids) and pl[0] is None
    for p in range(1, len(ids)):
        row = lp[p - 1]
        assert pl[p]["token_id"] == ids[p] and pl[p]["rank"] == 1 + int((row > row[ids[p]]).sum())
        np.testing.assert_allclose(pl[p]["logprob"], row[ids[p]], atol=1e-4)
        assert [t for t, _ in pl[p]["top"]] == np.argsort(-row)[:2].tolist()
        np.testing.assert_allclose([v for _, v in pl[p]["top"]], np.sort(row)[::-1][:2], atol=1e-4)
    assert "prompt_logprobs=9 exceeds the engine's max_logprobs=5" in bad["error"]
