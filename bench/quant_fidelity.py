"""Fidelity of weight-only quantization on the embedded default model (#24), CPU float32, one command:

    python bench/quant_fidelity.py --out bench/results/quant_fidelity_default_cpu.json

For the float model and each quantized variant (int8 and int4-g128 by round to nearest; int4-g128 by GPTQ,
calibrated on stdlib modules that are not held out, when ``--gptq`` names a quantized checkpoint directory or is
``build``): held-out perplexity (``tests/data/heldout_sample.txt``, the training tool's ``sample_perplexity``),
teacher-forced top-1 agreement with the float model at every position of that text (the greedy next token given the
same prefix), and free-running greedy agreement over prompts cut from it (``--prompts`` prompts of 32 tokens, 32 new
tokens each: the share of continuations identical to the float model's, and the mean share of tokens before the
first divergence).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import tempfile

import torch

from common import write_result  # noqa: E402  (bench/ is on sys.path as the script's folder)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import neox_rt  # noqa: E402
from neox_rt.default_model import default_model_path  # noqa: E402

CALIBRATION_FILES = ("argparse.py", "ast.py", "json/decoder.py", "string.py", "typing.py")
"""Stdlib modules for GPTQ's calibration text; none is among the training tool's HELDOUT_FILES."""


def build_gptq(src: str, dst: str) -> None:
    stdlib = sysconfig.get_paths()["stdlib"]
    calib = os.path.join(dst + ".calibration.txt")
    with open(calib, "w", encoding="utf-8") as f:
        for name in CALIBRATION_FILES:
            f.write(open(os.path.join(stdlib, name), encoding="utf-8").read() + "\n")
    subprocess.run([sys.executable, "-m", "neox_rt.quantize", src, dst, "--bits", "4", "--method", "gptq",
                    "--calibration", calib, "--nsamples", "64", "--seqlen", "512", "--device", "cpu",
                    "--dtype", "float32"], check=True)


def prefix_len(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gptq", default="build", help="a GPTQ int4 checkpoint of the default model, 'build' (made "
                   "here, ~1 min), or 'none'")
    p.add_argument("--prompts", type=int, default=24, help="free-running prompts cut from the held-out text")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import train_default_model as tool  # the held-out perplexity the model card reports
    src = default_model_path()
    if src is None:
        print("no trained default model is shipped", file=sys.stderr)
        return 2
    text = open(os.path.join(REPO, "tests", "data", "heldout_sample.txt"), encoding="utf-8").read()
    variants = {"fp32": dict(), "int8 rtn": dict(quantize="int8"), "int4-g128 rtn": dict(quantize="int4")}
    gptq = args.gptq
    if gptq == "build":
        gptq = os.path.join(tempfile.mkdtemp(), "default_gptq4")
        build_gptq(src, gptq)
    models = {k: neox_rt.load(src, progress=False, **kw) for k, kw in variants.items()}
    if gptq != "none":
        models["int4-g128 gptq"] = neox_rt.load(gptq, progress=False)
    tok = models["fp32"].tokenizer
    ids = tok.encode(text)
    x = torch.tensor([ids[:models["fp32"].config.max_position_embeddings]])
    prompts = [ids[i:i + 32] for i in range(0, len(ids) - 64, max(1, (len(ids) - 64) // args.prompts))][:args.prompts]
    ref_logits = models["fp32"].logits(x)[0].argmax(-1)
    ref_cont = [r.token_ids for r in models["fp32"].generate(prompts, max_new_tokens=32, temperature=0)]
    rows = {}
    for name, m in models.items():
        ppl, _ = tool.sample_perplexity(m, text)
        top1 = (m.logits(x)[0].argmax(-1) == ref_logits).float().mean().item()
        cont = [r.token_ids for r in m.generate(prompts, max_new_tokens=32, temperature=0)]
        rows[name] = dict(
            heldout_perplexity=ppl, perplexity_vs_fp32=None,
            teacher_forced_top1_agreement=top1,
            greedy_identical=sum(a == b for a, b in zip(cont, ref_cont)) / len(prompts),
            greedy_tokens_before_divergence=sum(prefix_len(a, b) for a, b in zip(cont, ref_cont))
            / sum(map(len, ref_cont)),
            weight_bytes=m.memory_report().total_bytes)
    for r in rows.values():
        r["perplexity_vs_fp32"] = r["heldout_perplexity"] / rows["fp32"]["heldout_perplexity"] - 1
    report = dict(model="neox_rt default (13.8M)", device="cpu", dtype="float32", heldout_tokens=len(ids),
                  teacher_forced_positions=int(x.shape[1]), prompts=len(prompts), new_tokens=32,
                  calibration_files=list(CALIBRATION_FILES), rows=rows)
    print(f"{'variant':16s} {'ppl':>7s} {'vs fp32':>8s} {'top-1 agr':>9s} {'greedy =':>8s} {'prefix':>7s}")
    for k, r in rows.items():
        print(f"{k:16s} {r['heldout_perplexity']:7.3f} {100 * r['perplexity_vs_fp32']:+7.2f}% "
              f"{100 * r['teacher_forced_top1_agreement']:8.1f}% {100 * r['greedy_identical']:7.0f}% "
              f"{100 * r['greedy_tokens_before_divergence']:6.0f}%")
    if args.out:
        write_result(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
