"""``AsyncEngine``: the (not thread-safe) ``LLMEngine`` driven by one background thread, behind an asyncio interface.

Two halves, so that the engine can also run in a process of its own (:mod:`.process_engine`):
- ``EngineLoop``, the engine's side: one thread owns the engine; it drains a thread-safe inbox of adds and aborts,
  runs ``step()`` while anything is unfinished, hands every answer and output to a sink, and sleeps on a condition
  when there is nothing to do (no busy loop). An exception inside the engine fails the requests it concerns (the
  add's, or every request in flight for a failed step, each aborted in the engine so that its blocks are freed) and
  the loop keeps serving.
- ``EngineClient``, the asyncio side: ``add`` waits for the engine's answer, so that ``RequestRejected`` (400) and
  ``QueueFull`` (429) reach the caller before any output; ``generate`` yields the outputs of one request and aborts
  it when the consumer stops early (a client that went away); ``shutdown`` stops the engine and fails what is left.
``AsyncEngine`` is the two in one process: the loop in a background thread, its sink the requests' asyncio queues.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import AsyncIterator

log = logging.getLogger("neox_rt.engine")


class EngineDead(RuntimeError):
    """The engine loop has stopped (shutdown); no request can run."""


class EngineStepError(RuntimeError):
    """The engine raised while stepping a batch this request was in; the request was aborted."""


class _Stream:
    """One request's outputs, crossing from the engine thread to the event loop: each output (or the exception
    that failed the request) goes into ``queue``, as ``(key, item)`` when a key was given (several requests
    sharing one queue, e.g. the n choices of one HTTP request)."""

    __slots__ = ("loop", "queue", "key", "finished")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue | None, key):
        self.loop = loop
        self.queue: asyncio.Queue = queue if queue is not None else asyncio.Queue()
        self.key = key
        self.finished = False

    def put(self, item) -> None:  # called from another thread than the loop's
        if self.key is not None:
            item = (self.key, item)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def put_now(self, item) -> None:  # called on the loop's thread
        self.queue.put_nowait((self.key, item) if self.key is not None else item)


# -- the engine's side ----------------------------------------------------------------------------------------
class EngineLoop:
    """Steps an engine on the thread that calls ``run`` until ``stop``. Adds and aborts arrive by ``post`` from any
    thread: ``("add", rid, prompt_ids, params, handle)`` and ``("abort", rid)``. The sink hears, on the loop's
    thread: ``accepted(handle, error)`` once per add (error None, or what ``add_request`` raised: the request is
    not running), ``output(handle, out)`` for every ``RequestOutput`` of a running request (after its finished one
    the handle is forgotten), ``failed(handle, error)`` when the engine failed the request, ``flush()`` once the
    inbox's items were handled (before the step), ``idle()`` after each pass of the loop (a step or an inbox
    drained), and ``stopped()`` once at the end."""

    def __init__(self, engine, sink):
        self.engine = engine
        self.sink = sink
        self._cond = threading.Condition()
        self._inbox: deque[tuple] = deque()
        self._handles: dict[str, object] = {}  # the loop's thread only
        self._stopping = False
        self.steps = 0
        self.step_errors = 0

    def post(self, item: tuple) -> bool:
        """Queue an add or an abort; False (nothing queued) once the loop is stopping."""
        with self._cond:
            if self._stopping:
                return False
            self._inbox.append(item)
            self._cond.notify()
        return True

    def stop(self) -> None:
        """Make ``run`` return after the step in progress (the adds still queued are answered ``EngineDead``)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self._stopping and not self.engine.has_unfinished():
                        self._cond.wait()
                    if self._stopping:
                        break
                    items = list(self._inbox)
                    self._inbox.clear()
                for item in items:
                    self._handle(item)
                if items:
                    self.sink.flush()  # the adds' answers before the step, not after it
                if self.engine.has_unfinished():
                    self._step()
                elif self._handles:  # the engine holds none of them: never leave a caller waiting
                    for rid in list(self._handles):
                        self.sink.failed(self._handles.pop(rid), EngineStepError(f"the engine dropped request {rid}"))
                self.sink.idle()
        finally:
            self._fail_all(EngineDead("the engine stopped"))
            close = getattr(self.engine, "close", None)
            if close is not None:
                try:
                    close()  # on this thread, which stepped the engine (tensor parallelism: releases the workers)
                except Exception:  # noqa: BLE001 - shutting down: log, do not raise from the thread
                    log.exception("engine close failed")
            self.sink.stopped()

    def _handle(self, item: tuple) -> None:
        if item[0] == "add":
            _, rid, ids, params, handle = item
            if rid in self._handles:
                self.sink.accepted(handle, ValueError(f"request id {rid!r} is already running"))
                return
            try:
                self.engine.add_request(rid, ids, params)
            except Exception as e:  # noqa: BLE001 - RequestRejected / QueueFull / anything: this request only
                self.sink.accepted(handle, e)
                return
            self._handles[rid] = handle
            self.sink.accepted(handle, None)
        else:
            rid = item[1]
            self._handles.pop(rid, None)
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - an abort must never take the loop down
                log.exception("abort of %s failed", rid)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving the next ones
            self.step_errors += 1
            log.exception("engine step failed; aborting the %d requests in flight", len(self._handles))
            for rid in list(self._handles):
                try:  # aborted (blocks freed) before its caller hears of the failure
                    self.engine.abort(rid)
                except Exception:  # noqa: BLE001
                    pass
                self.sink.failed(self._handles.pop(rid),
                                 EngineStepError(f"the engine failed on this request's batch: {e}"))
            return
        self.steps += 1
        handles = self._handles
        for out in outputs:
            handle = handles.get(out.request_id)
            if handle is None:
                continue  # aborted meanwhile
            if out.finished:
                del handles[out.request_id]
            self.sink.output(handle, out)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            self._stopping = True
            items = list(self._inbox)
            self._inbox.clear()
        for item in items:
            if item[0] == "add":
                self.sink.accepted(item[4], error)
        for handle in self._handles.values():
            self.sink.failed(handle, error)
        self._handles.clear()


