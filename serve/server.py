"""The jinfer.v1.Generation servicer (grpc.aio): turns calls into engine submissions and chunks into messages.

A Generate call validates its request on the event loop (INVALID_ARGUMENT naming the field), submits it to
the engine thread (RESOURCE_EXHAUSTED at once when the waiting queue is full) and then awaits its chunks on
an asyncio.Queue that the engine thread fills. However the call ends before its last token (the client
cancels or disconnects, its deadline passes, the server stops), the request is cancelled in the engine,
which frees its slot and pages before the next step. Every call ends with one structured log line.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time

import grpc

from jinfer.engine.scheduler import QueueFull
from jinfer.serve import convert
from jinfer.serve.engine_thread import Chunk, EngineThread, EngineUnavailable, Submission
from jinfer.serve.metrics import ServeMetrics
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2 as pb
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "jinfer.v1.Generation"

log = logging.getLogger("jinfer.serve")
request_log = logging.getLogger("jinfer.serve.requests")
_PASS_THROUGH = (grpc.aio.AbortError, asyncio.CancelledError)  # how a call ends on purpose


def status_of(error: Exception) -> grpc.StatusCode:
    if isinstance(error, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, EngineUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


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
        chunk = convert.merge_chunks(chunks)
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
        self._engine = engine_thread.engine  # only its immutable parts (tokenizer, configs) are read here
        self._metrics = metrics
        self._model_name = model_name
        self._max_message_bytes = max_message_bytes
        self._ids = itertools.count()
        self.accepting = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

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
        except Exception as e:  # noqa: BLE001 - a bug; the client gets INTERNAL, the log the traceback
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
            return convert.response(call.client_id, convert.merge_chunks(chunks))
        except _PASS_THROUGH:
            raise
        except Exception as e:  # noqa: BLE001
            log.exception("GenerateUnary failed")
            await self._abort(call, context, grpc.StatusCode.INTERNAL, f"internal error: {e!r}")
        finally:
            self._leave(call, context)

    async def _submit(self, call: _Call, request: pb.GenerateRequest, context) -> None:
        if not self.accepting:
            await self._abort(call, context, grpc.StatusCode.UNAVAILABLE, "the server is draining; retry elsewhere")
        try:
            convert.check_request_id(request.request_id)
            sampling = convert.sampling_params(request.sampling, self._engine.config.max_logprobs)
            ids = convert.prompt_ids(self._engine, request)
        except ValueError as e:
            await self._abort(call, context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        call.num_prompt_tokens = len(ids)
        call.engine_id = f"rpc-{next(self._ids)}"
        try:
            self._engine_thread.submit(Submission(call.engine_id, ids, sampling, call.queue.put_nowait,
                                                  call.received))
        except (QueueFull, EngineUnavailable) as e:
            call.engine_id = None
            await self._abort(call, context, status_of(e), str(e))

    async def _abort(self, call: _Call, context, code: grpc.StatusCode, details: str):
        call.status, call.error = code, details
        await context.abort(code, details)

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
                # The client's RST can arrive a hair before the server's own deadline timer fires.
                remaining = context.time_remaining()
                call.status = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0.05
                               else grpc.StatusCode.CANCELLED)
        self._metrics.record_outcome(call.method, call.status.name, call.finish_reason)
        self._log(call)

    def _log(self, call: _Call) -> None:
        now = time.perf_counter()
        u = call.usage
        record = {
            "event": "request", "method": call.method, "request_id": call.client_id, "engine_id": call.engine_id,
            "status": call.status.name, "finish_reason": call.finish_reason,
            "prompt_tokens": u.prompt_tokens if u else call.num_prompt_tokens,
            "completion_tokens": u.completion_tokens if u else call.num_tokens,
            "cached_prompt_tokens": u.cached_prompt_tokens if u else 0,
            "time_to_first_token_s": None if call.time_to_first_token is None else round(call.time_to_first_token, 6),
            "duration_s": round(now - call.received, 6),
        }
        if call.error:
            record["error"] = call.error
        request_log.info(json.dumps(record))

    async def wait_idle(self) -> None:
        await self._idle.wait()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # ---- tokenizer and model -------------------------------------------------------------------

    def _tokenizer(self):
        if self._engine.tokenizer is None:
            raise ValueError("this server's model has no tokenizer (token-id prompts only)")
        return self._engine.tokenizer

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            kind = request.WhichOneof("input")
            if kind is None:
                raise ValueError("input is not set: give text or chat")
            if kind == "chat":
                text, ids = convert.render_chat(self._engine, request.chat, "chat")
            else:
                add = request.add_special_tokens if request.HasField("add_special_tokens") else True
                text, ids = request.text, self._tokenizer().encode(request.text, add_special_tokens=add)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(token_ids=ids, text=text)

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        try:
            tok = self._tokenizer()
            ids = convert.token_ids_in_vocab(request.token_ids, self._engine.model_config.vocab_size, "token_ids")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.DetokenizeResponse(text=tok.decode(ids, skip_special_tokens=not request.keep_special_tokens))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        return convert.model_info(self._engine, self._model_name, self._max_message_bytes)
