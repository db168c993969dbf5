"""Regression tests of what a black-box fault probe of `jinfer serve` found, over real gRPC channels (or real
`jinfer serve` processes) on the tiny random model: an admission refusal that never reached its caller (A),
a blank JINFER_AUTH_TOKEN that served without authentication (C), tokenizing on the event loop (D),
undecodable request bytes answered UNKNOWN with a traceback (E), client strings logged whole (G), a refusal
for a client that had already left counted as INTERNAL (H), a second server silently sharing a port (I), and
log lines without a timestamp, drowned in orbax's and absl's INFO lines.

Only the admission test (A) runs engine steps (its first request decodes 4 tokens, compiled on first use, so
its waits are generous); the event loop is held up on purpose only through the tokenizer or
`BackgroundServer.call`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from jinfer.engine.config import EngineConfig
from jinfer.inputs import SamplingParams
from jinfer.runtime.build import build_engine
from jinfer.serve.client import JinferClient
from jinfer.serve.engine_thread import Submission
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2 as pb
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2_grpc as pb_grpc
from jinfer.testing.tiny import TINY, tiny_params, tiny_tokenizer
from jinfer.text.tokenizer import Tokenizer
from tests.serve.test_serve import metric, serving, target, wait_metric
from tests.serve.test_serve_process import ENGINE_FLAGS, ROOT, ServerProcess, wait_serving

PAGE_SIZE, NUM_PAGES = 4, 8  # 7 usable: page 0 is reserved
GATE = "w101 w102 w103"  # a text starting so blocks in the tokenizer until the test lets it go
SERVE = [sys.executable, "-m", "jinfer.serve.main"]
SERVE_CLI = [sys.executable, "-m", "jinfer.entrypoints.cli", "serve"]


class GatedTokenizer(Tokenizer):
    """The tiny word-level tokenizer, except that encoding a text that starts with GATE signals `entered`
    and waits for `release`: a tokenization that takes as long as the test wants."""

    def __init__(self):
        super().__init__(tiny_tokenizer().backend)
        self.entered = threading.Event()
        self.release = threading.Event()

    @contextlib.contextmanager
    def gate(self):
        self.entered, self.release = threading.Event(), threading.Event()
        try:
            yield self
        finally:
            self.release.set()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if text.startswith(GATE):
            self.entered.set()
            assert self.release.wait(60), "the test never released the tokenizer"
        return super().encode(text, add_special_tokens)


@pytest.fixture(scope="module")
def engine():
    cfg = EngineConfig(max_slots=2, page_size=PAGE_SIZE, num_pages=NUM_PAGES, token_buckets=(8,), decode_buckets=(2,),
                       max_prefill_chunk=8, max_waiting=4)
    return build_engine(TINY, tiny_params(), GatedTokenizer(), cfg, seed=0)


def stub_of(channel) -> pb_grpc.GenerationStub:
    return pb_grpc.GenerationStub(channel)


def call_rpc(stub, method: str, request, **kw):
    """The response of a unary method, or the list of a stream's messages."""
    out = getattr(stub, method)(request, **kw)
    return list(out) if method == "Generate" else out


def request_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "jinfer.serve.requests"]


def assert_no_error_logged(caplog) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [(r.name, r.getMessage()) for r in bad]


# ---- A: a refusal reaches its caller at once; one pool size everywhere ---------------------------

def test_a_request_the_pool_cannot_hold_gets_invalid_argument_at_once(engine):
    """3 prompt tokens + 40 to generate need 11 pages of 4 tokens; the pool has 7. The client hears so at once
    (before the fix the engine thread's refusal raised NameError and the client waited out its deadline)."""
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams(max_tokens=40))
    with serving(engine) as srv, grpc.insecure_channel(target(srv)) as channel:
        assert srv.wait_ready(60)
        stub = stub_of(channel)
        for method in ("GenerateUnary", "Generate"):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                call_rpc(stub, method, request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "needs 11 KV pages" in err.value.details() and "the pool has 7" in err.value.details()
            assert time.monotonic() - t0 < 5
        # GetModelInfo and the gauge report the same pool: the usable pages.
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).limits.num_pages == NUM_PAGES - 1
        assert metric(srv, "jinfer_kv_pages_total") == NUM_PAGES - 1
        wait_metric(srv, 1, "jinfer_requests_total", method="Generate", status="INVALID_ARGUMENT")


