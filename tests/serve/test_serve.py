"""The gRPC server over a real loopback channel, on the tiny random model: streamed outputs equal
LLM.generate's, 64 concurrent clients, cancellation / disconnect / deadline return every page, back-pressure,
status codes that name the bad field, auth, TLS, health across warm-up and drain, metrics, reflection.

One warmed engine serves the whole module; each test starts (and drains) its own server over it, so no two
engine threads ever own the engine at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from jinfer.engine.config import EngineConfig
from jinfer.engine.engine import Engine
from jinfer.engine.outputs import top_logprobs
from jinfer.entrypoints.llm import LLM
from jinfer.inputs import SamplingParams
from jinfer.runtime.build import build_engine
from jinfer.serve.app import ServeOptions
from jinfer.serve.background import BackgroundServer
from jinfer.serve.client import AsyncJinferClient, JinferClient
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2 as pb
from jinfer.testing.tiny import TINY, tiny_params, tiny_tokenizer

CONTEXT = TINY.max_position_embeddings  # 256
MAX_WAITING = 72
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


# ---- the workload and what LLM.generate makes of it ----------------------------------------------

def make_specs(n: int = 64) -> list[tuple[object, dict]]:
    """(prompt, sampling kwargs): text and token-id prompts; greedy, seeded sampling, penalties, stops."""
    rng = np.random.default_rng(2026)
    shared = [int(t) for t in rng.integers(0, TINY.vocab_size, 24)]  # a common prefix, for the prefix cache
    specs = []
    for i in range(n):
        ids = [int(t) for t in rng.integers(0, TINY.vocab_size, int(rng.integers(1, 40)))]
        if i % 4 == 1:
            ids = shared + ids[:8]
        prompt = " ".join(f"w{t}" for t in ids) if i % 2 == 0 else ids
        kw = dict(max_tokens=int(rng.integers(1, 40)), ignore_eos=True)
        if i % 3 == 0:
            kw.update(temperature=0.0)
        else:
            kw.update(temperature=float(rng.choice([0.7, 1.0, 1.3])), top_p=float(rng.choice([1.0, 0.9])),
                      top_k=int(rng.choice([0, 20])), seed=int(rng.integers(0, 2**32)))
        if i % 5 == 0:
            # Not repetition_penalty: the engine's outputs with it depend on prefix-cache hits (it misses
            # the cached prompt tokens), so two runs of one request may differ, with or without a server.
            kw.update(presence_penalty=0.5, frequency_penalty=0.3, min_p=0.01)
        if i % 7 == 0:
            kw.update(logprobs=3)
        if i % 9 == 0:
            kw.update(prompt_logprobs=2)
        if i % 11 == 0:
            kw.update(stop_token_ids=[int(rng.integers(0, TINY.vocab_size))])
        if i % 13 == 0:
            kw.update(stop=[f"w{int(rng.integers(0, TINY.vocab_size))}"])
        specs.append((prompt, kw))
    return specs


SPECS = make_specs()


CHAT_TEMPLATE = "{% for m in messages %}w1 {{ m.content }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
CHAT = [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": "w20 w21 w22"}]
CHAT_KW = dict(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)  # expected[-1] is LLM.chat's


def chat_tokenizer():
    """The tiny word-level tokenizer with a chat template of tiny words."""
    from jinfer.text.tokenizer import Tokenizer

    return Tokenizer(tiny_tokenizer().backend, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def engine() -> Engine:
    cfg = EngineConfig(max_slots=8, page_size=4, num_pages=512, token_buckets=(8, 32), max_prefill_chunk=16,
                       max_waiting=MAX_WAITING)
    eng = build_engine(TINY, tiny_params(), chat_tokenizer(), cfg, seed=0)
    eng.warmup()
    return eng


@pytest.fixture(scope="module")
def expected(engine):
    """LLM.generate's outputs for SPECS, over the very engine the servers will use (before any does)."""
    llm = object.__new__(LLM)  # LLM's constructor loads a checkpoint by name; generate needs only an engine
    llm.engine, llm.tokenizer = engine, engine.tokenizer
    outs = llm.generate([p for p, _ in SPECS], [SamplingParams(**kw) for _, kw in SPECS], use_tqdm=False)
    outs += llm.chat(CHAT, SamplingParams(**CHAT_KW), use_tqdm=False)
    assert_all_pages_returned(engine)
    return outs


