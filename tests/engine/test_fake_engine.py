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


def test_skip_special_tokens_decides_whether_special_tokens_are_text(smollm2):
    """SmolLM2's tokenizer: ids 0-16 are its special tokens (<|endoftext|>, <|im_start|>, <|im_end|>, ...); the
    stream's text is the tokenizer's own decode of the tokens, with or without them."""
    tok = smollm2.tokenizer
    e = fake_engine(tokenizer=tok, vocab_size=tok.vocab_size)
    outs = run(e, [([0], SamplingParams(max_tokens=20, ignore_eos=True)),
                   ([0], SamplingParams(max_tokens=20, ignore_eos=True, skip_special_tokens=False))])
    ids = list(range(1, 21))
    assert outs[0].token_ids == outs[1].token_ids == ids
    assert outs[0].text == tok.decode(ids, skip_special_tokens=True)
    assert outs[1].text == tok.decode(ids, skip_special_tokens=False) != outs[0].text
    assert "<|im_start|>" in outs[1].text


def test_a_prefix_cache_hit_seeds_the_penalty_state_with_the_cached_tokens():
    e = fake_engine()
    prompt = list(range(1, 19))  # 4 full pages of 4, the last 2 tokens computed
    run(e, [(prompt, SamplingParams(max_tokens=2))])
    (again,) = run(e, [(prompt, SamplingParams(max_tokens=2))])
    assert again.num_cached_tokens == 16 and again.token_ids == [19, 20]
    assert e.runner.seeded == []  # no penalties asked for: no penalty state to seed
    (penalized,) = run(e, [(prompt, SamplingParams(max_tokens=2, repetition_penalty=1.3))])
    assert penalized.num_cached_tokens == 16 and penalized.token_ids == [19, 20]
    assert e.runner.seeded[-1][1:] == (prompt[:16], 18)


def test_a_decode_block_streams_several_tokens_per_step_and_stops_on_the_device():
    e = fake_engine()
    ids = [e.add_request([10], SamplingParams(max_tokens=20)),
           e.add_request([50], SamplingParams(max_tokens=20, stop_token_ids=[55])),
           e.add_request([90], SamplingParams(max_tokens=20, stop=["w94"]))]
    events = {i: [] for i in ids}
    steps = 0
    while e.has_work:
        for ev in e.step():
            events[ev.request_id].append(ev)
        steps += 1
    block = e.config.decode_steps
    assert block > 1
    a, b, c = (events[i] for i in ids)
    assert [t for ev in a for t in ev.new_token_ids] == list(range(11, 31))
    assert max(len(ev.new_token_ids) for ev in a) == block  # one event per block, not per token
    assert steps < 20  # 20 tokens took fewer engine steps than tokens
    assert [t for ev in b for t in ev.new_token_ids] == [51, 52, 53, 54, 55] and b[-1].output.finish_reason == "stop"
    assert c[-1].output.token_ids == [91, 92, 93, 94] and c[-1].output.text == "w91 w92 w93 "
    assert "".join(ev.text_delta for ev in a) == a[-1].output.text == " ".join(f"w{t}" for t in range(11, 31))
    s = e.scheduler
    assert not s.running and s.allocator.num_free + s.prefix_cache.num_evictable == s.allocator.usable_pages


def test_the_host_engine_imports_no_jax():
    code = ("import sys\n"
            "from jinfer.testing.fake_runner import fake_engine\n"
            "from jinfer.inputs import SamplingParams\n"
            "e = fake_engine(); e.add_request('w1 w2', SamplingParams(max_tokens=3)); e.run_until_done()\n"
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))\n")
    subprocess.run([sys.executable, "-c", code], check=True)
