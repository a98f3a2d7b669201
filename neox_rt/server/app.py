"""The OpenAI-compatible HTTP layer: a FastAPI app with one handler per endpoint over an ``AsyncEngine``.

Validation happens here, once: the request's types (pydantic, ``protocol``), then what needs the model (the
model name, token ids in the vocabulary, prompt + max_tokens within the context); every refusal is OpenAI's error
body with its status (400, 404, 429 with Retry-After), and the engine trusts what reaches it. A request with ``n``
choices (or several prompts) runs as that many engine requests ``{id}-{index}``, seeds ``seed + index``. A client
that disconnects, streaming or not, has its engine requests aborted, which frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from neox_rt.engine.async_engine import AsyncEngine, EngineDead
from neox_rt.server import protocol as p
from neox_rt.server.metrics import RequestTimer, ServerMetrics

log = logging.getLogger("neox_rt.server")

DEFAULT_CHAT_TEMPLATE = ("{% for message in messages %}{{ message.role | capitalize }}: {{ message.content }}\n"
                         "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
"""The default chat template (base models have none): ``Role: content`` lines, then ``Assistant:``. It is rendered
in plain Python, so jinja2 is needed only for a ``--chat-template FILE``."""


class APIError(Exception):
    """A refusal answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return p.ErrorResponse(error=p.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                  code=self.code)).model_dump()


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# -- chat templates -------------------------------------------------------------------------------------------
def default_chat_template(messages: list[dict], add_generation_prompt: bool = True) -> str:
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + ("Assistant:" if add_generation_prompt else "")


def load_chat_template(source: str, eos_token: str = "<|endoftext|>") -> Callable[[list[dict]], str]:
    """A Jinja chat template (HF style: ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``)."""
    try:
        import jinja2
    except ImportError:
        raise ValueError("--chat-template needs jinja2 (pip install jinja2)") from None
    try:
        template = jinja2.Environment(keep_trailing_newline=True).from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None

    def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=eos_token, eos_token=eos_token)
    return render


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    params_cls: type
    """The engine's ``SamplingRequest``."""
    chat_template: Callable[[list[dict]], str]
    metrics: ServerMetrics
    model_root: str | None = None


# -- building engine requests ---------------------------------------------------------------------------------
def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def _check_ids(state: ServerState, ids: list[int], param: str) -> None:
    vocab = state.engine.tokenizer.vocab_size
    bad = [t for t in ids if t < 0 or t >= vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is out of range: ids must lie in 0..{vocab - 1}", param=param)


def _check_length(state: ServerState, num_prompt: int, max_tokens: int, param: str) -> None:
    limit = state.engine.max_model_len
    if limit is not None and num_prompt + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} in the "
                            f"completion). Please reduce the prompt or max_tokens.", param=param,
                       code="context_length_exceeded")


def _encode(state: ServerState, text: str, param: str) -> list[int]:
    try:
        return state.engine.tokenizer.encode(text)
    except Exception as e:  # noqa: BLE001 - e.g. a lone surrogate (valid JSON, not valid text): the client's 400
        raise APIError(400, f"{param} cannot be tokenized: {type(e).__name__}: {e}", param=param) from None


def _prompts(state: ServerState, prompt) -> list[tuple[list[int], str | None]]:
    """The completions API's four prompt forms as (token ids, text if given as text) pairs."""
    tok = state.engine.tokenizer
    if isinstance(prompt, str):
        items = [prompt]
    elif not prompt:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    elif isinstance(prompt[0], int):
        items = [list(prompt)]
    else:
        items = list(prompt)
    out = []
    for item in items:
        if isinstance(item, str):
            ids = _encode(state, item, "prompt")
            text = item
        else:
            ids = list(item)
            _check_ids(state, ids, "prompt")
            text = None
        out.append((ids or [tok.eos_id], text))  # an empty prompt starts from <|endoftext|>, as generate does
    return out


