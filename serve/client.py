"""Python clients of a jinfer server: `JinferClient` (blocking) and `AsyncJinferClient` (asyncio).

Both take the prompt as jinfer.LLM does (a string or a list of token ids; or `messages=` for chat) and the
sampling fields of jinfer.SamplingParams as keyword arguments:

    with JinferClient("localhost:50051") as c:
        for msg in c.stream("Once upon a time", max_tokens=64, temperature=0.7):
            print(msg.text, end="", flush=True)

`stream` returns the gRPC call itself: iterate it for GenerateResponse messages, `.cancel()` it to stop
the generation early (the server frees the request's KV pages at once).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jinfer.serve.auth import bearer_metadata
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2 as pb
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def _set_chat(chat: pb.Chat, messages: Sequence[dict]) -> None:
    """protobuf's own dict -> message mapping: an unknown or mistyped key is named in the error."""
    try:
        json_format.ParseDict({"messages": list(messages)}, chat)
    except json_format.ParseError as e:
        raise ValueError(f"messages: {e}") from None


def build_request(prompt: str | Sequence[int] | None = None, *, messages: Sequence[dict] | None = None,
                  request_id: str = "", **sampling) -> pb.GenerateRequest:
    """A GenerateRequest from a prompt (text or token ids) or chat messages, and SamplingParams fields."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    req = pb.GenerateRequest(request_id=request_id)
    if messages is not None:
        _set_chat(req.chat, messages)
    elif isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    structured = sampling.pop("structured_outputs", None)
    if structured is not None:
        sampling["structured_outputs"] = _structured(structured)
    if isinstance(sampling.get("logit_bias"), (list, tuple)):
        sampling["logit_bias"] = dict(sampling["logit_bias"])
    stop = sampling.pop("stop", None)
    if isinstance(stop, str):
        stop = [stop]
    try:
        req.sampling.CopyFrom(pb.SamplingParams(stop=stop or (), **{k: v for k, v in sampling.items() if v is not None}))
    except ValueError as e:  # protobuf names the unknown field
        raise TypeError(f"unknown sampling argument: {e}") from None
    return req


def _structured(value) -> pb.StructuredOutputs:
    """A StructuredOutputs (or a dict of its fields) as its message."""
    fields = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)
    fields = {k: v for k, v in fields.items() if v not in (None, False)}
    if isinstance(fields.get("json"), dict):
        fields["json"] = json.dumps(fields["json"])
    if "choice" in fields:
        fields["choice"] = pb.Choices(values=fields["choice"])
    return pb.StructuredOutputs(**fields)


def _channel_args(target: str, root_certificates: bytes | None, tls: bool, max_message_bytes: int,
                  server_name: str | None):
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    creds = grpc.ssl_channel_credentials(root_certificates) if (tls or root_certificates) else None
    return target, creds, options


class _Client:
    """What the blocking and the asyncio client share: the channel, the stubs, the call options."""

    _channels = (grpc.insecure_channel, grpc.secure_channel)

    def __init__(self, target: str, *, token: str | None = None, root_certificates: bytes | None = None,
                 tls: bool = False, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, server_name: str | None = None):
        target, creds, options = _channel_args(target, root_certificates, tls, max_message_bytes, server_name)
        insecure, secure = self._channels
        self.channel = secure(target, creds, options) if creds is not None else insecure(target, options)
        self._stub = pb_grpc.GenerationStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._metadata = bearer_metadata(token)
        self.timeout = timeout

    def _kw(self, timeout):
        return dict(metadata=self._metadata, timeout=self.timeout if timeout is None else timeout)

    def stream(self, prompt=None, *, messages=None, request_id: str = "", timeout: float | None = None,
               **sampling):
        """The streaming call: iterate it for GenerateResponse messages; `.cancel()` ends it."""
        req = build_request(prompt, messages=messages, request_id=request_id, **sampling)
        return self._stub.Generate(req, **self._kw(timeout))


class JinferClient(_Client):
    """`root_certificates` (PEM bytes) or `tls=True` (the system's roots) for a TLS server; `token` for a
    server that wants a bearer token; `timeout` (seconds) is every call's default deadline."""

    def generate(self, prompt=None, *, messages=None, request_id: str = "", timeout: float | None = None,
                 **sampling) -> pb.GenerateResponse:
        """The whole generation in one message (GenerateUnary)."""
        req = build_request(prompt, messages=messages, request_id=request_id, **sampling)
        return self._stub.GenerateUnary(req, **self._kw(timeout))

    def tokenize(self, text: str | None = None, *, messages=None, add_special_tokens: bool | None = None,
                 timeout: float | None = None) -> list[int]:
        req = pb.TokenizeRequest(add_special_tokens=add_special_tokens)
        if messages is not None:
            _set_chat(req.chat, messages)
        else:
            req.text = text
        return list(self._stub.Tokenize(req, **self._kw(timeout)).token_ids)

    def detokenize(self, token_ids: Sequence[int], *, keep_special_tokens: bool = False,
                   timeout: float | None = None) -> str:
        req = pb.DetokenizeRequest(token_ids=token_ids, keep_special_tokens=keep_special_tokens)
        return self._stub.Detokenize(req, **self._kw(timeout)).text

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """'SERVING', 'NOT_SERVING', ... of grpc.health.v1 (needs no token)."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "JinferClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncJinferClient(_Client):
    """The asyncio twin of JinferClient (same arguments); `stream` returns an async-iterable call."""

    _channels = (grpc.aio.insecure_channel, grpc.aio.secure_channel)

    async def generate(self, prompt=None, *, messages=None, request_id: str = "", timeout: float | None = None,
                       **sampling) -> pb.GenerateResponse:
        req = build_request(prompt, messages=messages, request_id=request_id, **sampling)
        return await self._stub.GenerateUnary(req, **self._kw(timeout))

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(timeout))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        resp = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                        timeout=timeout or self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncJinferClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