@pytest.fixture
def server(engine, expected):
    with serving(engine) as srv:
        yield srv


@contextlib.contextmanager
def serving(engine: Engine, warmup=lambda: None, **options):
    """A server over the (already warm) engine on an OS-picked loopback port, drained at the end."""
    options = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "max_message_bytes": 64 * 1024, **options}
    srv = BackgroundServer(engine, ServeOptions(**options), warmup=warmup)
    try:
        yield srv
    finally:
        srv.drain(grace=0.0)
    assert not srv.app.engine_thread._thread.is_alive()


def target(srv) -> str:
    return f"127.0.0.1:{srv.port}"


def client(srv, **kw) -> JinferClient:
    assert srv.wait_ready(60)
    return JinferClient(target(srv), timeout=60, **kw)


def engine_state_of(e: Engine) -> dict:
    s = e.scheduler
    return dict(running=len(s.running), waiting=len(s.waiting), in_flight=e._inflight is not None,
                held=int((s.allocator.refcount > 0).sum()),
                free_or_cached=s.allocator.num_free + s.prefix_cache.num_evictable, usable=s.allocator.usable_pages)


def engine_state(srv) -> dict:
    """The engine's state, read on its own thread between two steps."""
    return srv.app.engine_thread.inspect(engine_state_of).result(30)


def wait_engine_idle(srv, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = engine_state(srv)
        if not st["running"] and not st["waiting"] and not st["in_flight"]:
            return st
        time.sleep(0.02)
    raise AssertionError(f"the engine is still busy after {timeout}s: {st}")


def assert_all_pages_returned(engine_or_state):
    if isinstance(engine_or_state, Engine):
        s = engine_or_state.scheduler
        assert not s.running and not s.waiting
        assert (s.allocator.refcount == 0).all()
        assert s.allocator.num_free + s.prefix_cache.num_evictable == s.allocator.usable_pages
    else:
        st = engine_or_state
        assert st["held"] == 0 and st["free_or_cached"] == st["usable"], st


@contextlib.contextmanager
def slow_steps(engine: Engine, seconds: float):
    """Each engine step takes at least `seconds` per token it delivers to a request (the tiny model is too
    fast to catch mid-stream; a decode block delivers several tokens per step)."""
    real = engine.step

    def step():
        events = real()
        time.sleep(seconds * max([1] + [len(ev.new_token_ids) for ev in events]))
        return events

    engine.step = step
    try:
        yield
    finally:
        del engine.step


def metric(srv, name: str, **labels) -> float:
    v = srv.app.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def wait_metric(srv, value: float, name: str, **labels) -> None:
    """Outcomes are counted as the server's handlers end, a moment after the client has seen the end."""
    deadline = time.monotonic() + 10
    while metric(srv, name, **labels) != value:
        assert time.monotonic() < deadline, (name, labels, metric(srv, name, **labels), value)
        time.sleep(0.01)


def check_output(msgs_or_resp, want, kw, request_id=""):
    msgs = msgs_or_resp if isinstance(msgs_or_resp, list) else [msgs_or_resp]
    tokens = [t for m in msgs for t in m.token_ids]
    assert tokens == want.token_ids
    assert "".join(m.text for m in msgs) == want.text
    last = msgs[-1]
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    assert last.finish_reason == FINISH[want.finish_reason]
    assert last.usage.prompt_tokens == len(want.prompt_token_ids)
    assert last.usage.completion_tokens == len(want.token_ids)
    assert last.usage.cached_prompt_tokens <= last.usage.prompt_tokens
    assert all(m.request_id == request_id for m in msgs)
    if kw.get("logprobs") is not None:
        lps = [lp for m in msgs for lp in m.logprobs]
        assert [lp.token_id for lp in lps] == want.token_ids
        for got, w in zip(lps, want.logprobs):
            # float32 logits of one token differ in the last bits between batch shapes and prefix-cache hits
            assert got.logprob == pytest.approx(w.logprob, abs=1e-4)
            assert [t.token_id for t in got.top] == list(w.top)
    else:
        assert not any(m.logprobs for m in msgs)
    if kw.get("prompt_logprobs") is not None:  # all on the first message
        assert not any(m.prompt_logprobs for m in msgs[1:])
        got = msgs[0].prompt_logprobs
        assert [p.token_id for p in got] == want.prompt_token_ids[1:]
        for p, w in zip(got, want.prompt_logprobs[1:]):
            assert p.logprob == pytest.approx(w[p.token_id].logprob, abs=1e-4) and p.rank == w[p.token_id].rank
            top = top_logprobs(w, kw["prompt_logprobs"])
            assert [t.token_id for t in p.top] == [t for t, _ in top]
            assert [t.logprob for t in p.top] == pytest.approx([v for _, v in top], abs=1e-4)
    else:
        assert not any(m.prompt_logprobs for m in msgs)


# ---- outputs -------------------------------------------------------------------------------------

def test_streamed_and_unary_outputs_equal_llm_generate(server, expected):
    with client(server) as c:
        for i in range(0, len(SPECS), 5):
            prompt, kw = SPECS[i]
            msgs = list(c.stream(prompt, request_id=f"spec-{i}", **kw))
            check_output(msgs, expected[i], kw, f"spec-{i}")
            check_output(c.generate(prompt, **kw), expected[i], kw)
        check_output(list(c.stream(messages=CHAT, **CHAT_KW)), expected[-1], CHAT_KW)
        check_output(c.generate(messages=CHAT, **CHAT_KW), expected[-1], CHAT_KW)
        assert c.tokenize(messages=CHAT) == expected[-1].prompt_token_ids
    assert_all_pages_returned(wait_engine_idle(server))


def test_64_concurrent_streaming_clients_all_complete_correctly(server, expected):
    assert server.wait_ready(60)

    async def one(i: int):
        prompt, kw = SPECS[i]
        async with AsyncJinferClient(target(server), timeout=120) as c:
            return [m async for m in c.stream(prompt, request_id=f"c{i}", **kw)]

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(len(SPECS))))

    results = asyncio.run(all_of_them())
    for i, (msgs, want) in enumerate(zip(results, expected[:len(SPECS)])):
        check_output(msgs, want, SPECS[i][1], f"c{i}")
    assert metric(server, "jinfer_requests_total", method="Generate", status="OK") == len(SPECS)
    assert_all_pages_returned(wait_engine_idle(server))


