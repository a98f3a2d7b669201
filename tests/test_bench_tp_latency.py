"""bench/tp_latency.py on CPU: the single-process TP=1 run and rank 0 of a simulated TP=2 (collectives replaced by
local stand-ins), as the device's tpsim stage runs them on a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from neox_rt.model.config import NeoXConfig
from neox_rt.model import NeoXForCausalLM
from neox_rt.parallel import TensorParallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--device", "cpu", "--layers", "2", "--hidden", "64", "--heads", "4", "--vocab", "101", "--prompt", "4",
         "--new", "3", "--skip-memory"]


def _run(tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OUT")}
    subprocess.run([sys.executable, os.path.join(REPO, "bench", "tp_latency.py"), *SMALL, *extra, "--out", str(out)],
                   check=True, cwd=REPO, env=env, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_simulated_tp_runs_rank0_shard(tmp_path):
    one = _run(tmp_path, "tp1", "--tp", "1")
    sim = _run(tmp_path, "sim2", "--simulate-tp", "2")
    assert one["tp"] == 1 and not one["simulated"]
    assert sim["tp"] == 2 and sim["simulated"]
    assert sim["per_token_ms"]["p50"] > 0 and sim["decode_path"] == "eager"
    # rank 0 holds its shard of every split weight and all of the replicated ones
    cfg = NeoXConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                     hidden_act="gelu_fast", max_position_embeddings=2048)

    def nbytes(tp):
        with torch.device("meta"):
            m = NeoXForCausalLM(cfg, tp).half()
        return sum(p.numel() * p.element_size() for p in m.parameters())

    assert one["weight_bytes_per_rank"] == nbytes(TensorParallel())
    assert sim["weight_bytes_per_rank"] == nbytes(TensorParallel(rank=0, size=2)) < one["weight_bytes_per_rank"]
    assert sim["allreduce_per_token_ms"]["count"] == 0  # nothing communicated, nothing timed


def test_simulated_allreduce_wait_is_recorded(tmp_path):
    """--simulate-allreduce-us: recorded with the result (the spin runs only on a GPU: on CPU the all-reduce stays
    the identity, and the run is the one without it); the NEOX_RT_* settings in force are recorded too."""
    res = _run(tmp_path, "ar", "--simulate-tp", "2", "--simulate-allreduce-us", "8")
    assert res["simulated_allreduce_us"] == 8 and res["per_token_ms"]["p50"] > 0
    assert isinstance(res["settings"], dict)
    plain = _run(tmp_path, "tp1", "--tp", "1", "--simulate-allreduce-us", "8")
    assert plain["simulated_allreduce_us"] is None  # only meaningful with --simulate-tp


def test_quantized_model_built_layer_by_layer(tmp_path):
    """--quantize: the linears are formats (the weight bytes shrink accordingly) and decode runs, at TP=1 and as rank 0
    of a simulated TP=2 (each rank quantizes its own shard)."""
    fp = _run(tmp_path, "fp", "--tp", "1", "--hidden", "128")
    q8 = _run(tmp_path, "q8", "--tp", "1", "--hidden", "128", "--quantize", "int8")
    q4 = _run(tmp_path, "q4", "--simulate-tp", "2", "--hidden", "256", "--quantize", "int4")
    assert q8["quantize"] == "int8" and "int8" in q8["memory_report"] and q4["quantize"] == "int4"
    assert q8["weight_bytes_per_rank"] < fp["weight_bytes_per_rank"]
    assert q8["per_token_ms"]["p50"] > 0 and q4["per_token_ms"]["p50"] > 0