def _params(state: ServerState, req, max_tokens: int, index: int, logprobs: int | None,
            prompt_logprobs: int | None = None):
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    stop_ids = tuple(req.stop_token_ids or ())
    if stop_ids:
        _check_ids(state, list(stop_ids), "stop_token_ids")
    return state.params_cls(
        max_tokens=max_tokens,
        temperature=float(1.0 if req.temperature is None else req.temperature),
        top_p=float(1.0 if req.top_p is None else req.top_p), top_k=top_k,
        seed=None if req.seed is None else req.seed + index, stop=req.stops(), stop_token_ids=stop_ids,
        ignore_eos=req.ignore_eos, logprobs=logprobs,
        **({"prompt_logprobs": prompt_logprobs} if prompt_logprobs is not None else {}))


async def _add_all(state: ServerState, rid: str, jobs: list[tuple[list[int], object]], queue: asyncio.Queue
                   ) -> list[str]:
    """Add each (prompt ids, params) as engine request ``{rid}-{index}``; on a refusal, take the added ones back
    and raise the HTTP answer (RequestRejected 400, QueueFull 429 with Retry-After)."""
    added = []
    try:
        for index, (ids, params) in enumerate(jobs):
            request_id = f"{rid}-{index}"
            await state.engine.add(request_id, ids, params, queue=queue, key=index)
            added.append(request_id)
    except BaseException as e:
        for request_id in added:
            state.engine.abort(request_id)
        raise _engine_error(e) from None if isinstance(e, Exception) else e
    return added


def _engine_error(e: BaseException) -> BaseException:
    name = type(e).__name__
    if name == "QueueFull":
        return APIError(429, f"The server is busy: {e}. Retry later.", type="rate_limit_exceeded",
                        code="rate_limit_exceeded", headers={"Retry-After": "1"})
    if name == "RequestRejected":
        return APIError(400, str(e))
    if isinstance(e, EngineDead):
        return APIError(503, str(e), type="server_error")
    if isinstance(e, APIError):
        return e
    log.error("engine refused a request: %r", e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


async def _results(state: ServerState, queue: asyncio.Queue, request_ids: list[str], arrival: float):
    """Yield (index, RequestOutput) as the engine produces them until every request finished; aborts the
    unfinished ones if the consumer stops early (a client that went away) and raises an engine failure."""
    pending = set(range(len(request_ids)))
    timers = [RequestTimer(state.metrics, arrival) for _ in request_ids]
    try:
        while pending:
            index, out = await queue.get()
            if isinstance(out, BaseException):
                pending.discard(index)
                raise APIError(500, f"internal error: {out}", type="server_error")
            now = time.monotonic()
            timers[index].tokens_out(len(out.new_token_ids), now)
            if out.finished:
                pending.discard(index)
                timers[index].done(out.finish_reason, now)
            yield index, out
    finally:
        for index in pending:
            state.engine.abort(request_ids[index])
            state.metrics.aborted.inc()


# -- logprobs -------------------------------------------------------------------------------------------------
def _token_text(state: ServerState, token_id: int) -> str:
    return state.engine.tokenizer.decode([token_id])


def _completion_logprobs(state: ServerState, out, offset: int) -> p.CompletionLogprobs | None:
    if out.logprobs is None:
        return None
    lp = p.CompletionLogprobs()
    tops = out.top_logprobs or [None] * len(out.new_token_ids)
    for token_id, logprob, top in zip(out.new_token_ids, out.logprobs, tops):
        token = _token_text(state, token_id)
        lp.tokens.append(token)
        lp.token_logprobs.append(logprob)
        lp.text_offset.append(offset)
        offset += len(token)
        top_text = {_token_text(state, t): v for t, v in (top or {}).items()}
        top_text.setdefault(token, logprob)
        lp.top_logprobs.append(top_text)
    return lp


def _prompt_logprobs(state: ServerState, ids: list[int], out) -> p.CompletionLogprobs:
    """``echo`` with ``logprobs``: the prompt's tokens with their logprobs (None for the first, which nothing
    predicts), from a request's first output; text offsets from 0."""
    lp = p.CompletionLogprobs()
    offset = 0
    tops = out.prompt_top_logprobs or [None] * len(ids)
    for token_id, logprob, top in zip(ids, out.prompt_logprobs, tops):
        token = _token_text(state, token_id)
        lp.tokens.append(token)
        lp.token_logprobs.append(logprob)
        lp.text_offset.append(offset)
        offset += len(token)
        if logprob is None:
            lp.top_logprobs.append(None)
        else:
            top_text = {_token_text(state, t): v for t, v in (top or {}).items()}
            top_text.setdefault(token, logprob)
            lp.top_logprobs.append(top_text)
    return lp


def _joined(a: p.CompletionLogprobs | None, b: p.CompletionLogprobs | None) -> p.CompletionLogprobs | None:
    if a is None or b is None:
        return a or b
    return p.CompletionLogprobs(text_offset=a.text_offset + b.text_offset, token_logprobs=a.token_logprobs +
                                b.token_logprobs, tokens=a.tokens + b.tokens, top_logprobs=a.top_logprobs +
                                b.top_logprobs)


def _chat_logprobs(state: ServerState, out, want_top: int) -> p.ChatLogprobs | None:
    if out.logprobs is None:
        return None
    content = []
    tops = out.top_logprobs or [None] * len(out.new_token_ids)
    for token_id, logprob, top in zip(out.new_token_ids, out.logprobs, tops):
        token = _token_text(state, token_id)
        items = sorted((top or {}).items(), key=lambda kv: -kv[1])[:want_top]
        content.append(p.ChatTokenLogprob(
            token=token, logprob=logprob, bytes=list(token.encode()),
            top_logprobs=[p.TopLogprob(token=_token_text(state, t), logprob=v,
                                       bytes=list(_token_text(state, t).encode())) for t, v in items]))
    return p.ChatLogprobs(content=content)


def _sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


class _TokenChunks:
    """The server-sent event of a streamed token without logprobs, the bulk of a stream, formatted from a prefix made
    once per response: the same bytes as the pydantic chunk's ``_sse`` (tested), at a fraction of the event loop's
    time, which the engine thread's next step waits for (the GIL)."""

    def __init__(self, rid: str, created: int, model: str, obj: str):
        self.head = "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model},
                                          separators=(",", ":"))[:-1] + ',"choices":[{"index":'

    def completion(self, index: int, text: str, finish_reason: str | None) -> str:
        return (f'{self.head}{index},"text":{json.dumps(text)},"logprobs":null,'
                f'"finish_reason":{json.dumps(finish_reason)}}}]}}\n\n')

    def chat(self, index: int, content: str | None, finish_reason: str | None) -> str:
        delta = "{}" if content is None else f'{{"content":{json.dumps(content)}}}'
        return (f'{self.head}{index},"delta":{delta},"logprobs":null,'
                f'"finish_reason":{json.dumps(finish_reason)}}}]}}\n\n')


