"""The host engine end to end over `jinfer.testing.fake_runner` (token t is followed by t + 1): outputs a
test can compute by hand, and proof that the engine, scheduler and edge run in a process without jax."""

from __future__ import annotations

import subprocess
import sys

from jinfer.inputs import SamplingParams
from jinfer.testing.fake_runner import fake_engine


def run(engine, requests):
    ids = [engine.add_request(p, sp) for p, sp in requests]
    outs = {}
    while engine.has_work:
        for ev in engine.step():
            if ev.output.finished:
                outs[ev.request_id] = ev.output
    return [outs[i] for i in ids]


def test_outputs_follow_the_last_prompt_token():
    e = fake_engine()
    outs = run(e, [("w5 w6", SamplingParams(max_tokens=5)),
                   ([10] * 30, SamplingParams(max_tokens=4)),  # prefilled over two chunks of 16
                   ([126], SamplingParams(max_tokens=4, stop_token_ids=[0]))])
    assert [o.token_ids for o in outs] == [[7, 8, 9, 10, 11], [11, 12, 13, 14], [127, 0]]
    assert [o.finish_reason for o in outs] == ["length", "length", "stop"]
    assert outs[0].text == "w7 w8 w9 w10 w11" and outs[2].text == "w127"  # the stop token's text is not emitted


def test_a_stop_string_ends_the_request_and_is_not_emitted():
    (out,) = run(fake_engine(), [([20], SamplingParams(max_tokens=10, stop=["w24"]))])
    assert out.finish_reason == "stop" and out.text == "w21 w22 w23 "
    assert out.token_ids == [21, 22, 23, 24]


def test_a_prefix_cache_hit_seeds_the_penalty_state_with_the_cached_tokens():
    e = fake_engine()
    prompt = list(range(1, 19))  # 4 full pages of 4, the last 2 tokens computed
    run(e, [(prompt, SamplingParams(max_tokens=2))])
    (again,) = run(e, [(prompt, SamplingParams(max_tokens=2))])
    assert again.num_cached_tokens == 16 and again.token_ids == [19, 20]
    assert e.runner.seeded[-1][1:] == (prompt[:16], 18)


def test_the_host_engine_imports_no_jax():
    code = ("import sys\n"
            "from jinfer.testing.fake_runner import fake_engine\n"
            "from jinfer.inputs import SamplingParams\n"
            "e = fake_engine(); e.add_request('w1 w2', SamplingParams(max_tokens=3)); e.run_until_done()\n"
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))\n")
    subprocess.run([sys.executable, "-c", code], check=True)
