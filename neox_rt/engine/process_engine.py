"""``ProcessEngine``: the ``AsyncEngine``'s interface with the ``LLMEngine`` in a process of its own.

In one process the engine's thread and the HTTP event loop share one interpreter lock: every streamed token's
work in the loop (its event, the socket write) delays the engine's next step, and the engine's host work (scheduling,
launches, detokenization) delays the loop (the HTTP layer cost 1.4-1.7 ms a token on an H100 host with the engine in
a thread; ``bench/NOTES.md`` sessions 15 and 16 say what is known of why). Here the engine
runs in a child process (``spawn``: it builds its own model from ``factory(*args)``, which returns the engine and a
picklable dict of extras) under an ``EngineLoop``, as vLLM runs its engine core apart from its API server:

- parent -> child, one pipe: ``("add", rid, prompt_ids, params)``, ``("abort", rid)``, ``("stop",)``, written by a
  sender thread (a burst of adds never blocks the event loop on a full pipe); a reader thread in the child feeds
  them to the loop, which steps the engine on the child's main thread.
- child -> parent, one pipe: ``("ready", info)`` or ``("fatal", message)`` at start, then one message per pass of
  the loop: the adds' answers, the step's outputs, the requests that failed, and the engine's stats. The parent's
  event loop reads them itself (``add_reader`` on the pipe, attached by the first add: one event loop at a time)
  and puts each output into its request's queue, so no other thread of the server's process takes the GIL per
  step.

An output crosses the pipe without the request's whole text and token ids while it is unfinished (``text`` and
``token_ids`` are None on it: the HTTP layer reads them only from a finished output), so a step's message does not
grow with the length of the outputs. A child that dies fails every request with ``EngineDead`` (the server's
``/health`` then answers 503); the child ignores SIGINT (a Ctrl-C reaches the whole process group: the parent shuts
it down) and exits when the parent's pipe closes.
"""
from __future__ import annotations

import logging
import multiprocessing
import pickle
import queue
import signal
import threading

from neox_rt.engine.async_engine import EngineClient, EngineDead, EngineLoop, _resolve, _settle
from neox_rt.engine.llm_engine import RequestOutput
from neox_rt.errors import NeoxRtError

log = logging.getLogger("neox_rt.engine")


class ProcessEngine(EngineClient):
    """Starts the engine process and waits until it is ready (its model loaded); raises ``NeoxRtError`` with the
    child's one-line error if it could not start. ``info`` is the dict the factory returned beside the engine."""

    def __init__(self, factory, *args, name: str = "neox_rt-engine", log_level: str | None = None):
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        cmd_recv, self._cmd = ctx.Pipe(duplex=False)
        self._events, events_send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child_main, args=(factory, args, cmd_recv, events_send, log_level),
                                 name=name, daemon=True)
        self._proc.start()
        cmd_recv.close()
        events_send.close()
        try:
            first = self._events.recv()
        except (EOFError, OSError):
            self._proc.join(10)
            raise NeoxRtError(f"the engine process exited while starting (exit status {self._proc.exitcode})") \
                from None
        if first[0] == "fatal":
            self._proc.join(10)
            raise NeoxRtError(first[1])
        ready = first[1]
        self.tokenizer = ready["tokenizer"]
        self.max_model_len = ready["max_model_len"]
        self.info: dict = ready["info"]
        self._stats: dict = ready["stats"]
        self._lock = threading.Lock()
        self._adds: dict[str, tuple] = {}  # rid -> (stream, future): waiting for the engine's answer
        self._streams: dict = {}  # rid -> stream: running
        self._stopping = False
        self._loop = None  # the event loop that reads the engine's messages (the adds' loop)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name=f"{name}-send", daemon=True)
        self._sender.start()

    @property
    def pid(self) -> int | None:
        """The engine process's id."""
        return self._proc.pid

    # -- the asyncio side -------------------------------------------------------------------------------------
    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self._adds.pop(request_id, None)
        if not self._stopping:
            self._outbox.put(("abort", request_id))

    def stats(self) -> dict:
        return dict(self._stats)

    def is_alive(self) -> bool:
        return not self._stopping and self._proc.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine process (the step in progress finishes), fail the requests left, join it (any
        thread)."""
        if not self._stopping:
            self._stopping = True
            self._outbox.put(("stop",))
            self._outbox.put(None)
        self._proc.join(timeout)
        if self._proc.is_alive():
            log.warning("the engine process did not stop in %.0f s: terminating it", timeout)
            self._proc.terminate()
            self._proc.join(5)
        self._fail_all(EngineDead("the engine stopped"))
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._detach, loop)
            except RuntimeError:  # closed meanwhile
                pass

    def _post_add(self, request_id, prompt_ids, params, stream, accepted) -> None:
        error = None
        with self._lock:
            if self._stopping or not self._proc.is_alive():
                error = EngineDead("the engine is not running")
            elif request_id in self._adds or request_id in self._streams:
                error = ValueError(f"request id {request_id!r} is already running")
            else:
                self._adds[request_id] = (stream, accepted)
        if error is not None:
            _resolve(accepted, error)
            return
        self._attach(stream.loop)
        self._outbox.put(("add", request_id, prompt_ids, params))

    # -- the engine's messages, read by the event loop itself (no thread of this process contends for the GIL) --
    def _attach(self, loop) -> None:
        """Read the engine's pipe on ``loop`` (the caller's, on its thread): one loop at a time, the latest to add."""
        if self._loop is loop:
            return
        old, self._loop = self._loop, loop
        if old is not None and not old.is_closed():
            try:
                old.call_soon_threadsafe(self._detach, old)
            except RuntimeError:
                pass
        loop.add_reader(self._events.fileno(), self._on_readable)

    def _detach(self, loop) -> None:
        try:
            loop.remove_reader(self._events.fileno())
        except (ValueError, OSError):  # the pipe is closed
            pass

    def _on_readable(self) -> None:
        try:
            while self._events.poll():
                events, stats = self._events.recv()
                if stats is not None:
                    self._stats = stats
                for event in events:
                    self._dispatch(event)
        except (EOFError, OSError):  # the child is gone
            self._engine_died()
        except Exception:  # noqa: BLE001 - a message that does not unpickle: the engine cannot be trusted any more
            log.exception("reading the engine process's messages failed")
            self._engine_died()

    def _engine_died(self) -> None:
        self._stopping = True
        if self._loop is not None:
            self._detach(self._loop)
        self._outbox.put(None)  # the sender stops too
        # the waits for the child off the event loop's thread
        threading.Thread(target=self._reap, name="neox_rt-engine-reap", daemon=True).start()

    def _reap(self) -> None:
        self._proc.join(0.5)  # its pipe closed: the child is exiting, or gone
        code = self._proc.exitcode
        self._fail_all(EngineDead("the engine stopped" + (f" (exit status {code})" if code else "")))
        self._proc.join(10)
        if self._proc.is_alive():  # a child that closed its pipe and hangs
            self._proc.terminate()

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            adds, streams = list(self._adds.values()), list(self._streams.values())
            self._adds.clear()
            self._streams.clear()
        for _, future in adds:
            _resolve(future, error)
        for stream in streams:
            stream.put(error)

    def _dispatch(self, event: tuple) -> None:  # on the loop's thread
        kind = event[0]
        if kind == "o":
            out = RequestOutput(*event[1])
            rid = out.request_id
            with self._lock:
                stream = self._streams.pop(rid, None) if out.finished else self._streams.get(rid)
            if stream is not None:  # None: aborted meanwhile
                stream.put_now(out)
        elif kind == "a":
            _, rid, error = event
            with self._lock:
                stream, future = self._adds.pop(rid, (None, None))
                if stream is not None and error is None:
                    self._streams[rid] = stream
            if future is not None:
                _settle(future, error)
        else:  # "f": the engine failed this request
            _, rid, error = event
            with self._lock:
                stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.put_now(error)

    # -- the sender thread ------------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            try:
                self._cmd.send(item)
            except (OSError, ValueError):  # the child is gone: the loop's reader fails what is left
                break
        try:
            self._cmd.close()
        except OSError:
            pass


# -- the child ------------------------------------------------------------------------------------------------
def _wire(out) -> tuple:
    """A ``RequestOutput`` as the tuple of its fields, without the whole text and token ids while unfinished."""
    return (out.request_id, out.new_text, out.new_token_ids, out.text if out.finished else None,
            out.token_ids if out.finished else None, out.logprobs, out.top_logprobs, out.finished, out.finish_reason,
            out.num_prompt_tokens, out.prompt_logprobs, out.prompt_top_logprobs)


def _portable(error: BaseException | None) -> BaseException | None:
    """The error itself if it survives pickling (RequestRejected, QueueFull, ...), else a RuntimeError naming it."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")