def _usage(prompt_tokens: int, completion_tokens: int) -> p.UsageInfo:
    return p.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens)


async def _with_cancellation(request: Request, work):
    """Run a non-streamed handler's work, cancelling it if the client disconnects first (its finally blocks
    abort the engine requests)."""
    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watch.cancel()
        raise
    if task in done:
        watch.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone; nobody reads the answer
        pass
    return Response(status_code=499)


# -- the app --------------------------------------------------------------------------------------------------
def build_app(engine: AsyncEngine, params_cls: type, model_name: str = "neox_rt",
              chat_template: Callable[[list[dict]], str] | None = None, model_root: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; ``params_cls`` is the engine's ``SamplingRequest``."""
    metrics = ServerMetrics(engine.stats, model_name)
    state = ServerState(engine, model_name, params_cls, chat_template or default_chat_template, metrics,
                        model_root)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="neox_rt", lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        metrics.error(e.status)
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            err = APIError(400, f"Invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
        else:
            loc = [str(x) for x in first.get("loc", ()) if x != "body"]
            # a union's branches add their type names to the location: keep the field path
            loc = [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float", "bool")]
            param = ".".join(loc) or None
            msg = first.get("msg", "invalid request")
            if first.get("type") == "missing":
                msg = "field required"
            err = APIError(400, f"{param or 'body'}: {msg}" + (f" (got {first.get('input')!r:.60})"
                                                                if first.get("type") != "missing" else ""),
                           param=param)
        metrics.error(400)
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception):
        log.exception("unexpected error")
        metrics.error(500)
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @app.get("/health")
    async def health():
        if not engine.is_alive():
            raise APIError(503, "the engine is not running", type="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models():
        return p.ModelList(data=[p.ModelCard(id=model_name, root=model_root or model_name,
                                             max_model_len=engine.max_model_len)])

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest, raw: Request):
        return await _completions(state, req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: p.ChatCompletionRequest, raw: Request):
        return await _chat(state, req, raw)

    return app


async def _completions(state: ServerState, req: p.CompletionRequest, raw: Request):
    arrival = time.monotonic()
    _check_model(state, req.model)
    if req.max_tokens is None:  # an explicit null: OpenAI's default
        req.max_tokens = 16
    prompts = _prompts(state, req.prompt)
    for ids, _ in prompts:
        _check_length(state, len(ids), req.max_tokens, "prompt")
    jobs, prompt_texts = [], []
    echo_lp = req.echo and req.logprobs is not None  # the prompt's logprobs too
    for ids, text in prompts:
        echo_text = (text if text is not None else state.engine.tokenizer.decode(ids)) if req.echo else ""
        for _ in range(req.n):
            jobs.append((ids, _params(state, req, req.max_tokens, len(jobs), req.logprobs,
                                      req.logprobs if echo_lp else None)))
            prompt_texts.append(echo_text)
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    queue: asyncio.Queue = asyncio.Queue()
    request_ids = await _add_all(state, rid, jobs, queue)
    num_prompt_tokens = sum(len(ids) for ids, _ in prompts)

    if req.stream:
        fast = _TokenChunks(rid, created, state.model_name, "text_completion")

        async def events():
            completion_tokens = 0
            offsets = [len(t) for t in prompt_texts]
            try:
                if req.echo and not echo_lp:
                    for index, text in enumerate(prompt_texts):
                        chunk = p.CompletionResponse(id=rid, created=created, model=state.model_name,
                                                     choices=[p.CompletionChoice(index=index, text=text)])
                        yield _sse(chunk.model_dump(exclude={"usage"}))
                async for index, out in _results(state, queue, request_ids, arrival):
                    if echo_lp and out.prompt_logprobs is not None:  # the prompt's chunk, with its logprobs
                        choice = p.CompletionChoice(index=index, text=prompt_texts[index],
                                                    logprobs=_prompt_logprobs(state, jobs[index][0], out))
                        chunk = p.CompletionResponse(id=rid, created=created, model=state.model_name,
                                                     choices=[choice])
                        yield _sse(chunk.model_dump(exclude={"usage"}))
                    if not out.new_text and not out.new_token_ids and not out.finished:
                        continue
                    completion_tokens += len(out.new_token_ids)
                    reason = out.finish_reason if out.finished else None
                    if req.logprobs is None:
                        event = fast.completion(index, out.new_text, reason)
                    else:
                        choice = p.CompletionChoice(index=index, text=out.new_text,
                                                    logprobs=_completion_logprobs(state, out, offsets[index]),
                                                    finish_reason=reason)
                        event = _sse(p.CompletionResponse(id=rid, created=created, model=state.model_name,
                                                          choices=[choice]).model_dump(exclude={"usage"}))
                    offsets[index] += len(out.new_text)
                    yield event
                if req.include_usage():
                    chunk = p.CompletionResponse(id=rid, created=created, model=state.model_name, choices=[],
                                                 usage=_usage(num_prompt_tokens, completion_tokens))
                    yield _sse(chunk.model_dump())
            except APIError as e:
                yield _sse(e.body())
            yield _sse("[DONE]")
        return StreamingResponse(events(), media_type="text/event-stream")

    async def collect():
        finals, pieces = {}, {i: _Pieces() for i in range(len(jobs))}
        async for index, out in _results(state, queue, request_ids, arrival):
            pieces[index].add(out)
            if out.finished:
                finals[index] = out
        choices = []
        for index in range(len(jobs)):
            out = finals[index]
            logprobs = (_completion_logprobs(state, pieces[index], len(prompt_texts[index]))
                        if req.logprobs is not None else None)
            if echo_lp:
                logprobs = _joined(_prompt_logprobs(state, jobs[index][0], pieces[index].prompt), logprobs)
            choices.append(p.CompletionChoice(index=index, text=prompt_texts[index] + out.text, logprobs=logprobs,
                                              finish_reason=out.finish_reason))
        completion_tokens = sum(len(finals[i].token_ids) for i in range(len(jobs)))
        return p.CompletionResponse(id=rid, created=created, model=state.model_name, choices=choices,
                                    usage=_usage(num_prompt_tokens, completion_tokens))
    return await _with_cancellation(raw, collect())


class _Pieces:
    """A request's outputs accumulated in the shape of one output (outputs carry only their new tokens'
    logprobs), for a non-streamed answer's logprobs."""

    def __init__(self):
        self.new_token_ids, self.logprobs, self.top_logprobs = [], None, []
        self.prompt = None  # the output that carried the prompt logprobs (echo with logprobs)

    def add(self, out) -> None:
        if getattr(out, "prompt_logprobs", None) is not None:
            self.prompt = out
        self.new_token_ids.extend(out.new_token_ids)
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(out.logprobs)
            self.top_logprobs.extend(out.top_logprobs or [{} for _ in out.logprobs])


async def _chat(state: ServerState, req: p.ChatCompletionRequest, raw: Request):
    arrival = time.monotonic()
    _check_model(state, req.model)
    try:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    try:
        prompt_text = state.chat_template(messages)
    except Exception as e:  # noqa: BLE001 - a template that fails on these messages is the client's 400
        raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
    ids = _encode(state, prompt_text, "messages") or [state.engine.tokenizer.eos_id]
    limit = state.engine.max_model_len
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:
        max_tokens = (limit - len(ids)) if limit is not None else 256
        if max_tokens < 1:
            _check_length(state, len(ids), 1, "messages")
    _check_length(state, len(ids), max_tokens, "messages")
    want_top = req.top_logprobs or 0
    logprobs = want_top if req.logprobs else None
    jobs = [(ids, _params(state, req, max_tokens, i, logprobs)) for i in range(req.n)]
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    queue: asyncio.Queue = asyncio.Queue()
    request_ids = await _add_all(state, rid, jobs, queue)

    def chunk(choices, usage=None) -> dict:
        body = p.ChatCompletionChunk(id=rid, created=created, model=state.model_name, choices=choices,
                                     usage=usage).model_dump()
        for c in body["choices"]:
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
        if usage is None:
            body.pop("usage")
        return body

    if req.stream:
        fast = _TokenChunks(rid, created, state.model_name, "chat.completion.chunk")

        async def events():
            completion_tokens = 0
            try:
                for index in range(req.n):
                    yield _sse(chunk([p.ChatChunkChoice(index=index, delta=p.DeltaMessage(role="assistant",
                                                                                             content=""))]))
                async for index, out in _results(state, queue, request_ids, arrival):
                    if not out.new_text and not out.new_token_ids and not out.finished:
                        continue
                    completion_tokens += len(out.new_token_ids)
                    if not req.logprobs:
                        yield fast.chat(index, out.new_text or None, out.finish_reason if out.finished else None)
                        continue
                    yield _sse(chunk([p.ChatChunkChoice(
                        index=index, delta=p.DeltaMessage(content=out.new_text or None),
                        logprobs=_chat_logprobs(state, out, want_top) if req.logprobs else None,
                        finish_reason=out.finish_reason if out.finished else None)]))
                if req.include_usage():
                    yield _sse(chunk([], usage=_usage(len(ids), completion_tokens)))
            except APIError as e:
                yield _sse(e.body())
            yield _sse("[DONE]")
        return StreamingResponse(events(), media_type="text/event-stream")

    async def collect():
        finals, pieces = {}, {i: _Pieces() for i in range(req.n)}
        async for index, out in _results(state, queue, request_ids, arrival):
            pieces[index].add(out)
            if out.finished:
                finals[index] = out
        choices = []
        for index in range(req.n):
            out = finals[index]
            logprob = _chat_logprobs(state, pieces[index], want_top) if req.logprobs else None
            choices.append(p.ChatChoice(index=index, message=p.ChatMessageOut(content=out.text), logprobs=logprob,
                                        finish_reason=out.finish_reason))
        return p.ChatCompletionResponse(id=rid, created=created, model=state.model_name, choices=choices,
                                        usage=_usage(len(ids), sum(len(finals[i].token_ids) for i in finals)))
    return await _with_cancellation(raw, collect())
