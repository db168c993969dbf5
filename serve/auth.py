"""Bearer-token authentication: a server interceptor that checks `authorization: Bearer <token>` metadata.

A call without the header, or with a token not in the server's set, ends with UNAUTHENTICATED before
its handler runs. The health service is exempt, so load balancers and orchestrators can probe the server
without a secret (health reveals nothing but SERVING / NOT_SERVING). Pair tokens with TLS: on a plaintext
channel the token crosses the network in the clear.
"""

from __future__ import annotations

import hmac
from typing import Iterable

import grpc

HEADER = "authorization"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata a client sends with `token` (none without one)."""
    return ((HEADER, f"Bearer {token}"),) if token else ()


def refusal(values: list, tokens: list[bytes], how: str = "call metadata") -> str | None:
    """Why a call whose authorization values are `values` (str or bytes) is refused, or None if its token is
    one of `tokens`. `how`: what carries them ("call metadata", "the header")."""
    if not values:
        return f"missing credentials: send {how} '{HEADER}: Bearer <token>'"
    scheme, _, token = (values[0] if isinstance(values[0], str) else values[0].decode()).partition(" ")
    if scheme.lower() != "bearer" or not token:
        return f"the '{HEADER}' {how.split()[-1]} must read 'Bearer <token>'"
    # Compare against every token, in constant time, so timing tells nothing about which nearly matched.
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(token.strip().encode(), t)
    return None if ok else "the bearer token is not valid"


def token_bytes(tokens: Iterable[str]) -> list[bytes]:
    out = [t.encode() for t in tokens]
    if not out or not all(t.strip() for t in out):
        raise ValueError("auth tokens must be a non-empty list of non-blank strings")
    return out


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: Iterable[str], exempt_prefixes: tuple[str, ...] = EXEMPT_PREFIXES):
        self._tokens = token_bytes(tokens)
        self._exempt = exempt_prefixes

    def _refusal(self, metadata) -> str | None:
        """Why the call is refused, or None if its token is good."""
        return refusal([v for k, v in (metadata or ()) if k == HEADER], self._tokens)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(self._exempt):
            return await continuation(handler_call_details)
        why = self._refusal(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if why is None or handler is None:
            return handler
        return _denying_handler(handler, why)


def _denying_handler(handler: grpc.RpcMethodHandler, why: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary/stream) as `handler` that only refuses the call."""

    async def deny(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    ser = dict(request_deserializer=handler.request_deserializer,
               response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **ser)
    return grpc.stream_stream_rpc_method_handler(deny, **ser)
