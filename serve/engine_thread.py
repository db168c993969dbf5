"""The engine thread: the one thread that owns the Engine, so the asyncio server never waits on the device.

Requests enter through `submit` and leave through `cancel`, both callable from the event loop: they only
put a command on a thread-safe inbox. The thread drains the inbox between engine steps (so a cancelled
request's slot and pages are back in the pool before the next step), runs `engine.step()` while there is
work, and hands each step's results back to the event loop in one `loop.call_soon_threadsafe` call, as
immutable `Chunk`s (the engine keeps mutating its own RequestOutput objects, so those never cross over).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

from jinfer.engine.engine import Engine, StepEvent
from jinfer.engine.outputs import Logprob, TokenLogprobs, top_logprobs
from jinfer.engine.scheduler import QueueFull
from jinfer.inputs import CheckedRequest

log = logging.getLogger("jinfer.serve")


class EngineUnavailable(RuntimeError):
    """The engine is not taking requests: still warming up, stopped, or failed."""


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Chunk:
    """What one engine step produced for one request (or why the request was refused)."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token, when the request asked for logprobs
    # On the first token's chunk, when the request asked for prompt logprobs: per prompt token but the first,
    # (its id, its Logprob, the position's top n as (id, logprob), most likely first).
    prompt_logprobs: tuple[tuple[int, Logprob, tuple[tuple[int, float], ...]], ...] = ()
    finish_reason: str | None = None  # set on the last chunk
    usage: Usage | None = None  # set on the last chunk
    time_to_first_token: float | None = None  # seconds from arrival at the server; on the last chunk
    error: Exception | None = None  # a refused request's only chunk: QueueFull, ValueError, EngineUnavailable


