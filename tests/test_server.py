"""The OpenAI-compatible server (#23), end to end on CPU: ``python -m neox_rt.serve`` in a subprocess on a free
loopback port with the embedded default model, driven by the official ``openai`` client and by httpx.

The server runs the real ``neox_rt.engine.llm_engine``; ``NEOX_RT_TEST_ENGINE=fake_engine`` runs the same tests on
``tests/fake_engine.py`` instead (the offline ``neox.generate`` handed out one token per step behind the engine's
interface), which separates an HTTP-layer failure from an engine one."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
ENGINE = os.environ.get("NEOX_RT_TEST_ENGINE", "neox_rt.engine.llm_engine")
MODEL = "neox_rt-default"
PROMPTS = [f"def {name}(" for name in ("fib", "add", "main", "parse", "load", "save", "run", "get")] + \
          ["import os\n", "class Config:\n", "# Copyright", "for i in range(", "if __name__ == ", "return self.",
           "x = [", "with open("]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str, engine: str = ENGINE, launch: list[str] | None = None):
        """``launch``: the command that runs a module (default this Python's ``-m``; torchrun for --tp)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, REPO, os.environ.get("PYTHONPATH", "")]))
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"neox_rt_serve_{self.port}.log"), "w+")
        self.proc = subprocess.Popen(
            [*(launch or [sys.executable, "-m"]), "neox_rt.serve", "--port", str(self.port), "--engine", engine,
             "--log-level", "warning", *flags], stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not come up in 120 s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120, **kw)

    def async_client(self) -> "openai.AsyncOpenAI":
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"neox_rt_(\w+)\{[^}]*\} ([0-9.e+-]+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def neox():
    from neox_rt.default_model import load_default
    return load_default(notice=False)


def offline(neox, prompts, max_tokens, **kw):
    return neox.generate(list(prompts), max_new_tokens=max_tokens, temperature=0.0, **kw)


def post(server, path, body, **kw):
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + path, json=body, timeout=60, **kw)
    return httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60,
                      **kw)


# -- the endpoints --------------------------------------------------------------------------------------------
def test_models_health_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    m = server.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "kv_blocks_used", "kv_blocks_free",
                 "prompt_tokens_total", "generation_tokens_total"):
        assert name in m, name
    text = httpx.get(server.url + "/metrics").text
    assert "neox_rt_time_to_first_token_seconds_bucket" in text
    assert "neox_rt_time_per_output_token_seconds_bucket" in text


def test_completion_greedy_equals_offline(server, neox):
    want = offline(neox, PROMPTS[:1], 20)[0]
    r = server.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(neox.tokenizer.encode(PROMPTS[0]))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_stream_with_usage(server, neox):
    want = offline(neox, PROMPTS[1:2], 24)[0]
    stream = server.client().completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == want.text
    assert chunks[-2].choices[0].finish_reason is not None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    # the raw stream ends with [DONE]; no usage chunk unless asked
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": PROMPTS[1], "max_tokens": 4, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(line[6:]) for line in lines[:-1])


def test_completion_token_id_prompts_and_lists(server, neox):
    ids = [neox.tokenizer.encode(p) for p in PROMPTS[2:4]]
    want = offline(neox, ids, 8)
    r = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [w.text for w in want]
    assert r.usage.prompt_tokens == sum(map(len, ids))
    r = server.client().completions.create(model=MODEL, prompt=PROMPTS[2:4], max_tokens=8, temperature=0)
    assert [c.text for c in r.choices] == [w.text for w in want]
    r = server.client().completions.create(model=MODEL, prompt=ids[0], max_tokens=8, temperature=0)
    assert r.choices[0].text == want[0].text


def test_echo(server, neox):
    want = offline(neox, PROMPTS[4:5], 6)[0]
    r = server.client().completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=6, temperature=0, echo=True)
    assert r.choices[0].text == PROMPTS[4] + want.text