def test_a_refusal_at_admission_is_delivered_to_the_caller(engine):
    """The engine thread's own admission error (here: a request id already in use) is handed to the submitter
    as an error chunk (before the fix the thread raised NameError and the submitter heard nothing)."""
    with serving(engine) as srv:
        assert srv.wait_ready(60)
        et = srv.app.engine_thread
        first, second = queue.Queue(), queue.Queue()
        checked = engine.inputs.request([1, 2, 3], SamplingParams(max_tokens=4))
        et.submit(Submission("direct", checked, first.put, time.perf_counter()))
        et.submit(Submission("direct", checked, second.put, time.perf_counter()))
        chunk = second.get(timeout=60)
        while first.get(timeout=120).finish_reason is None:  # compiles the two step shapes on first use
            pass
    assert isinstance(chunk.error, ValueError) and "request_id='direct' is already in use" in str(chunk.error), chunk


# ---- C: a blank token is refused, not read as "no authentication" --------------------------------

@pytest.mark.parametrize("entry", [SERVE, SERVE_CLI], ids=["module", "cli"])
@pytest.mark.parametrize("token", ["   ", ""], ids=["spaces", "empty"])
def test_a_blank_auth_token_refuses_to_start(entry, token):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JINFER_AUTH_TOKEN": token}
    res = subprocess.run([*entry, "--model", "tiny-random", "--port", "0", "--no-compile-cache"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == ["jinfer serve: error: JINFER_AUTH_TOKEN is set but blank: set it to a token, "
                                       "or unset it to serve without authentication"], res.stderr


# ---- D: tokenizing runs off the event loop -------------------------------------------------------

def test_a_slow_tokenization_does_not_hold_up_other_calls(engine):
    tok = engine.tokenizer
    with serving(engine) as srv, grpc.insecure_channel(target(srv)) as channel, tok.gate():
        assert srv.wait_ready(60)
        stub = stub_of(channel)
        slow = stub.Tokenize.future(pb.TokenizeRequest(text=f"{GATE} w5"), timeout=60)
        slow_generate = stub.GenerateUnary.future(pb.GenerateRequest(text=f"{GATE} w6", sampling=pb.SamplingParams(
            max_tokens=100)), timeout=60)
        assert tok.entered.wait(10)
        # Both slow calls are inside the tokenizer now; the others are answered meanwhile.
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).limits.page_size == PAGE_SIZE
        assert list(stub.Tokenize(pb.TokenizeRequest(text="w5 w9"), timeout=5).token_ids) == [5, 9]
        assert stub.Detokenize(pb.DetokenizeRequest(token_ids=[5, 9]), timeout=5).text == "w5 w9"
        assert not slow.done()
        tok.release.set()
        assert list(slow.result(30).token_ids) == [101, 102, 103, 5]
        with pytest.raises(grpc.RpcError) as err:  # 4 + 100 tokens need more than the 7 pages
            slow_generate.result(30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "KV pages" in err.value.details()


# ---- E: bytes that do not parse ------------------------------------------------------------------

def _bad_utf8(message) -> bytes:
    data = message.SerializeToString()
    assert data.count(b"@@") == 1
    return data.replace(b"@@", b"\xff\xfe")


GARBAGE = b"\xff\xff\xff\xff not a protobuf"
UNDECODABLE = [
    ("/jinfer.v1.Generation/Generate", _bad_utf8(pb.GenerateRequest(text="@@"))),
    ("/jinfer.v1.Generation/GenerateUnary", _bad_utf8(pb.GenerateRequest(text="w1", request_id="@@"))),
    ("/jinfer.v1.Generation/GenerateUnary", GARBAGE),
    ("/jinfer.v1.Generation/Tokenize", _bad_utf8(pb.TokenizeRequest(text="@@"))),
    ("/jinfer.v1.Generation/Detokenize", GARBAGE),
    ("/jinfer.v1.Generation/GetModelInfo", GARBAGE),
    ("/grpc.health.v1.Health/Check", GARBAGE),
]


def test_undecodable_request_bytes_get_invalid_argument_and_one_log_line(engine, caplog):
    caplog.set_level(logging.INFO)
    with serving(engine) as srv, grpc.insecure_channel(target(srv)) as channel:
        assert srv.wait_ready(60)
        for method, data in UNDECODABLE:
            caplog.clear()
            streaming = method.endswith("/Generate")
            rpc = (channel.unary_stream if streaming else channel.unary_unary)(
                method, request_serializer=None, response_deserializer=None)  # raw bytes, as sent
            with pytest.raises(grpc.RpcError) as err:
                out = rpc(data, timeout=10)
                list(out) if streaming else out
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.details())
            assert "does not parse" in err.value.details()
            assert stub_of(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)  # a round trip: logs flushed
            records = [r for r in caplog.records if r.name.startswith(("jinfer", "grpc"))]
            assert len(records) == 1, (method, [r.getMessage() for r in records])
            line = json.loads(records[0].getMessage())
            assert line["status"] == "INVALID_ARGUMENT" and "does not parse" in line["error"], line
            assert_no_error_logged(caplog)
        wait_metric(srv, 1, "jinfer_requests_total", method="Generate", status="INVALID_ARGUMENT")
        wait_metric(srv, 2, "jinfer_requests_total", method="GenerateUnary", status="INVALID_ARGUMENT")


# ---- G: client strings in the log are cut --------------------------------------------------------

@pytest.mark.parametrize("method", ["Generate", "GenerateUnary"])
def test_a_refused_long_request_id_is_logged_cut(engine, caplog, method):
    caplog.set_level(logging.INFO, logger="jinfer.serve.requests")
    request_id = "r" * 100_000
    with serving(engine, max_message_bytes=1 << 20) as srv, grpc.insecure_channel(target(srv)) as channel:
        assert srv.wait_ready(60)
        with pytest.raises(grpc.RpcError) as err:
            call_rpc(stub_of(channel), method, pb.GenerateRequest(text="w1", request_id=request_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id has 100000 characters; at most 256" in err.value.details()
        wait_metric(srv, 1, "jinfer_requests_total", method=method, status="INVALID_ARGUMENT")
    (line,) = request_lines(caplog)
    assert line["request_id"] == "r" * 512 + "... (100000 characters)"
    assert max(len(r.getMessage()) for r in caplog.records) < 1500


# ---- H: a refusal the client can no longer hear is a cancellation --------------------------------

@pytest.mark.parametrize("method", ["Generate", "GenerateUnary"])
@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_refusal_for_a_client_that_already_left_counts_as_ended_early(engine, caplog, method, how):
    """The client leaves while its prompt is being tokenized, and the loop is held up (as by any slow callback)
    until the refusal (the prompt is longer than the context) is ready: gRPC then fails to send the status. That is
    the client's cancellation (or deadline), not INTERNAL, and logs no traceback."""
    caplog.set_level(logging.INFO)
    tok = engine.tokenizer
    request = pb.GenerateRequest(text=GATE + " w1" * 300)
    with serving(engine) as srv, grpc.insecure_channel(target(srv)) as channel, tok.gate():
        assert srv.wait_ready(60)
        rpc = getattr(stub_of(channel), method)
        timeout = 0.5 if how == "deadline" else 60
        call = rpc(request, timeout=timeout) if method == "Generate" else rpc.future(request, timeout=timeout)
        assert tok.entered.wait(10)
        held = threading.Event()

        async def hold_the_loop():
            held.set()
            time.sleep(1.5)

        threading.Thread(target=srv.call, args=(hold_the_loop,), daemon=True).start()
        held.wait(2)  # (before the fix the tokenizer itself held the loop: this waits in vain)
        if how == "cancel":
            call.cancel()
        assert call.code() == (grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED)
        time.sleep(0.3)  # the client's RST_STREAM reaches the server's gRPC core, which runs on threads of its own
        tok.release.set()
        want = "CANCELLED" if how == "cancel" else "DEADLINE_EXCEEDED"
        wait_metric(srv, 1, "jinfer_requests_total", method=method, status=want)
        assert metric(srv, "jinfer_requests_total", method=method, status="INTERNAL") == 0
    (line,) = request_lines(caplog)
    assert line["status"] == want and "the context is 256" in line["error"] and "not sent" in line["error"], line
    assert_no_error_logged(caplog)


# ---- I: a port in use ----------------------------------------------------------------------------

def serve_once(entry, *flags, timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JINFER_AUTH_TOKEN", None)
    return subprocess.run([*entry, "--host", "127.0.0.1", "--no-compile-cache", *ENGINE_FLAGS, *flags], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def in_use(port: int) -> list[str]:
    return [f"jinfer serve: error: cannot listen on 127.0.0.1:{port}: the port is already in use "
            "(by another server or program)"]


def test_a_second_server_on_the_same_port_is_refused_at_once(server_process):
    first = server_process()
    port = first.wait_event("listening")["port"]
    with JinferClient(f"127.0.0.1:{port}", timeout=30) as c:
        wait_serving(c)
        for entry in (SERVE, SERVE_CLI):
            res = serve_once(entry, "--model", "tiny-random", "--port", str(port))
            assert res.returncode == 2 and res.stderr.splitlines() == in_use(port), res.stderr
        assert c.health() == "SERVING" and c.tokenize("w7") == [7]  # the first server keeps its port


def test_a_port_another_program_holds_fails_before_the_model_loads(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        for entry in (SERVE, SERVE_CLI):
            res = serve_once(entry, "--model", "tiny-random", "--port", str(port))
            assert res.returncode == 2 and res.stderr.splitlines() == in_use(port), res.stderr
        # A model that does not exist: the port is refused first, so the load was never tried.
        res = serve_once(SERVE, "--model", str(tmp_path / "no-such-checkpoint"), "--port", str(port))
        assert res.returncode == 2 and res.stderr.splitlines() == in_use(port), res.stderr


# ---- logs ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stderr_lines(proc: ServerProcess) -> list[str]:
    """Every stderr line, once the process has exited."""
    assert proc.proc.wait(60) == 0
    lines = list(proc.log)
    while True:
        try:
            lines.append(proc.lines.get(timeout=1))
        except queue.Empty:
            return [line.rstrip("\n") for line in lines if line.strip()]


def parsed(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return out


def serve_one_request_and_stop(proc: ServerProcess, port: int) -> list[dict]:
    with JinferClient(f"127.0.0.1:{port}", timeout=60) as c:
        wait_serving(c)
        with pytest.raises(grpc.RpcError):
            c.generate("w1", top_p=7.0)  # a request line, at INFO
    proc.proc.send_signal(signal.SIGTERM)
    return parsed(stderr_lines(proc))


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_log_lines_are_timestamped_json_and_the_level_filters_jinfer(server_process, level):
    port = free_port()
    records = serve_one_request_and_stop(server_process("--port", str(port), "--log-level", level), port)
    assert all(isinstance(r, dict) and r["ts"].endswith("Z") and "T" in r["ts"] for r in records), records
    events = [r.get("event") for r in records]
    if level == "INFO":
        assert {"listening", "serving", "request", "draining", "stopped"} <= set(events), events
    else:
        assert not [r for r in records if r["level"] == "INFO"], records


def test_orbax_and_absl_info_lines_are_silenced(server_process, tmp_path):
    import jax
    import numpy as np

    from jinfer.checkpoints.orbax_io import save_orbax

    ckpt = tmp_path / "tiny"
    save_orbax(ckpt, TINY, jax.tree.map(np.asarray, tiny_params()), tiny_tokenizer())
    port = free_port()
    records = serve_one_request_and_stop(server_process("--model", str(ckpt), "--port", str(port)), port)
    strangers = [r for r in records if r["level"] == "INFO" and not r.get("event")]
    assert not strangers, strangers  # orbax writes a dozen INFO lines through absl on a restore
    assert {"listening", "serving", "request"} <= {r.get("event") for r in records}
    assert all("ts" in r for r in records)


def test_log_level_filters_jinfer_lines_only():
    """configure_logging("ERROR"): jinfer's warnings go, other libraries' warnings stay, INFO of absl and orbax
    goes; every line is JSON with a timestamp."""
    code = """if True:
        import logging
        from absl import logging as absl_logging
        from jinfer.serve.main import configure_logging
        configure_logging("ERROR")
        logging.getLogger("jinfer.serve").warning('{"event": "hidden-warning"}')
        logging.getLogger("jinfer.serve.requests").error('{"event": "shown-error"}')
        logging.getLogger("jax._src.xla_bridge").warning("a jax warning")
        logging.getLogger("jax._src.xla_bridge").info("a jax info")
        absl_logging.info("an absl info")
        absl_logging.warning("an absl warning")
        logging.getLogger("orbax.checkpoint").info("an orbax info")
        """
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    records = parsed([line for line in res.stderr.splitlines() if line.strip()])
    assert [(r.get("event") or r["message"]) for r in records] == ["shown-error", "a jax warning", "an absl warning"]
    assert all(r["ts"].endswith("Z") for r in records)
