"""A stand-in for ``neox_rt.engine.llm_engine`` with the same interface (``SamplingRequest``, ``RequestOutput``,
``LLMEngine``) for the server's tests: each request's whole generation comes from the offline ``neox.generate`` at
its first step, then one token per step is handed out, with the real engine's bookkeeping of blocks, running and
waiting requests, ``max_queue`` and ``max_num_seqs``. ``python -m neox_rt.serve --engine fake_engine`` (tests/ on
PYTHONPATH) serves it."""
from __future__ import annotations

import time

from neox_rt.engine.llm_engine import RequestOutput, SamplingRequest  # noqa: F401  (the same interface)
from neox_rt.engine.scheduler import QueueFull, RequestRejected


class _Req:
    def __init__(self, rid, ids, params):
        self.rid, self.ids, self.params = rid, list(ids), params
        self.result = None
        self.sent = 0
        self.text = ""


class LLMEngine:
    STEP_SECONDS = 0.01  # a CPU model's step takes time; so does the stand-in's

    def __init__(self, neox, *, max_num_seqs=64, max_model_len=None, num_blocks=None, kv_cache_memory=None,
                 block_size=16, max_num_batched_tokens=2048, max_queue=None):
        self.neox = neox
        self.tokenizer = neox.tokenizer
        self.max_model_len = max_model_len or neox.config.max_position_embeddings
        self.block_size = block_size
        self.num_blocks = num_blocks or 4096
        self.max_num_seqs, self.max_queue = max_num_seqs, max_queue
        self.waiting: list[_Req] = []
        self.running: dict[str, _Req] = {}
        self.prompt_tokens = self.generation_tokens = 0

    def add_request(self, request_id, prompt_token_ids, params):
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise RequestRejected(f"request {request_id}: too long")
        if self.max_queue is not None and len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue})")
        self.waiting.append(_Req(request_id, prompt_token_ids, params))

    def abort(self, request_id):
        before = len(self.waiting)
        self.waiting = [r for r in self.waiting if r.rid != request_id]
        return self.running.pop(request_id, None) is not None or len(self.waiting) < before

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    def _blocks(self, r):
        return -(-(len(r.ids) + r.sent) // self.block_size)

    def stats(self):
        used = sum(self._blocks(r) for r in self.running.values())
        return dict(num_running=len(self.running), num_waiting=len(self.waiting), num_blocks_used=used,
                    num_blocks_free=self.num_blocks - used, num_blocks_total=self.num_blocks, num_preemptions=0,
                    prompt_tokens_total=self.prompt_tokens, generation_tokens_total=self.generation_tokens)

    def step(self):
        time.sleep(self.STEP_SECONDS)
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting.pop(0)
            p = r.params
            r.result = self.neox.generate(r.ids, max_new_tokens=p.max_tokens, temperature=p.temperature,
                                          top_k=p.top_k, top_p=p.top_p if p.top_p < 1 else 0.0, stop=p.stop,
                                          seed=p.seed, return_logprobs=p.logprobs is not None)
            self.running[r.rid] = r
            self.prompt_tokens += len(r.ids)
        outputs = []
        for rid, r in list(self.running.items()):
            res = r.result
            r.sent += 1
            ids = res.token_ids[:r.sent]
            finished = r.sent >= len(res.token_ids)
            text = res.text if finished else self.tokenizer.decode(ids)[:len(res.text)]
            new = ids[-1:] if ids and r.sent <= len(res.token_ids) else []
            lps = [res.logprobs[r.sent - 1]] if (r.params.logprobs is not None and new) else None
            tops = [{new[0]: lps[0]}] if lps else None
            self.generation_tokens += len(new)
            reason = None
            if finished:
                reason = "length" if res.finish_reason == "length" else "stop"
                del self.running[rid]
            outputs.append(RequestOutput(rid, text[len(r.text):], new, text, list(ids), lps, tops, finished, reason,
                                         len(r.ids)))
            r.text = text
        return outputs