def test_a_data_parallel_engine_behind_the_server(expected):
    """`jinfer serve --data-parallel 2`: two engine replicas (here both on the one CPU device), each with its
    own slots and pages, behind one server; concurrent streams give LLM.generate's outputs, requests spread
    over both replicas, and the pool gauges add the replicas up."""
    import jax

    from jinfer.runtime.build import make_engine

    cfg = EngineConfig(max_slots=8, page_size=4, num_pages=512, token_buckets=(8, 32), max_prefill_chunk=16,
                       max_waiting=MAX_WAITING, data_parallel=2)
    dev = jax.devices()[0]
    dp = make_engine(TINY, tiny_params(), chat_tokenizer(), cfg, seed=0, devices=[dev, dev])
    dp.warmup()
    n = 24
    admitted = [0, 0]
    for r, replica in enumerate(dp.replicas):  # count what each replica is given
        def counting(*args, _add=replica.add_request, _r=r, **kw):
            admitted[_r] += 1
            return _add(*args, **kw)
        replica.add_request = counting

    async def one(i: int):
        prompt, kw = SPECS[i]
        async with AsyncJinferClient(target(srv), timeout=120) as c:
            return [m async for m in c.stream(prompt, request_id=f"dp{i}", **kw)]

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(n)))

    with serving(dp) as srv:
        assert srv.wait_ready(60)
        results = asyncio.run(all_of_them())
        for i, (msgs, want) in enumerate(zip(results, expected[:n])):
            check_output(msgs, want, SPECS[i][1], f"dp{i}")
        assert min(admitted) >= n // 4, f"requests per replica {admitted}: one replica took (nearly) all"
        assert metric(srv, "jinfer_kv_pages_total") == sum(r.scheduler.allocator.usable_pages for r in dp.replicas)
        load = srv.app.engine_thread.inspect(lambda e: e.load()).result(30)
        deadline = time.monotonic() + 20
        while (load.running or load.waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
            load = srv.app.engine_thread.inspect(lambda e: e.load()).result(30)
        assert load.running == load.waiting == load.pages_used == 0


def test_token_counts_and_model_info(server):
    with client(server) as c:
        info = c.model_info()
        assert info.config.vocab_size == TINY.vocab_size and info.max_context == CONTEXT
        assert info.limits.max_slots == 8 and info.limits.max_waiting == MAX_WAITING and info.has_tokenizer
        # The CPU's default decode buckets (1, 4, 8, 16) stop at the 8 slots; 8 decode steps per dispatch.
        assert list(info.limits.decode_buckets) == [1, 4, 8] and info.limits.decode_steps == 8
        assert info.max_message_bytes == 64 * 1024
        ids = c.tokenize("w5 w9 w127")
        assert ids == [5, 9, 127]
        assert c.detokenize(ids) == "w5 w9 w127"


# ---- cancellation, disconnects, deadlines, back-pressure -----------------------------------------

@pytest.mark.parametrize("how", ["cancel", "disconnect", "deadline"])
def test_ending_a_stream_early_returns_every_page(server, engine, how):
    prompt = list(range(1, 30))
    with slow_steps(engine, 0.01), client(server) as c:
        # Another request keeps running throughout: the early end must not disturb it.
        other = c.stream(prompt[::-1], max_tokens=60, temperature=0.0, ignore_eos=True)
        call = c.stream(prompt, max_tokens=CONTEXT - 40, temperature=0.0, ignore_eos=True,
                        timeout=1.0 if how == "deadline" else 60)
        got = 0
        with pytest.raises(grpc.RpcError) as err:
            for msg in call:
                got += len(msg.token_ids)
                if got >= 3 and how == "cancel":
                    call.cancel()
                if got >= 3 and how == "disconnect":
                    c.close()  # the client goes away without a word
        want = {"cancel": grpc.StatusCode.CANCELLED, "disconnect": grpc.StatusCode.CANCELLED,
                "deadline": grpc.StatusCode.DEADLINE_EXCEEDED}[how]
        assert err.value.code() == want
        if how != "disconnect":
            assert len([t for m in other for t in m.token_ids]) == 60
    assert_all_pages_returned(wait_engine_idle(server))
    # The request stopped about where the client left it, far from its max_tokens of 216.
    early = metric(server, "jinfer_generated_tokens_total") - (0 if how == "disconnect" else 60)
    assert early < (150 if how == "deadline" else 40), early
    if how == "disconnect":  # both of the client's calls went with it
        wait_metric(server, 2, "jinfer_requests_total", method="Generate", status="CANCELLED")
    else:
        wait_metric(server, 1, "jinfer_requests_total", method="Generate",
                    status="DEADLINE_EXCEEDED" if how == "deadline" else "CANCELLED")
        wait_metric(server, 1, "jinfer_requests_total", method="Generate", status="OK")


def test_a_cancel_frees_slot_and_pages_before_the_next_engine_step(server, engine):
    from jinfer.serve.engine_thread import Submission

    et = server.app.engine_thread
    chunks = []
    assert server.wait_ready(60)
    with slow_steps(engine, 0.01):
        et.submit(Submission("direct", engine.inputs.request(list(range(1, 40)),
                                                             SamplingParams(max_tokens=200, ignore_eos=True)),
                             chunks.append, time.perf_counter()))
        deadline = time.monotonic() + 10
        while len(chunks) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        steps_before = et.num_steps
        et.cancel("direct")
        steps_after, st = et.inspect(lambda e: (et.num_steps, engine_state_of(e))).result(10)
    assert steps_after - steps_before <= 1  # the cancel is handled between two steps, whichever comes next
    assert st["running"] == 0 and st["waiting"] == 0
    assert_all_pages_returned(st)
    assert not any(c.finish_reason for c in chunks)


def test_full_queue_refuses_at_once_with_resource_exhausted(server, engine):
    held = []
    prompt = list(range(1, 9))
    with slow_steps(engine, 0.005), client(server) as c:
        try:
            def consume(call):
                with contextlib.suppress(grpc.RpcError):
                    list(call)

            def open_streams(n):
                for _ in range(n):
                    call = c.stream(prompt, max_tokens=200, temperature=0.0, ignore_eos=True)
                    held.append((call, threading.Thread(target=consume, args=(call,), daemon=True)))
                    held[-1][1].start()

            def wait_for(running, waiting):
                deadline = time.monotonic() + 30
                while (st := engine_state(server))["running"] != running or st["waiting"] != waiting:
                    assert time.monotonic() < deadline, st
                    time.sleep(0.01)

            open_streams(8)
            wait_for(8, 0)
            open_streams(MAX_WAITING)
            wait_for(8, MAX_WAITING)
            for method in (c.stream, c.generate):
                t0 = time.perf_counter()
                with pytest.raises(grpc.RpcError) as err:
                    list(method(prompt, max_tokens=4)) if method == c.stream else method(prompt, max_tokens=4)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "waiting queue is full" in err.value.details()
                assert time.perf_counter() - t0 < 1.0
        finally:
            for call, _ in held:
                call.cancel()
            for _, t in held:
                t.join(10)
    assert_all_pages_returned(wait_engine_idle(server))
    assert metric(server, "jinfer_requests_total", method="Generate", status="RESOURCE_EXHAUSTED") == 1
    wait_metric(server, 8 + MAX_WAITING, "jinfer_requests_total", method="Generate", status="CANCELLED")


# ---- bad input -----------------------------------------------------------------------------------

BAD_GENERATE = [
    (pb.GenerateRequest(), "prompt is not set"),
    (pb.GenerateRequest(text=""), "text is an empty string"),
    (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids.ids has no tokens"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 128])), r"token_ids.ids[1]=128 is not a token id"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-3])), r"token_ids.ids[0]=-3 is not a token id"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 300)), "has 300 tokens; the context is 256"),
    (pb.GenerateRequest(text=" ".join(["w1"] * 256)), "has 256 tokens; the context is 256"),
    (pb.GenerateRequest(chat=pb.Chat()), "chat.messages is empty"),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(content="hi")])), "chat.messages[0].role is empty"),
    (pb.GenerateRequest(text="w1", request_id="x" * 300), "request_id has 300 characters"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(max_tokens=0)), "sampling.max_tokens=0"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(temperature=-1)), "sampling.temperature=-1"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p=1.5 must be in (0, 1]"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(top_k=-2)), "sampling.top_k=-2"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(min_p=2)), "sampling.min_p=2"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(repetition_penalty=0)),
     "sampling.repetition_penalty=0"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(presence_penalty=3)), "sampling.presence_penalty=3"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(seed=2**32)), "sampling.seed=4294967296"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(stop=[""])),
     "sampling.stop[0]='' must be a non-empty string"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(stop_token_ids=[-1])),
     "sampling.stop_token_ids[0]=-1 must be a non-negative integer"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(logprobs=9)),
     "sampling.logprobs=9 exceeds the engine's max_logprobs=5"),
    # Accepted before the fault probe (defect F): infinities, ids outside the vocabulary, unknown roles, and
    # (defect D) stop lists of any size.
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(temperature=float("inf"))),
     "sampling.temperature=inf must be a finite number"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(repetition_penalty=float("inf"))),
     "sampling.repetition_penalty=inf must be a finite number"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(stop_token_ids=[3, 999])),
     "sampling.stop_token_ids[1]=999 is not a token id in the vocabulary [0, 128)"),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="hacker", content="w1")])),
     "chat.messages[0].role='hacker' is not one of"),
    (pb.GenerateRequest(text="w1", sampling=pb.SamplingParams(stop=["w1"] * 40)),
     "sampling.stop has 40 strings; at most 32"),
]