def test_echo_with_logprobs(server, neox):
    """echo + logprobs (lm-eval's loglikelihood request): the prompt's tokens come back with their logprobs (None for
    the first) before the completion's, streamed or not, equal to score()."""
    prompt = PROMPTS[4]
    ids, scored = neox.score(prompt)
    r = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                           logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 2 and "".join(lp.tokens[:len(ids)]) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(scored, abs=1e-4)
    assert lp.text_offset[:len(ids)] == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    assert lp.text_offset[len(ids)] == len(prompt)
    assert all(len(t) >= 1 for t in lp.top_logprobs[1:])
    s = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                           logprobs=1, stream=True)
    tokens, values, text = [], [], ""
    for chunk in s:
        for ch in chunk.choices:
            text += ch.text
            if ch.logprobs is not None:
                tokens += ch.logprobs.tokens
                values += ch.logprobs.token_logprobs
    assert text == r.choices[0].text and tokens == lp.tokens and values == pytest.approx(lp.token_logprobs)


def test_n_and_seed(server):
    c = server.client()
    kw = dict(model=MODEL, prompt=PROMPTS[5], max_tokens=12, temperature=1.0, n=3, seed=7)
    a = c.completions.create(**kw)
    b = c.completions.create(**kw)
    assert sorted(ch.index for ch in a.choices) == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # seeds seed+i: reproducible
    assert len({ch.text for ch in a.choices}) > 1  # and different per choice
    assert a.usage.completion_tokens > 0
    s = c.completions.create(**kw, stream=True)
    texts = ["", "", ""]
    for chunk in s:
        for ch in chunk.choices:
            texts[ch.index] += ch.text
    assert texts == [ch.text for ch in a.choices]


def test_stop_strings(server, neox):
    want = offline(neox, PROMPTS[6:7], 24)[0].text
    stop = want[len(want) // 2: len(want) // 2 + 2]
    assert stop and stop in want
    cut = want[:want.index(stop)]
    c = server.client()
    r = c.completions.create(model=MODEL, prompt=PROMPTS[6], max_tokens=24, temperature=0, stop=[stop, "\x00"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    s = c.completions.create(model=MODEL, prompt=PROMPTS[6], max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in s) == cut


def test_logprobs(server, neox):
    r = server.client().completions.create(model=MODEL, prompt=PROMPTS[7], max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))
    assert lp.text_offset == sorted(lp.text_offset)
    ch = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, temperature=0, logprobs=True, top_logprobs=1)
    assert len(ch.choices[0].logprobs.content) == ch.usage.completion_tokens


def test_chat(server, neox):
    from neox_rt.server.app import default_chat_template
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    prompt = default_chat_template(messages)
    assert prompt == "System: You write Python.\nUser: Sort a list.\nAssistant:"
    want = offline(neox, [prompt], 16)[0]
    c = server.client()
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(neox.tokenizer.encode(prompt))
    s = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
                                  stream_options={"include_usage": True})
    chunks = list(s)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # n > 1 with a seed: reproducible, streamed or not
    kw = dict(model=MODEL, messages=messages, max_tokens=8, temperature=1.0, n=2, seed=3)
    a = c.chat.completions.create(**kw)
    texts = ["", ""]
    for ch in c.chat.completions.create(**kw, stream=True):
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [choice.message.content for choice in a.choices]


def test_32_concurrent_streams_equal_offline_greedy(server, neox):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(32)]
    max_tokens = 16
    want = [r.text for r in offline(neox, prompts, max_tokens)]

    async def one(client, prompt):
        text = ""
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True)
        async for chunk in stream:
            text += chunk.choices[0].text
        return text

    async def main():
        client = server.async_client()
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), 240)
        finally:
            await client.close()

    assert asyncio.run(main()) == want


