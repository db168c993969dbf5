"""A server over a speculating engine: streams through gRPC give the engine's own greedy tokens, and the
acceptance counters reach Prometheus; `--speculative-config` parses into the engine's config or names the error."""

from __future__ import annotations

import argparse

import pytest

from jinfer.engine.config import EngineConfig
from jinfer.inputs import SamplingParams
from jinfer.runtime.build import build_engine
from jinfer.serve import main as serve_main
from jinfer.testing.tiny import TINY, tiny_params
from tests.serve.test_serve import chat_tokenizer, client, metric, serving, wait_engine_idle

PROMPT = list(range(0, 128, 2))  # a sampled or greedy token is often found here: prompt lookup proposes


def test_speculating_server_streams_greedy_tokens_and_counts_acceptance():
    spec = dict(method="ngram", num_speculative_tokens=3, prompt_lookup_min=1, adaptive=False)
    cfg = EngineConfig(max_slots=4, page_size=4, num_pages=128, token_buckets=(8, 32, 64), max_prefill_chunk=64,
                       speculative=spec)
    eng = build_engine(TINY, tiny_params(), chat_tokenizer(), cfg, seed=0)
    eng.warmup()
    plain = build_engine(TINY, tiny_params(), chat_tokenizer(), EngineConfig(**{**cfg.__dict__, "speculative": None}),
                         seed=0)
    plain.warmup()
    want = []
    for i in range(3):
        rid = plain.add_request(PROMPT[i:], SamplingParams(max_tokens=20, temperature=0.0))
        out = None
        while plain.has_work:
            for ev in plain.step():
                if ev.request_id == rid and ev.output.finished:
                    out = ev.output
        want.append(out.token_ids)
    with serving(eng) as srv, client(srv) as c:
        for i in range(3):
            chunks = list(c.stream(PROMPT[i:], max_tokens=20, temperature=0.0))
            assert [t for ch in chunks for t in ch.token_ids] == want[i]
        wait_engine_idle(srv)
        steps = metric(srv, "jinfer_spec_verify_steps_total")
        drafted = metric(srv, "jinfer_spec_draft_tokens_total")
        accepted = metric(srv, "jinfer_spec_accepted_tokens_total")
    assert steps > 0 and drafted >= steps and 0 <= accepted <= drafted


def _parse(*flags):
    p = argparse.ArgumentParser()
    serve_main.add_arguments(p)
    return p.parse_args(list(flags))


def test_the_speculative_config_flag_reaches_the_engine_config():
    args = _parse("--speculative-config", '{"method": "early_exit", "num_speculative_tokens": 3}')
    cfg = serve_main.engine_config(args, "float32")
    assert cfg.speculative.method == "early_exit" and cfg.speculative.num_speculative_tokens == 3
    assert serve_main.engine_config(_parse(), "float32").speculative is None


@pytest.mark.parametrize("flag, match", [
    ("{method: ngram}", "not JSON"),
    ('["ngram"]', "must be a JSON object"),
])
def test_a_bad_speculative_config_flag_is_refused(flag, match, capsys):
    with pytest.raises(SystemExit):
        _parse("--speculative-config", flag)
    assert match in capsys.readouterr().err


def test_an_unknown_speculative_key_names_it():
    args = _parse("--speculative-config", '{"method": "ngram", "k": 3}')
    with pytest.raises(ValueError, match=r"speculative_config has unknown keys \['k'\]"):
        serve_main.engine_config(args, "float32")
