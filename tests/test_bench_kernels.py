"""bench/kernels.py's report (CPU): the table's reference columns and the target verdicts."""
from __future__ import annotations

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
kernels = pytest.importorskip("kernels")


def _report():
    nbytes = 75_500_000
    prov = {"torch": {"provider": "torch", "ms": 0.033, "pct_copy": 100 * nbytes / 0.033 / 1e6 / 3000},
            "triton": {"provider": "triton", "error": "no such op"},
            "cuda": {"provider": "cuda", "ms": 0.0315, "pct_copy": 100 * nbytes / 0.0315 / 1e6 / 3000,
                     "b2b_ms": 0.027, "b2b_pct_copy": 100 * nbytes / 0.027 / 1e6 / 3000}}
    case = {"op": "linear", "model": "gpt-neox-20b", "shape": "dense m=1", "bytes": nbytes, "flops": 1,
            "copy_same_ms": 0.0244, "read_same_ms": 0.030, "read_same_how": "torch.sum", "read_b2b_ms": 0.0265,
            "providers": prov}
    return {"env": {"gpu": "test GPU"}, "copy_gbps": 3000.0, "one_element_kernel_us": 4.4, "cases": [case]}


def test_table_has_reference_columns_and_verdict():
    table = kernels.markdown(_report())
    header = next(line for line in table.splitlines() if line.startswith("| op |"))
    assert header.endswith("| same-size copy | same-size read | back-to-back |")
    row = next(line for line in table.splitlines() if line.startswith("| linear |")).strip("| ").split(" | ")
    cols = header.strip("| ").split(" | ")
    cell = dict(zip(cols, row))
    assert cell["cuda"] == "31.5 us (80%)"
    assert cell["best %"] == "80%"  # cuBLAS (torch) counts for linear, but the CUDA GEMV is faster here
    assert cell["target"] == ">= 90% MISS"
    assert cell["same-size copy"] == "24.4 us (77%)"
    assert cell["same-size read"] == "30.0 us (84%)"
    assert cell["back-to-back"] == "93% (read 95%)"


def test_table_without_reference_columns():
    rep = _report()
    case = rep["cases"][0]
    cuda = case["providers"]["cuda"]
    del case["read_same_ms"], case["read_b2b_ms"], cuda["b2b_ms"], cuda["b2b_pct_copy"]
    row = next(line for line in kernels.markdown(rep).splitlines() if line.startswith("| linear |"))
    assert row.endswith("| - | - |")
