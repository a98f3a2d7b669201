"""The real ``LLMEngine`` (scheduler, block tables, sampling, detokenization) with its model's forward replaced by a
device step of ``NEOX_RT_STUB_STEP_MS`` milliseconds that starts at the runner's ``launch`` (or when the step
queued before it ends, as on a GPU's stream) and that ``collect`` waits for with the GIL released, as a GPU step
does for the host thread that waits on it (a CUDA synchronize), and logits that make greedy sampling pick a varied
stream of ordinary tokens.
``bench/http_overhead.py`` runs it in-process and behind ``python -m neox_rt.serve --engine stub_engine`` (bench/ on
PYTHONPATH): the host's cost of serving a token, with no GPU."""
from __future__ import annotations

import os
import time

import torch

from neox_rt.engine.llm_engine import LLMEngine as _Engine
from neox_rt.engine.llm_engine import RequestOutput, SamplingRequest  # noqa: F401  (the same interface)

STEP_MS = float(os.environ.get("NEOX_RT_STUB_STEP_MS", "3.5"))
LAUNCH_MS = float(os.environ.get("NEOX_RT_STUB_LAUNCH_MS", "0"))
"""Host time the stand-in launch spends holding the GIL (a busy loop): what a real step's Python and CUDA launches
cost the thread that runs them, and any other thread of the process waiting for the lock."""
torch.set_num_threads(1)  # a GPU host's torch work is small tensors: no OpenMP threads spinning beside the server's


class LLMEngine(_Engine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        runner = self.runner
        prepare, vocab = runner.prepare, runner.valid_vocab
        width = min(vocab, 4000)  # logits only this wide: a CPU argmax over the whole vocabulary would cost what
        ordinary = torch.arange(1000, width)  # the GPU does in microseconds; merged tokens, past the byte-level ids
        self.stub_steps = 0
        device = {"end": 0.0, "last": None}  # the stand-in device: when its queued work ends; the last step's end

        def execute(plan, prompt_logprobs=frozenset(), prev=None):
            *_, sample_ids, plp, _fill = prepare(plan, prompt_logprobs)  # the real runner's host work
            if LAUNCH_MS > 0:
                until = time.perf_counter() + LAUNCH_MS / 1e3
                while time.perf_counter() < until:  # launches: the GIL held
                    pass
            # the step starts on the device when it is launched, or when the step queued before it ends
            device["end"] = device["last"] = max(time.perf_counter(), device["end"]) + STEP_MS / 1e3
            rows = len(sample_ids) + len(plp)
            pick = ordinary[(torch.arange(rows) * 7 + 13 * self.stub_steps) % len(ordinary)]
            logits = torch.zeros(rows, width)
            logits[torch.arange(rows), pick] = 1.0
            self.stub_steps += 1
            return logits, sample_ids, plp
        runner.execute = execute
        launch, collect = runner.launch, runner.collect

        def launch_and_mark(plan, params, prev=None):
            device["last"] = None
            launched = launch(plan, params, prev)
            launched.stub_end = device["last"]  # None: an empty step, nothing ran
            return launched

        def wait_then_collect(launched):
            # the step's end, the GIL released meanwhile: host work done between launch and collect overlaps it
            end = getattr(launched, "stub_end", None)
            left = (end - time.perf_counter()) if end is not None else 0.0
            if left > 0:
                time.sleep(left)
            return collect(launched)
        runner.launch = launch_and_mark
        runner.collect = wait_then_collect