# -- the asyncio side -----------------------------------------------------------------------------------------
class EngineClient:
    """What the HTTP layer calls (``add``, ``stream_outputs``, ``generate``, ``abort``, ``stats``, ``is_alive``,
    ``shutdown``, ``tokenizer``, ``max_model_len``); subclasses carry the adds and aborts to the engine
    (``_post``) and put its answers into each add's future and stream."""

    tokenizer = None
    max_model_len: int = 0

    async def add(self, request_id: str, prompt_ids: list[int], params, *, queue: asyncio.Queue | None = None,
                  key=None) -> "_Stream":
        """Queue one request; returns once the engine accepted it (raises what ``add_request`` raised). Its
        outputs go to ``queue`` (a new one if None), as ``(key, output)`` pairs when ``key`` is not None."""
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, queue, key)
        accepted = loop.create_future()
        self._post_add(request_id, list(prompt_ids), params, stream, accepted)
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # the add may still land: take it back
            raise
        return stream

    async def stream_outputs(self, request_id: str, stream: "_Stream") -> AsyncIterator:
        """The outputs of an added request, up to its finished one; aborts it if the consumer stops early."""
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                if item.finished:
                    stream.finished = True
                yield item
                if stream.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(request_id)

    async def generate(self, request_id: str, prompt_ids: list[int], params) -> AsyncIterator:
        """Add one request and yield its ``RequestOutput`` objects (the last has ``finished`` set)."""
        stream = await self.add(request_id, prompt_ids, params)
        async for out in self.stream_outputs(request_id, stream):
            yield out

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, idempotent, a no-op once it finished); its blocks are freed."""
        raise NotImplementedError

    def stats(self) -> dict:
        raise NotImplementedError

    def is_alive(self) -> bool:
        raise NotImplementedError

    def shutdown(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def _post_add(self, request_id, prompt_ids, params, stream: _Stream, accepted: asyncio.Future) -> None:
        raise NotImplementedError


class AsyncEngine(EngineClient):
    """Runs ``engine.step()`` in one background thread (an ``EngineLoop``); ``add`` / ``generate`` / ``abort`` from
    asyncio code.

    ``stats()`` is a snapshot of ``engine.stats()`` taken by the engine thread after every step and every inbox
    drain (the engine itself must not be called from another thread)."""

    def __init__(self, engine, *, name: str = "neox_rt-engine"):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._stats = dict(engine.stats())
        self._loop = EngineLoop(engine, self)
        self._thread = threading.Thread(target=self._loop.run, name=name, daemon=True)
        self._thread.start()

    @property
    def steps(self) -> int:
        return self._loop.steps

    @property
    def step_errors(self) -> int:
        return self._loop.step_errors

    def abort(self, request_id: str) -> None:
        self._loop.post(("abort", request_id))

    def stats(self) -> dict:
        return dict(self._stats)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._loop.stopping

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop (the step in progress finishes), fail the requests left, join the thread."""
        self._loop.stop()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _post_add(self, request_id, prompt_ids, params, stream, accepted) -> None:
        if not self._loop.post(("add", request_id, prompt_ids, params, (stream, accepted))):
            _resolve(accepted, EngineDead("the engine is shutting down"))

    # -- the sink: called on the engine thread
    def accepted(self, handle, error) -> None:
        _resolve(handle[1], error)

    def output(self, handle, out) -> None:
        handle[0].put(out)

    def failed(self, handle, error) -> None:
        handle[0].put(error)

    def flush(self) -> None:
        pass

    def idle(self) -> None:
        try:
            self._stats = dict(self.engine.stats())
        except Exception:  # noqa: BLE001
            log.exception("engine stats failed")

    def stopped(self) -> None:
        pass


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    """Settle an asyncio future on its loop's thread (a no-op if it was cancelled)."""
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(None)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    """Settle an asyncio future from another thread (a no-op if it was cancelled or its loop closed)."""
    try:
        future.get_loop().call_soon_threadsafe(_settle, future, error)
    except RuntimeError:
        pass