@pytest.mark.parametrize("request_msg, message", BAD_GENERATE, ids=[m for _, m in BAD_GENERATE])
def test_bad_generate_requests_get_invalid_argument_naming_the_field(server, request_msg, message):
    with client(server) as c:
        for rpc in (c._stub.Generate, c._stub.GenerateUnary):
            with pytest.raises(grpc.RpcError) as err:
                out = rpc(request_msg, timeout=30)
                list(out) if rpc == c._stub.Generate else out
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in err.value.details(), err.value.details()
    wait_metric(server, 1, "jinfer_requests_total", method="Generate", status="INVALID_ARGUMENT")
    assert_all_pages_returned(wait_engine_idle(server))


@pytest.mark.parametrize("rpc, request_msg, code, message", [
    ("Tokenize", pb.TokenizeRequest(), grpc.StatusCode.INVALID_ARGUMENT, "input is not set"),
    ("Tokenize", pb.TokenizeRequest(chat=pb.Chat()), grpc.StatusCode.INVALID_ARGUMENT, "chat.messages is empty"),
    ("Detokenize", pb.DetokenizeRequest(token_ids=[3, 999]), grpc.StatusCode.INVALID_ARGUMENT,
     "token_ids[1]=999 is not a token id in the vocabulary [0, 128)"),
    ("Generate", pb.GenerateRequest(text="w1 " * 30_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
])
def test_other_bad_calls(server, rpc, request_msg, code, message):
    with client(server) as c:
        with pytest.raises(grpc.RpcError) as err:
            out = getattr(c._stub, rpc)(request_msg, timeout=30)
            list(out) if rpc == "Generate" else out
        assert err.value.code() == code
        assert message in err.value.details(), err.value.details()


# ---- auth and TLS --------------------------------------------------------------------------------

def test_token_protected_server_refuses_a_missing_or_wrong_token(engine, expected):
    with serving(engine, auth_tokens=("s3cret", "other-token")) as srv:
        with JinferClient(target(srv), timeout=30) as c:
            assert c.health() in ("SERVING", "NOT_SERVING")  # health needs no token
        for token in (None, "wrong", "s3cret-and-more"):
            with JinferClient(target(srv), token=token, timeout=30) as c:
                for call in (lambda: list(c.stream([1, 2], max_tokens=2)), lambda: c.generate([1, 2], max_tokens=2),
                             c.model_info, lambda: c.tokenize("w1")):
                    with pytest.raises(grpc.RpcError) as err:
                        call()
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert ("missing credentials" if token is None else "not valid") in err.value.details()
        with client(srv, token="s3cret") as c:
            prompt, kw = SPECS[0]
            check_output(list(c.stream(prompt, **kw)), expected[0], kw)
        with client(srv, token="other-token") as c:
            assert c.model_info().config.vocab_size == TINY.vocab_size


def self_signed_certificate() -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a self-signed certificate for localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def test_tls_server_serves_a_client_that_trusts_its_certificate(engine, expected):
    pytest.importorskip("cryptography")
    cert, key = self_signed_certificate()
    other_cert, _ = self_signed_certificate()
    with serving(engine, tls_cert_chain=cert, tls_private_key=key, auth_tokens=("t0k",)) as srv:
        assert srv.wait_ready(60)
        with JinferClient(f"localhost:{srv.port}", root_certificates=cert, token="t0k", timeout=30) as c:
            prompt, kw = SPECS[3]
            check_output(list(c.stream(prompt, **kw)), expected[3], kw)
            assert c.health() == "SERVING"
        # A client that trusts another certificate, or speaks plaintext, gets nothing.
        for bad in (JinferClient(f"localhost:{srv.port}", root_certificates=other_cert, token="t0k", timeout=5),
                    JinferClient(f"127.0.0.1:{srv.port}", token="t0k", timeout=5)):
            with bad, pytest.raises(grpc.RpcError) as err:
                bad.generate([1, 2], max_tokens=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- health, drain, observability ----------------------------------------------------------------

def test_health_goes_not_serving_serving_not_serving_across_warmup_and_drain(engine, expected):
    gate = threading.Event()
    with serving(engine, warmup=lambda: gate.wait(60)) as srv:
        c = JinferClient(target(srv), timeout=30)
        seen = [c.health(), c.health("jinfer.v1.Generation")]
        with pytest.raises(grpc.RpcError) as err:
            c.generate([1, 2, 3], max_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in err.value.details()
        gate.set()
        assert srv.wait_ready(30)
        seen += [c.health(), c.health("jinfer.v1.Generation")]
        with slow_steps(engine, 0.01):
            stream = c.stream(list(range(1, 20)), max_tokens=80, temperature=0.0, ignore_eos=True)
            first = next(stream)
            drain = srv.start_drain(30.0)
            deadline = time.monotonic() + 10
            while c.health() != "NOT_SERVING":
                assert time.monotonic() < deadline
                time.sleep(0.01)
            seen.append("NOT_SERVING")
            with pytest.raises(grpc.RpcError) as err:
                c.generate([1, 2, 3], max_tokens=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
            rest = list(stream)  # the stream in flight still finishes
        drain.result(30)
        assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 80
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert seen == ["NOT_SERVING", "NOT_SERVING", "SERVING", "SERVING", "NOT_SERVING"]
        with pytest.raises(grpc.RpcError):
            c.health(timeout=2)  # stopped
        c.close()


def test_metrics_endpoint_and_one_log_line_per_request(server, caplog):
    caplog.set_level(logging.INFO, logger="jinfer.serve.requests")
    with client(server) as c:
        for i in range(4):
            list(c.stream([1, 2, 3, i], max_tokens=5, temperature=0.0, request_id=f"m{i}"))
        with pytest.raises(grpc.RpcError):
            c.generate([1, 2, 3], top_p=7.0, request_id="bad")
    wait_engine_idle(server)
    # A call's outcome is counted, then logged, just after its status reaches the client: wait for the logs.
    deadline = time.monotonic() + 10
    while sum(r.name == "jinfer.serve.requests" for r in caplog.records) < 5:
        assert time.monotonic() < deadline, "fewer than 5 request log lines after 10 s"
        time.sleep(0.01)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("jinfer_queue_length", "jinfer_running_requests", "jinfer_kv_pages_used", "jinfer_kv_pages_total",
                 "jinfer_prefix_cache_hit_rate", "jinfer_time_to_first_token_seconds_bucket",
                 "jinfer_inter_token_latency_seconds_bucket", "jinfer_generation_tokens_per_second",
                 "jinfer_generated_tokens_total", "jinfer_requests_total"):
        assert name in body, name
    assert 'jinfer_requests_total{method="Generate",status="OK"} 4.0' in body
    assert 'jinfer_requests_total{method="GenerateUnary",status="INVALID_ARGUMENT"} 1.0' in body
    assert metric(server, "jinfer_time_to_first_token_seconds_count") == 4
    assert metric(server, "jinfer_inter_token_latency_seconds_count") == 4 * 4
    assert metric(server, "jinfer_generated_tokens_total") == 20
    assert metric(server, "jinfer_kv_pages_total") == engine_state(server)["usable"]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "jinfer.serve.requests"]
    by_id = {line["request_id"]: line for line in lines}
    assert len(lines) == 5 and set(by_id) == {"m0", "m1", "m2", "m3", "bad"}
    assert by_id["m2"]["status"] == "OK" and by_id["m2"]["finish_reason"] == "length"
    assert by_id["m2"]["prompt_tokens"] == 4 and by_id["m2"]["completion_tokens"] == 5
    assert by_id["bad"]["status"] == "INVALID_ARGUMENT" and "top_p" in by_id["bad"]["error"]


def test_reflection_lists_the_services(server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with client(server) as c:
        db = ProtoReflectionDescriptorDatabase(c.channel)
        assert {"jinfer.v1.Generation", "grpc.health.v1.Health"} <= set(db.get_services())
        methods = {m.name for m in DescriptorPool(db).FindServiceByName("jinfer.v1.Generation").methods}
        assert methods == {"Generate", "GenerateUnary", "Tokenize", "Detokenize", "GetModelInfo"}


def test_an_engine_failure_fails_the_calls_and_the_health(engine):
    def broken():
        raise RuntimeError("device lost")

    with serving(engine) as srv, client(srv) as c:
        engine.step = broken
        try:
            with pytest.raises(grpc.RpcError) as err:
                c.generate([1, 2, 3], max_tokens=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "device lost" in err.value.details()
            deadline = time.monotonic() + 10
            while c.health() != "NOT_SERVING":
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            del engine.step
    assert_all_pages_returned(engine)


def test_a_server_bug_mid_stream_gives_internal_and_frees_the_request(server, engine, monkeypatch):
    from jinfer.serve import convert

    real, sent = convert.response, []

    def response(request_id, chunk):
        if sent:
            raise KeyError("oops")
        sent.append(chunk)
        return real(request_id, chunk)

    monkeypatch.setattr(convert, "response", response)
    with slow_steps(engine, 0.005), client(server) as c:
        with pytest.raises(grpc.RpcError) as err:
            list(c.stream([1, 2, 3], max_tokens=200, temperature=0.0, ignore_eos=True))
        assert err.value.code() == grpc.StatusCode.INTERNAL and "KeyError('oops')" in err.value.details()
    assert_all_pages_returned(wait_engine_idle(server))
    assert metric(server, "jinfer_generated_tokens_total") < 200