# -- bad requests ---------------------------------------------------------------------------------------------
LONG = "x " * 5000
BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "a", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "a", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, -3]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 16}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 10**6}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "nope"}, 404, "model"),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/completions", b'{"prompt": "\\ud800 lone surrogate"}', 400, "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/v1/completions", {"prompt": "a", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_request_answered_and_server_still_serves(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    ok = post(server, "/v1/completions", {"prompt": "def f(", "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_null_fields_take_defaults(server):
    r = post(server, "/v1/completions", {"prompt": "def f(", "max_tokens": None, "temperature": None, "top_p": None,
                                         "seed": None, "stop": None, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16  # max_tokens null: 16


def test_openai_client_sees_errors(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="a", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="a")


# -- cancellation and back-pressure ---------------------------------------------------------------------------
def wait_idle(server, seconds=30) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["kv_blocks_used"] == 0 and m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0:
            break
        time.sleep(0.1)
    return m


def test_disconnect_mid_stream_frees_blocks(server):
    aborted = wait_idle(server).get("request_aborted_total", 0)
    body = {"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: {"):
                got += 1
                if got == 3:
                    break
        during = server.metrics()
        assert during["num_requests_running"] >= 1 and during["kv_blocks_used"] >= 1
    # the client is gone: the request is aborted (not run to its end) and its blocks return
    m = wait_idle(server)
    assert m["kv_blocks_used"] == 0 and m["num_requests_running"] == 0, m
    assert m["request_aborted_total"] == aborted + 1
    assert post(server, "/v1/completions", {"prompt": "a", "max_tokens": 2}).status_code == 200


def test_disconnect_non_streamed_frees_blocks(server):
    aborted = wait_idle(server).get("request_aborted_total", 0)
    body = {"prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
    m = wait_idle(server)
    assert m["kv_blocks_used"] == 0 and m["num_requests_running"] == 0, m
    assert m["request_aborted_total"] == aborted + 1


def test_full_queue_gives_429_with_retry_after():
    s = Server("--max-queue", "1", "--max-num-seqs", "1")
    try:
        body = {"prompt": PROMPTS[2], "max_tokens": 64, "temperature": 0, "ignore_eos": True}

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(s.url + "/v1/completions", json=body) for _ in range(6)))

        answers = asyncio.run(main())
        codes = sorted(r.status_code for r in answers)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        for r in answers:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            async def burst():
                c = s.async_client()
                try:
                    await asyncio.gather(*(c.completions.create(model=MODEL, prompt=body["prompt"], max_tokens=64,
                                                                extra_body={"ignore_eos": True}) for _ in range(6)))
                finally:
                    await c.close()
            asyncio.run(burst())
        # the queue drains and the server admits again: the burst's cancelled requests leave the queue (a request
        # still queued when the running one ends may be scheduled a moment later, so 429 may come first: retried;
        # a slot that never came back would keep answering 429 until the deadline)
        deadline = time.monotonic() + 60
        while True:
            code = post(s, "/v1/completions", {"prompt": "a", "max_tokens": 2}).status_code
            if code != 429 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert code == 200, code
    finally:
        s.stop()
    # SIGTERM: uvicorn shuts down gracefully (the engine thread joined) and re-raises the signal; not killed (-9)
    assert s.proc.returncode in (0, -15), s.proc.returncode


def test_chat_template_file():
    from neox_rt.server.app import load_chat_template
    render = load_chat_template("{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
                                "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert render([{"role": "user", "content": "hi"}]) == "<user>hi<|endoftext|><assistant>"
    with pytest.raises(ValueError, match="chat template"):
        load_chat_template("{% for %}")


def test_cli_errors_are_one_line():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, REPO]))
    r = subprocess.run([sys.executable, "-m", "neox_rt.serve", "--kv-cache-memory", "lots"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 2 and "not a size" in r.stderr
    r = subprocess.run([sys.executable, "-m", "neox_rt.serve", "--chat-template", "/nonexistent/t.jinja"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "chat template" in r.stderr
    # errors of the engine process (the model is loaded there) reach the parent as the same one line
    r = subprocess.run([sys.executable, "-m", "neox_rt.serve", "--model", "/nonexistent/model"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and "/nonexistent/model" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr


def test_parse_bytes():
    from neox_rt.serve import parse_bytes
    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1000") == 1000
    assert parse_bytes("1.5GB") == 1_500_000_000


def test_parse_kv_memory_sizes_and_fractions():
    import argparse
    from neox_rt.serve import parse_kv_memory
    assert parse_kv_memory("0.9") == 0.9 and parse_kv_memory(".5") == 0.5 and parse_kv_memory("90%") == 0.9
    assert parse_kv_memory("1.0") == 1.0 and parse_kv_memory("100%") == 1.0
    assert parse_kv_memory("2GiB") == 2 << 30 and parse_kv_memory("1000") == 1000
    for bad in ("0.0", "150%", "lots", "0%"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_kv_memory(bad)


# -- the async driver, in process -----------------------------------------------------------------------------
class StubEngine:
    """Counts to ``max_tokens`` one token per step; a prompt [666] makes the step raise; QueueFull past 2 waiting."""

    def __init__(self):
        from neox_rt.engine.llm_engine import RequestOutput
        self.Out = RequestOutput
        self.tokenizer = None
        self.max_model_len = 64
        self.live: dict[str, list] = {}
        self.steps = 0
        self.aborted: list[str] = []

    def add_request(self, rid, ids, params):
        from neox_rt.engine.scheduler import QueueFull, RequestRejected
        if not ids:
            raise RequestRejected("empty")
        if len(self.live) >= 2:
            raise QueueFull("full")
        self.live[rid] = [ids, params.max_tokens, 0]

    def abort(self, rid):
        self.aborted.append(rid)
        return self.live.pop(rid, None) is not None

    def has_unfinished(self):
        return bool(self.live)

    def stats(self):
        return dict(num_running=len(self.live), num_waiting=0, num_blocks_used=len(self.live), num_blocks_free=0,
                    num_blocks_total=0, num_preemptions=0, prompt_tokens_total=0, generation_tokens_total=0)

    def step(self):
        self.steps += 1
        time.sleep(0.002)
        if any(ids == [666] for ids, _, _ in self.live.values()):
            raise RuntimeError("boom")
        outs = []
        for rid, entry in list(self.live.items()):
            entry[2] += 1
            done = entry[2] >= entry[1]
            if done:
                del self.live[rid]
            outs.append(self.Out(rid, "x", [entry[2]], "x" * entry[2], list(range(1, entry[2] + 1)), None, None,
                                 done, "length" if done else None, len(entry[0])))
        return outs


def test_async_engine_serves_fails_one_batch_sleeps_and_shuts_down():
    from neox_rt.engine.async_engine import AsyncEngine, EngineDead, EngineStepError
    from neox_rt.engine.llm_engine import SamplingRequest
    from neox_rt.engine.scheduler import QueueFull, RequestRejected
    stub = StubEngine()
    engine = AsyncEngine(stub)

    async def collect(rid, ids, n):
        return [o async for o in engine.generate(rid, ids, SamplingRequest(max_tokens=n))]

    async def main():
        a, b = await asyncio.gather(collect("a", [1], 5), collect("b", [2], 3))
        assert [o.token_ids[-1] for o in a] == [1, 2, 3, 4, 5] and a[-1].finished and len(b) == 3
        with pytest.raises(RequestRejected):
            await collect("c", [], 3)
        with pytest.raises(EngineStepError):  # the engine raised in this request's step: it fails alone
            await collect("bad", [666], 3)
        assert "bad" in stub.aborted
        assert len(await collect("d", [3], 2)) == 2  # and the next request is served
        # a consumer that stops early aborts its request
        gen = engine.generate("e", [4], SamplingRequest(max_tokens=50))
        await gen.__anext__()
        await gen.aclose()
        for _ in range(100):
            if "e" in stub.aborted and not stub.live:
                break
            await asyncio.sleep(0.01)
        assert "e" in stub.aborted and not stub.live
        # QueueFull reaches the caller before any output
        s1 = await engine.add("f", [1], SamplingRequest(max_tokens=40))
        s2 = await engine.add("g", [1], SamplingRequest(max_tokens=40))
        with pytest.raises(QueueFull):
            await engine.add("h", [1], SamplingRequest(max_tokens=40))
        engine.abort("f")
        engine.abort("g")
        del s1, s2

    asyncio.run(main())
    time.sleep(0.1)
    steps = stub.steps
    time.sleep(0.3)
    assert stub.steps == steps  # idle: no steps, no busy loop
    assert engine.stats()["num_running"] == 0
    engine.shutdown()
    assert not engine.is_alive()

    async def after():
        with pytest.raises(EngineDead):
            await collect("z", [1], 1)
    asyncio.run(after())


def stub_engine_factory(max_model_len=64):
    """The engine process's factory for the ProcessEngine tests (module level: the spawned child imports it)."""
    stub = StubEngine()
    stub.max_model_len = max_model_len
    return stub, {"path": None, "pid": os.getpid()}


def test_process_engine_serves_fails_one_batch_and_shuts_down():
    """The same contract as the thread's, with the engine in a child process: outputs in order, a refusal and a
    failed step reach only their request, an early stop aborts, a full queue raises QueueFull before any output,
    the last output carries the whole text while the others cross without it, and shutdown ends the child."""
    from neox_rt.engine.async_engine import EngineDead, EngineStepError
    from neox_rt.engine.llm_engine import SamplingRequest
    from neox_rt.engine.process_engine import ProcessEngine
    from neox_rt.engine.scheduler import QueueFull, RequestRejected
    engine = ProcessEngine(stub_engine_factory, 48)
    assert engine.max_model_len == 48 and engine.info["pid"] == engine.pid != os.getpid()

    async def collect(rid, ids, n):
        return [o async for o in engine.generate(rid, ids, SamplingRequest(max_tokens=n))]

    async def main():
        a, b = await asyncio.gather(collect("a", [1], 5), collect("b", [2], 3))
        assert [o.new_token_ids for o in a] == [[1], [2], [3], [4], [5]] and a[-1].finished and len(b) == 3
        assert a[-1].token_ids == [1, 2, 3, 4, 5] and a[-1].text == "xxxxx" and a[0].text is None
        with pytest.raises(RequestRejected):
            await collect("c", [], 3)
        with pytest.raises(EngineStepError):  # the engine raised in this request's step: it fails alone
            await collect("bad", [666], 3)
        assert len(await collect("d", [3], 2)) == 2  # and the next request is served
        gen = engine.generate("e", [4], SamplingRequest(max_tokens=50))  # a consumer that stops early aborts
        await gen.__anext__()
        await gen.aclose()
        for _ in range(200):
            if engine.stats()["num_running"] == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats()["num_running"] == 0
        s1 = await engine.add("f", [1], SamplingRequest(max_tokens=400))
        s2 = await engine.add("g", [1], SamplingRequest(max_tokens=400))
        with pytest.raises(QueueFull):
            await engine.add("h", [1], SamplingRequest(max_tokens=40))
        with pytest.raises(ValueError, match="already running"):
            await engine.add("f", [1], SamplingRequest(max_tokens=40))
        engine.abort("f")
        engine.abort("g")
        del s1, s2

    asyncio.run(main())
    engine.shutdown()
    assert not engine.is_alive() and engine._proc.exitcode == 0

    async def after():
        with pytest.raises(EngineDead):
            await collect("z", [1], 1)
    asyncio.run(after())


def test_process_engine_that_dies_fails_its_requests():
    from neox_rt.engine.async_engine import EngineDead
    from neox_rt.engine.llm_engine import SamplingRequest
    from neox_rt.engine.process_engine import ProcessEngine
    engine = ProcessEngine(stub_engine_factory)

    async def main():
        gen = engine.generate("a", [1], SamplingRequest(max_tokens=10_000))
        await gen.__anext__()
        os.kill(engine.pid, 9)
        with pytest.raises(EngineDead):
            async for _ in gen:
                pass
        with pytest.raises(EngineDead):
            await engine.add("b", [1], SamplingRequest(max_tokens=1))

    asyncio.run(main())
    assert not engine.is_alive()
    engine.shutdown()


def _engine_child(server: "Server") -> int | None:
    """The pid of the server's engine process (its child running multiprocessing's spawn_main), None if none."""
    for tid in os.listdir(f"/proc/{server.proc.pid}/task"):
        with open(f"/proc/{server.proc.pid}/task/{tid}/children") as f:
            for pid in f.read().split():
                with open(f"/proc/{pid}/cmdline", "rb") as c:
                    if b"spawn_main" in c.read():
                        return int(pid)
    return None


def test_server_whose_engine_process_dies_answers_503():
    """The engine process killed under a stream: the stream ends, /health and new requests answer 503 (no hang),
    and the server still stops cleanly."""
    s = Server()
    try:
        client = s.client()
        stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1000, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        pid = _engine_child(s)
        assert pid is not None
        os.kill(pid, 9)
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        assert httpx.get(s.url + "/health", timeout=10).status_code == 503
        r = post(s, "/v1/completions", {"prompt": "a", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    finally:
        s.stop()
    assert s.proc.returncode in (0, -15), s.proc.returncode


def test_engine_in_a_thread_serves_the_same(neox):
    """``--no-engine-process``: the engine in a thread of the server's process gives the same greedy streams."""
    s = Server("--no-engine-process")
    try:
        assert greedy_streams(s, PROMPTS[:4], 12) == [w.text for w in offline(neox, PROMPTS[:4], 12)]
        assert _engine_child(s) is None
    finally:
        s.stop()


def greedy_streams(server: "Server", prompts: list[str], max_tokens: int) -> list[str]:
    """The texts of concurrent greedy streamed completions, one per prompt."""
    async def stream(client, prompt):
        text = ""
        async for chunk in await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                           temperature=0, stream=True):
            text += "".join(c.text for c in chunk.choices)
        return text

    async def all_streams():
        client = server.async_client()
        return await asyncio.gather(*(stream(client, p) for p in prompts))
    return asyncio.run(all_streams())


# -- tensor parallelism -------------------------------------------------------------------------------------
def test_tensor_parallel_server_under_torchrun(neox):
    """``torchrun --nproc-per-node 2 -m neox_rt.serve --tp 2`` on CPU (gloo): rank 0 serves and schedules, both ranks
    run every step on their shard; 8 concurrent greedy streams equal offline generate, a seeded request is
    reproducible, and SIGTERM stops the launch (the worker is released, nothing hangs)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
              str(free_port()), "-m"]
    server = Server("--tp", "2", "--device", "cpu", engine="neox_rt.engine.llm_engine", launch=launch)
    try:
        assert greedy_streams(server, PROMPTS[:8], 12) == [w.text for w in offline(neox, PROMPTS[:8], 12)]
        kw = dict(model=MODEL, prompt=PROMPTS[9], max_tokens=10, temperature=0.9, seed=11)
        assert server.client().completions.create(**kw).choices[0].text == \
            server.client().completions.create(**kw).choices[0].text
        assert "tensor parallel over 2 ranks" in server.output()
    finally:
        server.proc.terminate()
        server.proc.wait(60)  # raises TimeoutExpired if a rank hangs
        server.log.close()


@pytest.mark.parametrize("text,reason", [("hi", None), ('a"b\\\n\u00e9 \U0001F642\x00', "stop"), ("", "length")])
def test_fast_token_chunks_are_the_pydantic_bytes(text, reason):
    """A streamed token's event, formatted from a prefix (the event loop's fast path), is byte for byte the chunk
    the protocol models give, for completions and chat."""
    from neox_rt.server import app as server_app
    from neox_rt.server import protocol as p
    fast = server_app._TokenChunks("cmpl-1", 1700000000, "m\u00e9del \"x\"", "text_completion")
    ref = p.CompletionResponse(id="cmpl-1", created=1700000000, model="m\u00e9del \"x\"",
                               choices=[p.CompletionChoice(index=3, text=text, finish_reason=reason)])
    assert fast.completion(3, text, reason) == server_app._sse(ref.model_dump(exclude={"usage"}))
    chat = server_app._TokenChunks("chatcmpl-1", 5, "m", "chat.completion.chunk")
    content = text or None
    body = p.ChatCompletionChunk(id="chatcmpl-1", created=5, model="m", choices=[
        p.ChatChunkChoice(index=1, delta=p.DeltaMessage(content=content), finish_reason=reason)]).model_dump()
    body["choices"][0]["delta"] = {k: v for k, v in body["choices"][0]["delta"].items() if v is not None}
    body.pop("usage")
    assert chat.chat(1, content, reason) == server_app._sse(body)
