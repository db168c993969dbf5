"""`python -m serve.main` as a real process on the tiny random model: the `listening` log line, health,
`jinfer client` streaming to a terminal, and SIGTERM while streams are in flight (they all finish, then
the process exits 0)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from jinfer.serve.client import JinferClient
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
# One token per engine step: the drain test needs requests still decoding when SIGTERM lands, and the tiny model
# decodes a whole 200-token request in a few decode blocks (tests/engine and tests/serve/test_serve.py cover them).
ENGINE_FLAGS = ["--max-slots", "4", "--page-size", "4", "--num-pages", "256", "--token-buckets", "8,32",
                "--max-prefill-chunk", "16", "--decode-steps", "1"]


class ServerProcess:
    """The server in a subprocess; its stderr (JSON log lines) is read on a thread into a queue."""

    def __init__(self, *flags: str, env: dict | None = None):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jinfer.serve.main", "--model", "tiny-random", "--host", "127.0.0.1", "--port", "0",
             "--no-compile-cache", *ENGINE_FLAGS, *flags],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_event(self, event: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{''.join(self.log)}"
                continue
            self.log.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == event:
                return record
        raise AssertionError(f"no {event!r} log line within {timeout}s:\n{''.join(self.log)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_serving(client: JinferClient, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.health(timeout=2) == "SERVING":
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not SERVING after {timeout}s")


def gauge(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return next(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name + " "))


def test_sigterm_lets_in_flight_streams_finish_then_exits_cleanly(server_process):
    srv = server_process("--drain-grace", "60", "--metrics-port", "0")
    listening = srv.wait_event("listening")
    port, metrics_port = listening["port"], listening["metrics_port"]
    with JinferClient(f"127.0.0.1:{port}", timeout=120) as c:
        wait_serving(c)
        srv.wait_event("serving")

        # `jinfer client` streams to the terminal.
        res = subprocess.run([sys.executable, "-m", "jinfer.entrypoints.cli", "client", "w1 w2 w3", "--target", f"127.0.0.1:{port}",
                              "--max-tokens", "6", "--temperature", "0"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        want = c.generate("w1 w2 w3", max_tokens=6, temperature=0.0)
        assert res.stdout == want.text + "\n" and len(want.token_ids) == 6
        assert "[length: 3 prompt tokens" in res.stderr

        # 16 streams on 4 slots: when SIGTERM lands, some are decoding and the rest are queued.
        n, max_tokens = 16, 200
        calls = [c.stream([1 + i, 2, 3], max_tokens=max_tokens, temperature=0.0, ignore_eos=True, request_id=f"s{i}")
                 for i in range(n)]
        firsts = [next(calls[i]) for i in range(4)]
        # Every call has reached the engine (4 decoding, 12 queued) before the signal.
        deadline = time.monotonic() + 30
        while gauge(metrics_port, "jinfer_running_requests") + gauge(metrics_port, "jinfer_queue_length") < n:
            assert time.monotonic() < deadline, "the calls did not all reach the engine"
            time.sleep(0.01)
        srv.proc.send_signal(signal.SIGTERM)
        draining = srv.wait_event("draining", timeout=30)
        assert draining["in_flight"] > 0
        with pytest.raises(grpc.RpcError) as err:
            c.generate([1, 2, 3], max_tokens=2, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        got = []
        for i, call in enumerate(calls):
            msgs = ([firsts[i]] if i < 4 else []) + list(call)
            got.append(sum(len(m.token_ids) for m in msgs))
            assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert got == [max_tokens] * n
    assert srv.proc.wait(60) == 0
    srv.wait_event("stopped", timeout=10)
    finished = [json.loads(line) for line in srv.log if '"event": "request"' in line]
    assert sum(r["status"] == "OK" and r["request_id"].startswith("s") for r in finished) == n


def test_bad_flags_fail_fast_with_the_flag_named():
    res = subprocess.run([sys.executable, "-m", "jinfer.serve.main", "--model", "tiny-random", "--tls-cert", "x.pem"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--tls-cert and --tls-key go together" in res.stderr
