"""The OpenAI-compatible HTTP front: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/tokenize`,
`/detokenize`, `/health`, `/metrics`, on the same event loop, engine thread, tokens and metrics as gRPC.

Starlette under uvicorn, not FastAPI: the request bodies are checked by the engine's edge
(`jinfer.inputs`, through `serve.openai_requests`), which names the field of every refusal; FastAPI's value
is pydantic models that would check the same fields a second time, with other messages, as 422s. uvicorn
serves a socket bound before the model loads (as gRPC's port is), and leaves the process's signals to
`jinfer serve`, which drains both fronts on SIGTERM.

Every body is a JSON object; errors are OpenAI error objects (400 naming the `param`, 401, 404 for another
model's name, 413 for a body over the message limit, 429 when the waiting queue is full, 503 while warming
up or draining). A client that goes away mid-request has its engine requests cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import json
import logging
import socket
import time

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jinfer.engine.scheduler import QueueFull
from jinfer.serve import openai_requests as req
from jinfer.serve import openai_responses as res
from jinfer.serve.auth import HEADER, refusal, token_bytes
from jinfer.serve.engine_thread import Chunk, EngineThread, EngineUnavailable, Submission, merge_chunks
from jinfer.serve.metrics import ServeMetrics
from jinfer.serve.ports import check_port_free

log = logging.getLogger("jinfer.serve")
request_log = logging.getLogger("jinfer.serve.requests")
TOKENIZER_THREADS = 4


def error_response(e: req.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _refused(e: Exception) -> req.ApiError:
    if isinstance(e, QueueFull):
        return req.ApiError(429, str(e), type="rate_limit_error", code="queue_full")
    if isinstance(e, EngineUnavailable):
        return req.ApiError(503, str(e), type="service_unavailable", code="unavailable")
    if isinstance(e, ValueError):
        return req.bad(str(e), req.param_of(str(e)))
    return req.ApiError(500, f"internal error: {e!r}", type="internal_error")


class _Server(uvicorn.Server):
    def capture_signals(self):  # `jinfer serve` owns SIGTERM and SIGINT (it drains gRPC and HTTP together)
        return contextlib.nullcontext()


class HttpFront:
    """`bind()` the socket, `start(engine_thread)`, `drain(grace)` after refusing new work."""

    def __init__(self, host: str, port: int, model_name: str, metrics: ServeMetrics, auth_tokens=(),
                 max_body_bytes: int = 4 * 1024 * 1024):
        self.host, self.port, self.model_name, self.metrics = host, port, model_name, metrics
        self._tokens = token_bytes(auth_tokens) if auth_tokens else None
        self.max_body_bytes = max_body_bytes
        self.accepting = True
        self.engine_thread: EngineThread | None = None
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._pool = concurrent.futures.ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="jinfer-http")
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    # ---- life --------------------------------------------------------------------------------------

    def bind(self) -> int:
        check_port_free(self.host, self.port)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(256)
        sock.setblocking(False)
        self._sock, self.port = sock, sock.getsockname()[1]
        return self.port

    def start(self, engine_thread: EngineThread) -> None:
        self.engine_thread = engine_thread
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1, h11_max_incomplete_event_size=self.max_body_bytes)
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._sock]))

    async def drain(self, grace: float) -> None:
        """New requests get 503 from now on; those in flight get `grace` seconds; then the server stops."""
        self.accepting = False
        if self._in_flight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        if self._server is not None:
            self._server.should_exit = True
            await self._task
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # ---- plumbing ----------------------------------------------------------------------------------

    async def _not_found(self, request: Request, exc) -> JSONResponse:
        return error_response(req.ApiError(404, f"no route {request.url.path}", None, code="not_found"))

    async def _not_allowed(self, request: Request, exc) -> JSONResponse:
        return error_response(req.ApiError(405, f"{request.method} is not allowed on {request.url.path}", None))

    def _auth(self, request: Request) -> None:
        if self._tokens is None:
            return
        why = refusal(request.headers.getlist(HEADER), self._tokens, "the header")
        if why is not None:
            raise req.ApiError(401, why, None, type="authentication_error", code="invalid_api_key")

    async def _body(self, request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            raise req.ApiError(413, f"the body ({size} bytes) is over the limit of {self.max_body_bytes} bytes", None)
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > self.max_body_bytes:
                raise req.ApiError(413, f"the body is over the limit of {self.max_body_bytes} bytes", None)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise req.bad(f"the body is not JSON: {e}", None) from None

    def _ready(self) -> None:
        if not self.accepting:
            raise req.ApiError(503, "the server is draining; retry elsewhere", None, type="service_unavailable")
        if self.engine_thread is None or not self.engine_thread.ready:
            raise req.ApiError(503, "the engine is warming up", None, type="service_unavailable")

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _log(self, path: str, status: int, started: float, **fields) -> None:
        record = {"event": "request", "front": "http", "path": path, "status": status,
                  "duration_s": round(time.perf_counter() - started, 6), **fields}
        request_log.info(json.dumps(record))

    # ---- plain endpoints -----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        try:
            self._ready()
        except req.ApiError as e:
            return error_response(e)
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        try:
            self._auth(request)
        except req.ApiError as e:
            return error_response(e)
        engine = self.engine_thread.engine if self.engine_thread else None
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "jinfer",
                "max_model_len": engine.max_model_len if engine else None}
        return JSONResponse({"object": "list", "data": [card]})

    async def tokenize(self, request: Request) -> Response:
        return await self._tokenizer_call(request, self._tokenize)

    async def detokenize(self, request: Request) -> Response:
        return await self._tokenizer_call(request, self._detokenize)

    async def _tokenizer_call(self, request: Request, fn) -> Response:
        """An authorized body handed to `fn(body) -> dict` off the event loop (tokenizer work may be long)."""
        try:
            self._auth(request)
            self._ready()
            body = await self._body(request)
            return JSONResponse(await self._off_loop(fn, body))
        except req.ApiError as e:
            return error_response(e)

    def _tokenize(self, body) -> dict:
        inputs = self.engine_thread.engine.inputs
        if not isinstance(body, dict):
            raise req.bad("the request body must be a JSON object", None)
        try:
            if "messages" in body:
                _, ids = inputs.render_chat(body["messages"], "messages")
            elif isinstance(body.get("prompt"), str):
                add = body.get("add_special_tokens", True)
                if not isinstance(add, bool):
                    raise req.bad("add_special_tokens must be true or false", "add_special_tokens")
                ids = inputs.require_tokenizer("prompt").encode(body["prompt"], add_special_tokens=add)
            else:
                raise req.bad("give prompt (a string) or messages", "prompt")
        except ValueError as e:
            raise req.bad(str(e), req.param_of(str(e))) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine_thread.engine.max_model_len}

    def _detokenize(self, body) -> dict:
        inputs = self.engine_thread.engine.inputs
        if not isinstance(body, dict) or not isinstance(body.get("tokens"), list):
            raise req.bad("tokens must be a list of token ids", "tokens")
        try:
            ids = inputs.token_ids(body["tokens"], "tokens")
            return {"prompt": inputs.require_tokenizer("tokens").decode(ids)}
        except ValueError as e:
            raise req.bad(str(e), req.param_of(str(e))) from None

    # ---- generation ----------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        started = time.perf_counter()
        path = request.url.path
        try:
            self._auth(request)
            self._ready()
            body = await self._body(request)
            engine = self.engine_thread.engine
            if chat:
                parsed = await self._off_loop(req.chat, engine.inputs, body, self.model_name, engine.max_model_len)
            else:
                parsed = await self._off_loop(req.completion, engine.inputs, body, self.model_name,
                                              engine.max_model_len)
        except req.ApiError as e:
            self._log(path, e.status, started, error=e.message[:512])
            return error_response(e)
        queue: asyncio.Queue = asyncio.Queue()
        ids = []
        try:
            for i, r in enumerate(parsed.requests):
                rid = f"http-{next(self._ids)}"
                first = ids[i - i % parsed.n] if i % parsed.n else None  # choice 0 of the same prompt
                self.engine_thread.submit(Submission(rid, r, lambda c, i=i: queue.put_nowait((i, c)), started,
                                                     same_prompt_as=first))
                ids.append(rid)
        except (QueueFull, EngineUnavailable) as e:
            for rid in ids:
                self.engine_thread.cancel(rid)
            err = _refused(e)
            self._log(path, err.status, started, error=err.message)
            return error_response(err)
        self._enter()
        call = _Generation(self, parsed, ids, queue, chat, started, path)
        if parsed.stream:
            # close() also as a background task: a client gone before the first chunk never runs the generator
            return StreamingResponse(call.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"}, background=BackgroundTask(call.close))
        try:
            return await call.whole(request)
        finally:
            call.close()

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()


class _Generation:
    """One body's choices: their engine requests, what has arrived, and the answer in either form."""

    def __init__(self, front: HttpFront, parsed: req.Parsed, ids: list[str], queue: asyncio.Queue, chat: bool,
                 started: float, path: str):
        self.front, self.parsed, self.ids, self.queue, self.chat = front, parsed, ids, queue, chat
        self._held: collections.deque = collections.deque()  # taken from the queue by a merge, not yet handled
        self.started, self.path = started, path
        self.rid = f"{'chatcmpl' if chat else 'cmpl'}-{ids[0]}"
        self.created = int(time.time())
        self.choices = [res.Choice(i) for i in range(len(ids))]
        self.tokens = res.Tokens(front.engine_thread.engine.tokenizer)
        self.status = 200
        self.closed = False

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for c, rid in zip(self.choices, self.ids):
            if c.finish_reason is None:
                self.front.engine_thread.cancel(rid)  # the client went away, or an error ended the call
        self.front._leave()
        self.front._log(self.path, self.status, self.started, choices=len(self.choices),
                        completion_tokens=sum(c.completion_tokens for c in self.choices))

    def _prompt_text(self, i: int) -> str:
        p = self.parsed.requests[i].prompt
        return p.text if p.text is not None else self.front.engine_thread.engine.tokenizer.decode(list(p.ids))

    def _usage(self) -> dict:
        n = self.parsed.n
        return res.total_usage(self.choices, [len(r.prompt.ids) for r in self.parsed.requests[::n]])

    async def _next(self) -> tuple[int, Chunk]:
        i, chunk = self._held.popleft() if self._held else await self.queue.get()
        if chunk.error is not None:
            raise _refused(chunk.error)
        self.choices[i].add(chunk)
        return i, chunk

    async def _next_merged(self) -> tuple[int, Chunk]:
        """The next chunk, with the chunks of the same choice that queued up behind it while the last event
        was being written (one SSE event for them: under load the client reads fewer, larger messages, as
        from the gRPC front)."""
        i, chunk = await self._next()
        more = [chunk]
        while not self._held and not self.queue.empty() and more[-1].finish_reason is None:
            j, nxt = self.queue.get_nowait()
            if j != i or nxt.error is not None:
                self._held.append((j, nxt))  # another choice's, or a refusal: handled next, in order
                break
            self.choices[i].add(nxt)
            more.append(nxt)
        return i, merge_chunks(more)

    def _usage_so_far(self, i: int) -> dict | None:
        if not self.parsed.continuous_usage:
            return None
        return res.usage(len(self.parsed.requests[i].prompt.ids), self.choices[i].generated)

    async def whole(self, request: Request) -> Response:
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while not self.done:
                got = asyncio.ensure_future(self._next())
                await asyncio.wait([got, gone], return_when=asyncio.FIRST_COMPLETED)
                if not got.done():
                    got.cancel()
                    self.status = 499  # the client closed the connection
                    return Response(status_code=499)
                got.result()
        except req.ApiError as e:
            self.status = e.status
            return error_response(e)
        finally:
            gone.cancel()
        top = self.parsed.logprobs
        out = []
        for c in self.choices:
            if self.chat:
                lp = res.chat_logprobs(c.logprobs, self.tokens, top) if top is not None else None
                out.append(res.chat_choice(c.index, c.text, lp, c.finish_reason))
            else:
                prefix = self._prompt_text(c.index) if self.parsed.echo else ""
                lp = res.completion_logprobs(c.logprobs, self.tokens, len(prefix), top) if top is not None else None
                out.append(res.completion_choice(c.index, prefix + c.text, lp, c.finish_reason))
        make = res.chat if self.chat else res.completion
        return JSONResponse(make(self.rid, self.created, self.front.model_name, out, self._usage()))

    async def stream(self):
        model, top = self.front.model_name, self.parsed.logprobs
        offsets = [0] * len(self.choices)
        echoed: set[int] = set()  # choices whose prompt text has gone out (echo)
        try:
            if self.chat:
                yield res.sse(res.chat(self.rid, self.created, model, [
                    res.chat_delta(c.index, {"role": "assistant", "content": ""}, None, None)
                    for c in self.choices], None, chunk=True))
            while not self.done:
                try:
                    i, chunk = await self._next_merged()
                except req.ApiError as e:
                    self.status = e.status
                    yield res.sse(e.body())
                    break
                finish = chunk.finish_reason
                if self.chat:
                    lp = res.chat_logprobs(list(chunk.logprobs), self.tokens, top) if top is not None else None
                    if chunk.text or lp:
                        yield res.sse(res.chat(self.rid, self.created, model, [
                            res.chat_delta(i, {"content": chunk.text}, lp, None)], self._usage_so_far(i), chunk=True))
                    if finish is not None:
                        yield res.sse(res.chat(self.rid, self.created, model, [res.chat_delta(i, {}, None, finish)],
                                               self._usage_so_far(i), chunk=True))
                else:
                    text = chunk.text
                    if self.parsed.echo and i not in echoed:
                        echoed.add(i)
                        text = self._prompt_text(i) + text
                    lp = (res.completion_logprobs(list(chunk.logprobs), self.tokens, offsets[i], top)
                          if top is not None else None)
                    offsets[i] += len(text)
                    yield res.sse(res.completion(self.rid, self.created, model,
                                                 [res.completion_choice(i, text, lp, finish)], self._usage_so_far(i)))
            if self.parsed.include_usage and self.done:
                make = res.chat if self.chat else res.completion
                yield res.sse(make(self.rid, self.created, model, [], self._usage(), **(
                    {"chunk": True} if self.chat else {})))
            yield res.DONE
        finally:
            self.close()


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
