"""ServeApp: one server's life — bind, warm up, serve, drain — around an Engine.

`bind()` takes the port (and the metrics port) before there is an engine, so that `jinfer serve` on a port
in use fails in a second rather than after loading a model; port reuse is off, so a second server on the
same port is refused instead of silently sharing its traffic. `start(engine)` (binding first if need be)
starts the engine thread, whose first job is the warm-up; until it ends the health service reports
NOT_SERVING and Generate answers UNAVAILABLE. `drain(grace)` reports NOT_SERVING again, refuses new
Generate calls, lets the ones in flight finish for up to `grace` seconds, then stops the gRPC server
(cancelling what is left) and the engine thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from jinfer.engine.engine import Engine
from jinfer.serve.auth import BearerTokenInterceptor
from jinfer.serve.engine_thread import EngineThread
from jinfer.serve.metrics import ServeMetrics
from jinfer.serve.ports import address as _address
from jinfer.serve.ports import check_port_free
from jinfer.serve.proto.jinfer.v1 import jinfer_pb2_grpc as pb_grpc
from jinfer.serve.server import SERVICE_NAME, GenerationServicer, UndecodableRequests

log = logging.getLogger("jinfer.serve")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: the OS picks one (see ServeApp.port)
    model_name: str = ""  # reported by GetModelInfo
    tls_cert_chain: bytes | None = None  # PEM; with tls_private_key, the server speaks TLS only
    tls_private_key: bytes | None = None
    auth_tokens: tuple[str, ...] = ()  # non-empty: every call but health needs one of these bearer tokens
    max_message_bytes: int = 4 * 1024 * 1024  # the largest request or response message
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no Prometheus endpoint; 0: the OS picks one
    drain_grace_s: float = 30.0
    http_port: int | None = None  # the OpenAI-compatible HTTP front on `host` (None: none; 0: the OS picks one)

    def __post_init__(self):
        if (self.tls_cert_chain is None) != (self.tls_private_key is None):
            raise ValueError("TLS needs both a certificate chain and a private key")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port={self.port} must be in [0, 65536)")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port={self.http_port} must be in [0, 65536)")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes={self.max_message_bytes} must be at least 1024")
        if self.drain_grace_s < 0:
            raise ValueError(f"drain_grace_s={self.drain_grace_s} must be >= 0")


class ServeApp:
    """`bind()`, then `start(engine)`, then `drain()` (see the module's docstring); on one event loop."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.metrics = ServeMetrics()
        self.engine: Engine | None = None  # set by start()
        self.server: grpc.aio.Server | None = None  # set by bind()
        self.servicer: GenerationServicer | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http = None  # serve.http_app.HttpFront, when options.http_port is set
        self.http_port: int | None = None
        self.ready = asyncio.Event()
        self.failed = asyncio.Event()
        self._stop_metrics = None
        self._tasks: set[asyncio.Task] = set()

    async def bind(self) -> int:
        """Binds the gRPC port and serves the metrics (nothing else yet); returns the bound port."""
        if self.server is not None:
            return self.port
        o = self.options
        check_port_free(o.host, o.port)
        interceptors = [BearerTokenInterceptor(o.auth_tokens)] if o.auth_tokens else []
        interceptors.append(UndecodableRequests(self._undecodable))  # after auth: a stranger learns nothing
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", o.max_message_bytes),
            ("grpc.max_send_message_length", o.max_message_bytes),
            ("grpc.so_reuseport", 0),  # else a second server binds this port too and takes half the calls
        ])
        address = _address(o.host, o.port)
        try:
            if o.tls_cert_chain is not None:
                creds = grpc.ssl_server_credentials([(o.tls_private_key, o.tls_cert_chain)])
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:  # taken since check_port_free, or refused for a reason gRPC does not tell
            raise OSError(f"cannot listen on {address}") from None
        if not port:
            raise OSError(f"cannot listen on {address}")
        if o.metrics_port is not None:
            try:
                self.metrics_port, self._stop_metrics = self.metrics.serve_http(o.metrics_host, o.metrics_port)
            except OSError as e:
                raise OSError(f"cannot serve metrics on {_address(o.metrics_host, o.metrics_port)}: "
                              f"{e.strerror or e}") from None
        if o.http_port is not None:
            from jinfer.serve.http_app import HttpFront

            self.http = HttpFront(o.host, o.http_port, o.model_name, self.metrics, o.auth_tokens, o.max_message_bytes)
            self.http_port = self.http.bind()
        self.server, self.port = server, port
        return port

    async def start(self, engine: Engine, warmup=None) -> int:
        """Serves `engine` (NOT_SERVING until the warm-up ends); returns the bound port. `warmup` replaces
        `engine.warmup` on the engine thread (tests gate it to watch the health service)."""
        await self.bind()
        o = self.options
        self.engine = engine
        loop = asyncio.get_running_loop()
        self.health = health_aio.HealthServicer()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, NOT_SERVING)
        self.engine_thread = EngineThread(engine, loop, self.metrics, warmup,
                                          on_ready=self._on_ready, on_failure=self._on_failure)
        self.servicer = GenerationServicer(self.engine_thread, self.metrics, o.model_name, o.max_message_bytes)
        pb_grpc.add_GenerationServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        await self.server.start()
        if self.http is not None:
            self.http.start(self.engine_thread)
        self.engine_thread.start()
        return self.port

    def _undecodable(self, method: str, why: str) -> None:
        if self.servicer is not None:  # calls are served only once start() has made it
            self.servicer.record_undecodable(method, why)

    def _on_ready(self) -> None:
        self._spawn(self._set_health(SERVING))
        self.ready.set()

    def _on_failure(self, error: BaseException) -> None:
        self._spawn(self.health.enter_graceful_shutdown())
        self.failed.set()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def wait_ready(self) -> bool:
        """True once warmed up; False if the engine failed first."""
        ready = asyncio.ensure_future(self.ready.wait())
        failed = asyncio.ensure_future(self.failed.wait())
        await asyncio.wait([ready, failed], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        failed.cancel()
        return self.ready.is_set() and not self.failed.is_set()

    async def drain(self, grace: float | None = None) -> None:
        grace = self.options.drain_grace_s if grace is None else grace
        self.servicer.accepting = False
        if self.http is not None:
            self.http.accepting = False
        await self.health.enter_graceful_shutdown()
        http_in_flight = self.http.in_flight if self.http is not None else 0
        log.info('{"event": "draining", "in_flight": %d, "http_in_flight": %d, "grace_s": %s}',
                 self.servicer.in_flight, http_in_flight, grace)

        async def grpc_calls():
            if self.servicer.in_flight:
                try:
                    await asyncio.wait_for(self.servicer.wait_idle(), grace)
                except asyncio.TimeoutError:
                    log.warning('{"event": "grace_expired", "cancelled": %d}', self.servicer.in_flight)

        await asyncio.gather(grpc_calls(), *([self.http.drain(grace)] if self.http is not None else []))
        await self.server.stop(grace=0.1)  # the Generate calls are done (or out of time); others are quick
        self.servicer.close()
        await asyncio.to_thread(self.engine_thread.stop, 30.0)
        if self._stop_metrics is not None:
            self._stop_metrics()
        log.info('{"event": "stopped"}')
