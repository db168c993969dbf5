"""Load benchmark of the server: concurrent streaming clients at a sweep of request rates.

Starts `python -m serve.main` in a subprocess (or uses `--target` of a running server), then for each rate
sends `--num-requests` streaming Generate calls with Poisson arrivals (rate `inf`: all at once) from
`--clients` channels, and reports throughput and client-side time to first token / inter-token latency
percentiles. Every request is accounted for: it completed, or it failed with a gRPC status (HTTP: its status
code); the script exits 1 if any is neither (lost). `--http` also sends the same workload, after the gRPC
one, to the OpenAI-compatible HTTP front of the same server through the official `openai` async client
(streamed /v1/completions with token-id prompts; vLLM's `stream_options.continuous_usage_stats` so that each
chunk says how many tokens it carries), and prints both tables.

    python benchmarks/serve_bench.py --model tiny-random --rates 5,10,20,40,inf --num-requests 64
    python benchmarks/serve_bench.py --model smollm2 --rates 1,2,4,inf --num-requests 16 --output-len 32 \
        --server-args "--max-slots 8 --num-pages 512"
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Result:
    sent: float
    first: float | None = None  # first token's arrival
    end: float | None = None
    token_gaps: list[float] = dataclasses.field(default_factory=list)  # per token after the first
    num_tokens: int = 0
    status: str = "LOST"  # OK, or the gRPC status code's name


async def one_request(client, prompt: list[int], output_len: int, result: Result) -> None:
    import grpc

    last = None
    try:
        async for msg in client.stream(prompt, max_tokens=output_len, temperature=0.0, ignore_eos=True):
            last = _record(result, len(msg.token_ids), last)
        result.status = "OK"
    except grpc.RpcError as e:
        result.status = e.code().name
    except Exception as e:
        result.status = f"CLIENT_ERROR:{type(e).__name__}"
    result.end = time.perf_counter()


def _record(result: Result, k: int, last: float | None) -> float | None:
    """Notes k tokens arriving now; returns when the latest tokens arrived."""
    if not k:
        return last
    now = time.perf_counter()
    result.num_tokens += k
    if result.first is None:
        result.first = now
        k -= 1
        last = now
    # Tokens that arrive together in one message share the gap since the last message.
    result.token_gaps += [(now - last) / k] * k if k else []
    return now


async def one_http_request(client, prompt: list[int], output_len: int, result: Result) -> None:
    import openai

    last = None
    try:
        stream = await client.completions.create(
            model=client.served_model, prompt=prompt, max_tokens=output_len, temperature=0.0, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.usage is not None:  # each chunk's usage so far says how many it carries
                last = _record(result, chunk.usage.completion_tokens - result.num_tokens, last)
        result.status = "OK"
    except openai.APIStatusError as e:
        result.status = f"HTTP_{e.status_code}"
    except Exception as e:
        result.status = f"CLIENT_ERROR:{type(e).__name__}"
    result.end = time.perf_counter()


def _http_clients(args):
    import openai

    clients = []
    for _ in range(args.clients):
        c = openai.AsyncOpenAI(base_url=f"http://{args.http_target}/v1", api_key="none", max_retries=0,
                               timeout=args.timeout)
        c.served_model = args.model_name
        clients.append(c)
    return clients


async def run_rate(target: str, rate: float, args, rng, http: bool = False) -> list[Result]:
    from jinfer.serve.client import AsyncJinferClient

    if http:
        clients, send = _http_clients(args), one_http_request
    else:
        clients = [AsyncJinferClient(target, timeout=args.timeout) for _ in range(args.clients)]
        send = one_request
    try:
        lo, hi = args.input_len
        prompts = [[int(t) for t in rng.integers(0, args.vocab_size, int(rng.integers(lo, hi + 1)))]
                   for _ in range(args.num_requests)]
        gaps = np.zeros(args.num_requests) if rate == float("inf") else rng.exponential(1 / rate, args.num_requests)
        results, tasks = [], []
        for i, prompt in enumerate(prompts):
            await asyncio.sleep(gaps[i])
            r = Result(sent=time.perf_counter())
            results.append(r)
            tasks.append(asyncio.create_task(send(clients[i % len(clients)], prompt, args.output_len, r)))
        await asyncio.gather(*tasks)
        return results
    finally:
        for c in clients:
            await c.close()


def summarize(rate: float, results: list[Result]) -> dict:
    ok = [r for r in results if r.status == "OK"]
    statuses = collections.Counter(r.status for r in results)
    span = max(r.end for r in results) - min(r.sent for r in results)
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    itl = [g for r in ok for g in r.token_gaps]

    def pct(xs, p):
        return float(np.percentile(xs, p) * 1e3) if xs else float("nan")

    return dict(
        rate=rate, sent=len(results), completed=len(ok),
        failed={k: v for k, v in statuses.items() if k not in ("OK", "LOST")}, lost=statuses.get("LOST", 0),
        duration_s=span, req_per_s=len(ok) / span, out_tok_per_s=sum(r.num_tokens for r in ok) / span,
        ttft_ms={p: pct(ttft, p) for p in (50, 90, 99)}, itl_ms={p: pct(itl, p) for p in (50, 90, 99)})


def markdown(rows: list[dict]) -> str:
    out = ["| rate (req/s) | sent | completed | failed (status) | lost | req/s | out tok/s | TTFT p50 / p90 / p99 (ms) "
           "| ITL p50 / p90 / p99 (ms) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        failed = ", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "0"
        t, i = r["ttft_ms"], r["itl_ms"]
        out.append(f"| {r['rate']:g} | {r['sent']} | {r['completed']} | {failed} | {r['lost']} | {r['req_per_s']:.2f} "
                   f"| {r['out_tok_per_s']:.1f} | {t[50]:.1f} / {t[90]:.1f} / {t[99]:.1f} "
                   f"| {i[50]:.2f} / {i[90]:.2f} / {i[99]:.2f} |")
    return "\n".join(out)


class ServerProcess:
    """`python -m serve.main` on an OS-picked loopback port; its log goes to a temporary file."""

    def __init__(self, model: str, extra: list[str]):
        self.http_port: int | None = None
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="serve_bench_", delete=False)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen([sys.executable, "-m", "jinfer.serve.main", "--model", model, "--port", "0", *extra],
                                     cwd=root, stdout=subprocess.DEVNULL, stderr=self.log, text=True)

    def port(self, timeout: float = 900.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            with open(self.log.name) as f:
                for line in f:
                    if line.startswith("{") and '"listening"' in line:
                        record = json.loads(line)
                        self.http_port = record.get("http_port")
                        return record["port"]
            time.sleep(0.2)
        raise TimeoutError(f"the server did not bind within {timeout}s; see {self.log.name}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def wait_serving(target: str, timeout: float) -> None:
    import grpc

    from jinfer.serve.client import JinferClient

    deadline = time.monotonic() + timeout
    with JinferClient(target) as c:
        while time.monotonic() < deadline:
            try:
                if c.health(timeout=2) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{target} not SERVING after {timeout}s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--target", help="host:port of a running server (else one is started)")
    p.add_argument("--server-args", default="", help="extra flags for `python -m serve.main`")
    p.add_argument("--rates", default="5,10,20,40,inf", help="comma-separated request rates (req/s); inf = all at once")
    p.add_argument("--num-requests", type=int, default=64, help="per rate")
    p.add_argument("--clients", type=int, default=16, help="gRPC channels the requests are spread over")
    p.add_argument("--input-len", type=int, nargs=2, default=[16, 96], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--timeout", type=float, default=600.0, help="deadline of each call (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--http", action="store_true", help="also load the server's HTTP front (OpenAI API)")
    p.add_argument("--http-target", help="host:port of a running server's HTTP front (with --target)")
    args = p.parse_args()

    server = None
    target = args.target
    if target is None:
        extra = shlex.split(args.server_args) + (["--http-port", "0"] if args.http else [])
        server = ServerProcess(args.model, extra)
        target = f"127.0.0.1:{server.port()}"
        if args.http:
            args.http_target = f"127.0.0.1:{server.http_port}"
    elif args.http and not args.http_target:
        p.error("--http with --target needs --http-target")
    try:
        t0 = time.perf_counter()
        wait_serving(target, 900)
        print(f"server {target} serving (warm-up {time.perf_counter() - t0:.1f}s after bind)", flush=True)
        from jinfer.serve.client import JinferClient

        with JinferClient(target) as c:
            info = c.model_info()
        args.vocab_size = info.config.vocab_size
        args.model_name = info.model
        print(f"model {info.model}: vocab {info.config.vocab_size}, context {info.max_context}, "
              f"slots {info.limits.max_slots}, pages {info.limits.num_pages}x{info.limits.page_size}", flush=True)
        tables = {}
        for front in ["gRPC"] + (["HTTP"] if args.http else []):
            rng = np.random.default_rng(args.seed)  # the same prompts and arrivals for both fronts
            rows = tables[front] = []
            for rate in [float(x) for x in args.rates.split(",")]:
                results = asyncio.run(run_rate(target, rate, args, rng, http=front == "HTTP"))
                rows.append(summarize(rate, results))
                r = rows[-1]
                print(f"{front} rate {rate:g}: {r['completed']}/{r['sent']} ok, failed {r['failed']}, lost "
                      f"{r['lost']}, {r['out_tok_per_s']:.1f} out tok/s, TTFT p50 {r['ttft_ms'][50]:.1f} ms, "
                      f"ITL p50 {r['itl_ms'][50]:.2f} ms", flush=True)
    finally:
        if server is not None:
            code = server.stop()
            print(f"server exited {code} after SIGTERM; log: {server.log.name}")
    for front, rows in tables.items():
        print(f"\n{front}:\n{markdown(rows)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(tables, f, indent=1)
    every = [r for rows in tables.values() for r in rows]
    lost = sum(r["lost"] for r in every)
    accounted = all(r["completed"] + sum(r["failed"].values()) + r["lost"] == r["sent"] for r in every)
    if lost or not accounted:
        print(f"ERROR: {lost} requests lost", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
