"""The engine's sampler (#23): a step's sampled rows one at a time (``sample_row``, the engine's way before it
batched them) against all of them at once (``sample_rows``, what ``ModelRunner.collect`` runs), beside the greedy
rows' argmax, on the logits of a decode step.

    python bench/sampling.py --out $OUT/sampling.json          # 32 and 256 rows of GPT-NeoX's 50432-id vocabulary

Each cell: fp16 logits [rows, 50432] on the device (random, scale 3), the median over 20 calls of the wall time
of the whole choice, host and device (the engine waits for it in ``collect``), after 3 untimed calls. Both ways choose
the same ids (checked on every cell; a mismatch is reported, not timed as right). Settings: OpenAI's defaults
(temperature 1, top_p 1), and a filtered one (temperature 0.8, top_k 50, top_p 0.95).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from common import write_result  # noqa: E402  (bench/ is on sys.path as the script's folder)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from neox_rt.engine.sampling import request_generator, sample_row, sample_rows  # noqa: E402

VOCAB, VALID = 50432, 50277  # GPT-NeoX-20B's padded embedding rows, its tokenizer's ids
SETTINGS = {"t1": (1.0, 0, 1.0), "t0.8-k50-p0.95": (0.8, 50, 0.95)}


def _wall_ms(fn, device, reps: int = 20, warm: int = 3) -> tuple[float, object]:
    for _ in range(warm):
        out = fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        out = fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[32, 256])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    cells = []
    for rows in args.rows:
        logits = (torch.randn(rows, VOCAB, generator=g) * 3).to(device, torch.float16)
        greedy_ms, _ = _wall_ms(lambda: logits[:, :VALID].argmax(dim=-1).tolist(), device)
        for name, (temp, top_k, top_p) in SETTINGS.items():
            def one_by_one():
                return [sample_row(logits[i], temp, top_k, top_p if top_p < 1 else 0.0, VALID,
                                   request_generator(i, 7)) for i in range(rows)]

            def batched():
                u = [float(torch.rand((), generator=request_generator(i, 7))) for i in range(rows)]
                return sample_rows(logits, [temp] * rows, [top_k] * rows, [top_p] * rows, VALID, u)
            row_ms, a = _wall_ms(one_by_one, device, reps=5, warm=1)
            batch_ms, b = _wall_ms(batched, device)
            differ = sum(x != y for x, y in zip(a, b))
            cell = {"rows": rows, "setting": name, "per_row_ms": row_ms, "batched_ms": batch_ms,
                    "greedy_argmax_ms": greedy_ms, "same_ids": a == b, "rows_differing": differ}
            cells.append(cell)
            print(f"{rows:4d} rows {name:16s} per row {row_ms:8.2f} ms  batched {batch_ms:7.2f} ms  "
                  f"greedy {greedy_ms:5.2f} ms  rows differing {differ}", flush=True)
    out = args.out or os.path.join(REPO, "bench", "results", f"sampling-{device.type}-{int(time.time())}.json")
    write_result(out, {"device": str(device), "vocab": VOCAB, "valid_vocab": VALID, "cells": cells})
    print(f"wrote {out}")
    return 0 if all(c["same_ids"] for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
