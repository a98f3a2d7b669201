"""``AsyncEngine``: the (not thread-safe) ``LLMEngine`` driven by one background thread, behind an asyncio interface.

One thread owns the engine: it drains a thread-safe inbox of adds and aborts, runs ``step()`` while anything is
unfinished, hands each ``RequestOutput`` to its request's ``asyncio.Queue`` on the caller's event loop, and sleeps on
a condition when there is nothing to do (no busy loop). ``add`` waits for the engine's answer, so that
``RequestRejected`` (400) and ``QueueFull`` (429) reach the caller before any output; ``generate`` yields the outputs
of one request and aborts it when the consumer stops early (a client that went away). An exception inside the
engine fails the requests it concerns (the add's, or every request in flight for a failed step, each aborted in the
engine so that its blocks are freed) and the loop keeps serving. ``shutdown`` stops the thread and fails what is
left.
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

    def put(self, item) -> None:  # called from the engine thread
        if self.key is not None:
            item = (self.key, item)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class AsyncEngine:
    """Runs ``engine.step()`` in one background thread; ``add`` / ``generate`` / ``abort`` from asyncio code.

    ``stats()`` is a snapshot of ``engine.stats()`` taken by the engine thread after every step and every inbox
    drain (the engine itself must not be called from another thread)."""

    def __init__(self, engine, *, name: str = "neox_rt-engine"):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._cond = threading.Condition()
        self._inbox: deque[tuple] = deque()  # ("add", rid, ids, params, stream, future) | ("abort", rid)
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._stopping = False
        self._stats = dict(engine.stats())
        self.steps = 0
        self.step_errors = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- the asyncio side -------------------------------------------------------------------------------------
    async def add(self, request_id: str, prompt_ids: list[int], params, *, queue: asyncio.Queue | None = None,
                  key=None) -> "_Stream":
        """Queue one request; returns once the engine accepted it (raises what ``add_request`` raised). Its
        outputs go to ``queue`` (a new one if None), as ``(key, output)`` pairs when ``key`` is not None."""
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, queue, key)
        accepted = loop.create_future()
        self._post(("add", request_id, list(prompt_ids), params, stream, accepted))
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
        self._post(("abort", request_id))

    def stats(self) -> dict:
        return dict(self._stats)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop (the step in progress finishes), fail the requests left, join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _post(self, item: tuple) -> None:
        with self._cond:
            if self._stopping:
                if item[0] == "add":
                    _resolve(item[5], EngineDead("the engine is shutting down"))
                return
            self._inbox.append(item)
            self._cond.notify()

    # -- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self._stopping and not self._busy():
                        self._cond.wait()
                    if self._stopping:
                        break
                    items = list(self._inbox)
                    self._inbox.clear()
                for item in items:
                    self._handle(item)
                if self._busy():
                    self._step()
                elif self._streams:  # the engine holds none of them: never leave a caller waiting
                    for rid in list(self._streams):
                        self._streams.pop(rid).put(EngineStepError(f"the engine dropped request {rid}"))
                self._snapshot()
        finally:
            self._fail_all(EngineDead("the engine stopped"))
            close = getattr(self.engine, "close", None)
            if close is not None:
                try:
                    close()  # on this thread, which stepped the engine (tensor parallelism: releases the workers)
                except Exception:  # noqa: BLE001 - shutting down: log, do not raise from the thread
                    log.exception("engine close failed")

    def _busy(self) -> bool:
        return self.engine.has_unfinished()

    def _handle(self, item: tuple) -> None:
        if item[0] == "add":
            _, rid, ids, params, stream, accepted = item
            if rid in self._streams:
                _resolve(accepted, ValueError(f"request id {rid!r} is already running"))
                return
            try:
                self.engine.add_request(rid, ids, params)
            except Exception as e:  # noqa: BLE001 - RequestRejected / QueueFull / anything: this request only
                _resolve(accepted, e)
                return
            self._streams[rid] = stream
            _resolve(accepted, None)
        else:
            rid = item[1]
            self._streams.pop(rid, None)
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - an abort must never take the loop down
                log.exception("abort of %s failed", rid)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving the next ones
            self.step_errors += 1
            log.exception("engine step failed; aborting the %d requests in flight", len(self._streams))
            for rid in list(self._streams):
                try:  # aborted (blocks freed) before its caller hears of the failure
                    self.engine.abort(rid)
                except Exception:  # noqa: BLE001
                    pass
                self._streams.pop(rid).put(EngineStepError(f"the engine failed on this request's batch: {e}"))
            return
        self.steps += 1
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _snapshot(self) -> None:
        try:
            self._stats = dict(self.engine.stats())
        except Exception:  # noqa: BLE001
            log.exception("engine stats failed")

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            items = list(self._inbox)
            self._inbox.clear()
        for item in items:
            if item[0] == "add":
                _resolve(item[5], error)
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    """Settle an asyncio future from the engine thread (a no-op if it was cancelled or its loop closed)."""
    def settle():
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(None)
    try:
        future.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:
        pass

