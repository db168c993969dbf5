"""BackgroundServer: a ServeApp on an event loop of its own thread, driven from blocking code.

For tests, benchmarks and notebooks that want a real gRPC server inside the current process:

    with BackgroundServer(engine, ServeOptions(port=0)) as srv:
        client = JinferClient(f"127.0.0.1:{srv.port}")
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from jinfer.engine.engine import Engine
from jinfer.serve.app import ServeApp, ServeOptions


class BackgroundServer:
    def __init__(self, engine: Engine, options: ServeOptions, warmup=None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jinfer-serve-loop", daemon=True)
        self._thread.start()
        self._drain: concurrent.futures.Future | None = None
        try:
            self.app: ServeApp = self.call(self._make, options)
            self.port: int = self.call(self.app.start, engine, warmup)
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _make(options) -> ServeApp:
        return ServeApp(options)  # built on the loop: its asyncio.Events belong there

    def call(self, fn, *args, timeout: float | None = 120.0):
        """Runs the coroutine function fn(*args) on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(fn(*args), self._loop).result(timeout)

    def wait_ready(self, timeout: float = 120.0) -> bool:
        return self.call(self.app.wait_ready, timeout=timeout)

    def start_drain(self, grace: float = 0.0) -> concurrent.futures.Future:
        """Starts draining (see ServeApp.drain) without waiting for it; later calls return the same future."""
        if self._drain is None:
            self._drain = asyncio.run_coroutine_threadsafe(self.app.drain(grace), self._loop)
        return self._drain

    def drain(self, grace: float = 0.0, timeout: float = 120.0) -> None:
        """Drains the server and ends the loop thread."""
        try:
            self.start_drain(grace).result(timeout)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.drain()
