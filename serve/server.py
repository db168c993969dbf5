"""The jinfer.v1.Generation servicer (grpc.aio): turns calls into engine submissions and chunks into messages.

A Generate call checks its request (INVALID_ARGUMENT naming the field), submits it to the engine thread
(RESOURCE_EXHAUSTED at once when the waiting queue is full) and then awaits its chunks on an asyncio.Queue
that the engine thread fills. Checking a request tokenizes its text or renders its chat, and Tokenize and
Detokenize are all tokenizer work: that runs on a small thread pool, so a multi-megabyte text never holds
up the event loop and the other callers on it. However the call ends before its last token (the client
cancels or disconnects, its deadline passes, the server stops), the request is cancelled in the engine,
which frees its slot and pages before the next step. Every call ends with one structured log line, in
which every client-supplied string is cut to `MAX_LOGGED_CHARS`.

`UndecodableRequests`, a server interceptor, answers request bytes that are not the method's message with
INVALID_ARGUMENT (gRPC itself would answer UNKNOWN and log a traceback).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
import json
import logging
import time
from typing import Callable

import grpc

from jinfer.engine.scheduler import QueueFull
from jinfer.serve import convert
from jinfer.serve.engine_thread import Chunk, EngineThread, EngineUnavailable, Submission, merge_chunks
from jinfer.serve.metrics import ServeMetrics
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2 as pb
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "jinfer.v1.Generation"
GENERATE_METHODS = ("Generate", "GenerateUnary")  # the calls counted in jinfer_requests_total
MAX_LOGGED_CHARS = 512  # a request_id may be refused for being 100 KB long; the log gets this much of it
TOKENIZER_THREADS = 4  # tokenizing, chat rendering and detokenizing, off the event loop

log = logging.getLogger("jinfer.serve")
request_log = logging.getLogger("jinfer.serve.requests")
_PASS_THROUGH = (grpc.aio.AbortError, asyncio.CancelledError)  # how a call ends on purpose


def clip(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """`text`, or its first `limit` characters with an ellipsis and the original length."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def status_of(error: Exception) -> grpc.StatusCode:
    if isinstance(error, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, EngineUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def ended_early(context) -> grpc.StatusCode:
    """The status of a call that ended without the server's word: the client cancelled or went away, or
    its deadline passed (the client's RST can arrive a hair before the server's own deadline timer fires)."""
    remaining = context.time_remaining()
    return (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0.05
            else grpc.StatusCode.CANCELLED)


async def abort(context, code: grpc.StatusCode, details: str) -> None:
    """context.abort, which always raises: AbortError once the status is sent, CancelledError when the call
    had already ended. gRPC fails the send with an InternalError when the client left (cancelled,
    disconnected, deadline passed) before the cancellation reached this task; that is a cancellation,
    not a server error, and must not escape to gRPC, which would log it with a traceback."""
    try:
        await context.abort(code, details)
    except grpc.aio.InternalError:
        raise asyncio.CancelledError from None


class _Call:
    """One Generate call's progress, for its outcome and its log line."""

    def __init__(self, method: str, client_id: str, received: float):
        self.method = method
        self.client_id = client_id
        self.engine_id: str | None = None
        self.received = received
        self.queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self.status = grpc.StatusCode.OK
        self.error = ""
        self.finish_reason: str | None = None
        self.usage = None
        self.time_to_first_token: float | None = None
        self.num_tokens = 0
        self.num_prompt_tokens = 0

    async def next(self) -> Chunk:
        """Every chunk that has arrived (waiting for at least one), merged into one."""
        chunks = [await self.queue.get()]
        while not self.queue.empty():
            chunks.append(self.queue.get_nowait())
        for c in chunks:
            if c.error is not None:
                return c
        chunk = merge_chunks(chunks)
        self.num_tokens += len(chunk.token_ids)
        if chunk.finish_reason is not None:
            self.finish_reason, self.usage = chunk.finish_reason, chunk.usage
            self.time_to_first_token = chunk.time_to_first_token
        return chunk

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, engine_thread: EngineThread, metrics: ServeMetrics, model_name: str,
                 max_message_bytes: int):
        self._engine_thread = engine_thread
        self._engine = engine_thread.engine  # only its immutable parts (tokenizer, configs, limits) are read here
        self._metrics = metrics
        self._model_name = model_name
        self._max_message_bytes = max_message_bytes
        self._ids = itertools.count()
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(TOKENIZER_THREADS,
                                                                     thread_name_prefix="jinfer-tokenize")
        self.accepting = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def close(self) -> None:
        """Ends the tokenizer threads (work already running in them finishes unobserved)."""
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    # ---- Generate ------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        call = _Call("Generate", request.request_id, time.perf_counter())
        self._enter()
        try:
            await self._submit(call, request, context)
            while not call.finished:
                chunk = await call.next()
                if chunk.error is not None:
                    await self._abort(call, context, status_of(chunk.error), str(chunk.error))
                yield convert.response(call.client_id, chunk)
        except _PASS_THROUGH:
            raise
        except Exception as e:  # a bug; the client gets INTERNAL, the log the traceback
            log.exception("Generate failed")
            await self._abort(call, context, grpc.StatusCode.INTERNAL, f"internal error: {e!r}")
        finally:
            self._leave(call, context)

    async def GenerateUnary(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        call = _Call("GenerateUnary", request.request_id, time.perf_counter())
        self._enter()
        try:
            await self._submit(call, request, context)
            chunks = []
            while not call.finished:
                chunk = await call.next()
                if chunk.error is not None:
                    await self._abort(call, context, status_of(chunk.error), str(chunk.error))
                chunks.append(chunk)
            return convert.response(call.client_id, merge_chunks(chunks))
        except _PASS_THROUGH:
            raise
        except Exception as e:
            log.exception("GenerateUnary failed")
            await self._abort(call, context, grpc.StatusCode.INTERNAL, f"internal error: {e!r}")
        finally:
            self._leave(call, context)

    async def _submit(self, call: _Call, request: pb.GenerateRequest, context) -> None:
        if not self.accepting:
            await self._abort(call, context, grpc.StatusCode.UNAVAILABLE, "the server is draining; retry elsewhere")
        try:
            checked = await self._off_loop(convert.request, self._engine.inputs, request)
        except ValueError as e:
            await self._abort(call, context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        call.num_prompt_tokens = len(checked.prompt.ids)
        call.engine_id = f"rpc-{next(self._ids)}"
        try:
            self._engine_thread.submit(Submission(call.engine_id, checked, call.queue.put_nowait,
                                                  call.received))
        except (QueueFull, EngineUnavailable) as e:
            call.engine_id = None
            await self._abort(call, context, status_of(e), str(e))

    async def _abort(self, call: _Call, context, code: grpc.StatusCode, details: str):
        call.status, call.error = code, details
        try:
            await abort(context, code, details)
        except asyncio.CancelledError:
            call.status = ended_early(context)
            call.error = f"{details} (not sent: the call had already ended)"
            raise

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _leave(self, call: _Call, context) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()
        if call.engine_id is not None and not call.finished:
            # Ended early (a no-op for the engine thread if it already dropped the request).
            self._engine_thread.cancel(call.engine_id)
            if call.status == grpc.StatusCode.OK:
                # Not by us: the client cancelled or went away, the deadline passed, or the server stopped.
                call.status = ended_early(context)
        self._metrics.record_outcome(call.method, call.status.name, call.finish_reason)
        self._log(call)

    def _log(self, call: _Call) -> None:
        now = time.perf_counter()
        u = call.usage
        record = {
            "event": "request", "method": call.method, "request_id": clip(call.client_id),
            "engine_id": call.engine_id, "status": call.status.name, "finish_reason": call.finish_reason,
            "prompt_tokens": u.prompt_tokens if u else call.num_prompt_tokens,
            "completion_tokens": u.completion_tokens if u else call.num_tokens,
            "cached_prompt_tokens": u.cached_prompt_tokens if u else 0,
            "time_to_first_token_s": None if call.time_to_first_token is None else round(call.time_to_first_token, 6),
            "duration_s": round(now - call.received, 6),
        }
        if call.error:
            record["error"] = clip(call.error)
        request_log.info(json.dumps(record))

    def record_undecodable(self, method: str, why: str) -> None:
        """The one log line (and, for Generate calls, the outcome) of a call whose request bytes did not
        parse; `method` is the call's path (/package.Service/Method)."""
        prefix = f"/{SERVICE_NAME}/"
        name = method[len(prefix):] if method.startswith(prefix) else method
        call = _Call(clip(name), "", time.perf_counter())
        call.status, call.error = grpc.StatusCode.INVALID_ARGUMENT, why
        if name in GENERATE_METHODS:
            self._metrics.record_outcome(name, call.status.name)
        self._log(call)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # ---- tokenizer and model -------------------------------------------------------------------

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            return await self._off_loop(convert.tokenize, self._engine.inputs, request)
        except ValueError as e:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        try:
            return await self._off_loop(convert.detokenize, self._engine.inputs, request)
        except ValueError as e:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        return convert.model_info(self._engine, self._model_name, self._max_message_bytes)


# ---- request bytes that do not parse ------------------------------------------------------------

class UndecodableRequests(grpc.aio.ServerInterceptor):
    """Wraps every handler of an async unary-request method (jinfer's, health's) so that bytes its
    deserializer refuses (not a protobuf; a string field that is not UTF-8) end the call with
    INVALID_ARGUMENT and one call to `on_undecodable(method, why)`, the log line. Methods with a request
    stream (reflection) are left as they are."""

    def __init__(self, on_undecodable: Callable[[str, str], None]):
        self._on_undecodable = on_undecodable

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        inner = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if not (inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner)):
            return handler  # a blocking handler gRPC runs on its own threads: not ours to run on the loop
        parse, method = handler.request_deserializer, handler_call_details.method

        async def decode(raw: bytes, context):
            try:
                return parse(raw)
            except Exception as e:  # protobuf's DecodeError, or whatever a deserializer raises
                why = clip(f"the request ({len(raw)} bytes) does not parse: {e}")
                self._on_undecodable(method, why)
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, why)

        if not handler.response_streaming:
            async def unary_unary(raw, context):
                return await inner(await decode(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, handler.response_serializer)
        if inspect.isasyncgenfunction(inner):
            async def unary_stream(raw, context):
                responses = inner(await decode(raw, context), context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    await responses.aclose()  # its own cleanup now, not when the garbage collector finds it
        else:
            async def unary_stream(raw, context):  # a coroutine that writes with context.write
                return await inner(await decode(raw, context), context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, None, handler.response_serializer)