def merge_chunks(chunks: list[Chunk]) -> Chunk:
    """Chunks that queued up while the client was being written to, as one (fewer, larger messages)."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    return dataclasses.replace(
        last, token_ids=tuple(t for c in chunks for t in c.token_ids), text="".join(c.text for c in chunks),
        logprobs=tuple(lp for c in chunks for lp in c.logprobs),
        prompt_logprobs=tuple(p for c in chunks for p in c.prompt_logprobs))


@dataclasses.dataclass(frozen=True)
class Submission:
    request_id: str  # the engine's id, unique within this server
    request: CheckedRequest  # checked at the edge (jinfer.inputs): the engine trusts it
    deliver: Callable[[Chunk], None]  # called on the event loop with each chunk
    received: float  # time.perf_counter() when the server received the call
    same_prompt_as: str | None = None  # another completion of this prompt (n > 1): share its prompt's KV pages


class EngineThread:
    """`warmup` (default `engine.warmup`) runs on the thread before the first request is taken;
    `on_ready` and `on_failure(exc)` are called on the event loop. `metrics` is a serve.metrics.ServeMetrics
    or None."""

    def __init__(self, engine: Engine, loop, metrics=None, warmup: Callable[[], None] | None = None,
                 on_ready: Callable[[], None] | None = None,
                 on_failure: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.max_waiting = engine.config.max_waiting
        self._loop = loop
        self._metrics = metrics
        self._warmup = warmup or engine.warmup
        self._on_ready = on_ready
        self._on_failure = on_failure
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[str, Submission] = {}  # engine thread only
        self._lock = threading.Lock()
        self._unadmitted = 0  # submissions still in the inbox (guarded by _lock)
        self._num_waiting = 0  # the engine's waiting queue after the last step (guarded by _lock)
        self.ready = False
        self.failure: BaseException | None = None
        self.num_steps = 0
        self._thread = threading.Thread(target=self._run, name="jinfer-engine", daemon=True)

    # ---- called from the event loop ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, sub: Submission) -> None:
        """Queues a request, or raises at once: QueueFull when the waiting queue is full,
        EngineUnavailable before warm-up ends or after a failure."""
        if self.failure is not None:
            raise EngineUnavailable(f"the engine failed: {self.failure!r}")
        if not self.ready:
            raise EngineUnavailable("the engine is warming up; wait for the health service to report SERVING")
        with self._lock:
            # The engine re-checks on admission; this refuses a flood without a round trip to the thread.
            if self._num_waiting + self._unadmitted >= self.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests)")
            self._unadmitted += 1
        self._inbox.put(("add", sub))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    def inspect(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Runs fn(engine) on the engine thread between steps (for tests and statistics)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, fut))
        return fut

    def stop(self, timeout: float | None = None) -> None:
        """Cancels what is left and ends the thread (after its current step)."""
        self._inbox.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._warmup()
        except BaseException as e:  # reported to the server, which stops serving
            self._fail(e)
            return
        self.ready = True
        self._publish()  # the pool's size, before any request: the metric must not read 0 pages until then
        self._post(lambda: self._on_ready and self._on_ready())
        while True:
            if not self._drain(block=not self.engine.has_work):
                break
            if self.engine.has_work:
                try:
                    events = self.engine.step()
                except BaseException as e:
                    self._fail(e)
                    return
                self.num_steps += 1
                self._dispatch(events)
            self._publish()
        for rid in list(self._active):
            self.engine.cancel(rid)
        self._active.clear()

    def _drain(self, block: bool) -> bool:
        """Handles every queued command; waits for one first if `block`. False once told to stop."""
        while True:
            try:
                cmd = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            kind = cmd[0]
            if kind == "add":
                self._admit(cmd[1])
            elif kind == "cancel":
                if self._active.pop(cmd[1], None) is not None:
                    self.engine.cancel(cmd[1])
            elif kind == "call":
                fn, fut = cmd[1], cmd[2]
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as e:  # handed to the caller
                    fut.set_exception(e)
            elif kind == "stop":
                return False

    def _admit(self, sub: Submission) -> None:
        try:
            self.engine.add_request(sub.request, request_id=sub.request_id, same_prompt_as=sub.same_prompt_as)
        except Exception as e:  # QueueFull, ValueError (bad input), or a bug: the caller hears
            # Bound now: the callback runs later, on the event loop, when `e` is no longer defined.
            self._post(lambda err=e: sub.deliver(Chunk(error=err)))
        else:
            self._active[sub.request_id] = sub
        finally:
            with self._lock:
                self._unadmitted -= 1
                self._num_waiting = self.engine.load().waiting

    def _dispatch(self, events: list[StepEvent]) -> None:
        batch = []
        new_tokens = 0
        for ev in events:
            sub = self._active.get(ev.request_id)
            if sub is None:
                continue  # cancelled while its token was in flight
            out = ev.output
            n = len(ev.new_token_ids)
            new_tokens += n
            chunk = Chunk(tuple(ev.new_token_ids), ev.text_delta, tuple(out.logprobs[-n:]) if out.logprobs else ())
            if out.prompt_logprobs is not None and len(out.token_ids) == n:  # the request's first tokens
                k = sub.request.sampling.prompt_logprobs
                chunk = dataclasses.replace(chunk, prompt_logprobs=tuple(
                    (tok, d[tok], tuple(top_logprobs(d, k)))
                    for tok, d in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])))
            if out.finish_reason is not None:
                del self._active[ev.request_id]
                m = out.metrics
                ttft = m.first_token_time - sub.received if m and m.first_token_time is not None else None
                chunk = dataclasses.replace(
                    chunk, finish_reason=out.finish_reason, time_to_first_token=ttft,
                    usage=Usage(len(out.prompt_token_ids), len(out.token_ids), out.num_cached_tokens))
                if self._metrics is not None:
                    self._metrics.observe_latencies(ttft, m.inter_token_latencies if m else [])
                    if m:
                        self._metrics.observe_speculation(m.spec_draft_tokens, m.spec_accepted_tokens,
                                                          m.spec_verify_steps)
            batch.append((sub.deliver, chunk))
        if self._metrics is not None:
            self._metrics.add_generated_tokens(new_tokens)
        if batch:
            self._post(lambda: [deliver(chunk) for deliver, chunk in batch])

    def _publish(self) -> None:
        load = self.engine.load()  # an Engine or a DataParallelEngine: the sum over its replicas
        with self._lock:
            self._num_waiting = load.waiting
            queued = self._num_waiting + self._unadmitted
        if self._metrics is not None:
            self._metrics.set_engine_state(
                waiting=queued, running=load.running, pages_used=load.pages_used, pages_cached=load.pages_cached,
                pages_total=load.pages_total, prefix_hit_rate=load.prefix_hit_rate, now=time.perf_counter())

    def _fail(self, e: BaseException) -> None:
        log.exception("the engine thread failed", exc_info=e)
        self.failure = e
        err = EngineUnavailable(f"the engine failed: {e!r}")
        for sub in self._active.values():
            self._post(lambda sub=sub: sub.deliver(Chunk(error=err)))
            try:
                self.engine.cancel(sub.request_id)  # best effort: give the pages back if the engine still can
            except Exception:
                pass
        self._active.clear()
        # Submissions that were still in the inbox get the same answer.
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                self._post(lambda sub=cmd[1]: sub.deliver(Chunk(error=err)))
            elif cmd[0] == "call":
                cmd[2].set_exception(err)
        self._post(lambda: self._on_failure and self._on_failure(e))

    def _post(self, fn: Callable[[], object]) -> None:
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:
            pass  # the event loop is closed: the server is gone, nobody is listening