class _PipeSink:
    """The ``EngineLoop``'s sink in the child: events gathered during a pass and sent as one message (a request's
    handle is its id)."""

    def __init__(self, engine, conn):
        self.engine, self.conn = engine, conn
        self.events: list[tuple] = []

    def accepted(self, rid, error) -> None:
        self.events.append(("a", rid, _portable(error)))

    def output(self, rid, out) -> None:
        self.events.append(("o", _wire(out)))

    def failed(self, rid, error) -> None:
        self.events.append(("f", rid, _portable(error)))

    def flush(self, stats: dict | None = None) -> None:
        if self.events or stats is not None:
            events, self.events = self.events, []
            try:
                self.conn.send((events, stats))
            except (OSError, ValueError):  # the parent is gone; the command reader stops the loop
                pass

    def idle(self) -> None:
        try:
            stats = dict(self.engine.stats())
        except Exception:  # noqa: BLE001
            log.exception("engine stats failed")
            stats = None
        self.flush(stats)

    def stopped(self) -> None:
        self.flush()


def _read_commands(conn, loop: EngineLoop) -> None:
    try:
        while True:
            item = conn.recv()
            if item[0] == "add":
                _, rid, ids, params = item
                if not loop.post(("add", rid, ids, params, rid)):
                    return
            elif item[0] == "abort":
                loop.post(item)
            else:
                break
    except (EOFError, OSError):  # the parent went away
        pass
    loop.stop()


def _child_main(factory, args, cmd, events, log_level) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if log_level:
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        engine, info = factory(*args)
    except NeoxRtError as e:
        _send_quietly(events, ("fatal", str(e)))
        return
    except BaseException as e:  # noqa: BLE001 - a bug while starting: one line to the parent, the trace logged here
        log.exception("the engine failed to start")
        _send_quietly(events, ("fatal", f"the engine failed to start: {type(e).__name__}: {e}"))
        return
    _send_quietly(events, ("ready", {"tokenizer": engine.tokenizer, "max_model_len": engine.max_model_len,
                                     "stats": dict(engine.stats()), "info": info}))
    loop = EngineLoop(engine, _PipeSink(engine, events))
    threading.Thread(target=_read_commands, args=(cmd, loop), name="neox_rt-engine-commands", daemon=True).start()
    loop.run()


def _send_quietly(conn, message) -> None:
    try:
        conn.send(message)
    except (OSError, ValueError):
        pass
