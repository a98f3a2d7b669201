"""``python -m neox_rt.quantize SRC DST --bits 8|4 [--group-size 128] [--method rtn|gptq --calibration FILE]``: a
float HF checkpoint to a quantized one (``quantization_config`` in config.json, tokenizer copied) that
``neox_rt.load(DST)`` loads directly.

A method is a function ``(weight [out, in], format name, group size, stats) -> WeightFormat`` in :data:`METHODS`;
``stats`` is the calibration statistics of that linear (None for a method that needs none, such as round to
nearest). The methods in :data:`CALIBRATED` (GPTQ, :mod:`neox_rt.quant.gptq`) get the Hessian of each linear's
inputs from a layer-by-layer pass over ``--calibration FILE`` (``--nsamples`` sequences of ``--seqlen`` tokens,
on ``--device``).
"""
from __future__ import annotations

import argparse
import os
import sys

from neox_rt.checkpoints.hf import resolve_checkpoint
from neox_rt.convert import parse_size
from neox_rt.engine.tokenizer import Tokenizer
from neox_rt.errors import ArgumentParser, NeoxRtError
from neox_rt.model.config import NeoXConfig
from neox_rt.quant.apply import quantize_weight
from neox_rt.quant.checkpoint import save_quantized
from neox_rt.quant.gptq import NSAMPLES, SEQLEN, calibration_tokens, gptq_quantize_weight

METHODS = {"rtn": quantize_weight, "gptq": gptq_quantize_weight}
"""Method name -> quantize function (see the module docstring); round to nearest is the default."""
CALIBRATED = frozenset({"gptq"})
"""The methods that need ``--calibration``."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m neox_rt.quantize",
                description="Quantize a float HF GPT-NeoX checkpoint (weight-only int8 per channel, or int4 in "
                            "groups) into a checkpoint neox_rt.load reads directly.")
    p.add_argument("src", help="float HF checkpoint directory (config.json + safetensors or .bin)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True, help="8: int8 per output channel; 4: int4 "
                   "groups along the input dim")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--method", default="rtn", help="quantization method: rtn (round to nearest, default) or gptq "
                   "(needs --calibration)")
    p.add_argument("--calibration", metavar="FILE", help="calibration text (UTF-8) for --method gptq")
    p.add_argument("--nsamples", type=int, default=NSAMPLES,
                   help=f"calibration sequences (default {NSAMPLES}; fewer if the file is short)")
    p.add_argument("--seqlen", type=int, default=None,
                   help=f"tokens per calibration sequence (default {SEQLEN}, at most the model's positions)")
    p.add_argument("--device", default="cpu", help="where the calibration pass runs (cpu, cuda, cuda:1)")
    p.add_argument("--tokenizer", help="tokenizer JSON for the calibration text (default SRC/tokenizer.json)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="dtype of the scales and of the float tensors (embedding, LM head, LayerNorms, biases)")
    p.add_argument("--include-lm-head", action="store_true", help="quantize the LM head too")
    p.add_argument("--max-shard-size", default="4GB", help="safetensors shard size (default 4GB)")
    return p


def read_calibration(args):
    """The calibration token ids [N, L] for ``args`` (a calibrated method), or None (a method that needs none)."""
    if args.method not in CALIBRATED:
        if args.calibration:
            raise NeoxRtError(f"--calibration is not used by --method {args.method}")
        return None
    if not args.calibration:
        raise NeoxRtError(f"--method {args.method} needs --calibration FILE (a text like the model's inputs)")
    directory = resolve_checkpoint(args.src)
    config = NeoXConfig.from_json(directory)
    tokenizer = args.tokenizer or os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(tokenizer):
        raise NeoxRtError(f"no tokenizer for the calibration text: {tokenizer} not found (pass --tokenizer)")
    seqlen = args.seqlen or min(SEQLEN, config.max_position_embeddings)
    if seqlen > config.max_position_embeddings:
        raise NeoxRtError(f"--seqlen {seqlen} exceeds the model's {config.max_position_embeddings} positions")
    return calibration_tokens(args.calibration, Tokenizer(tokenizer), args.nsamples, seqlen)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.method not in METHODS:
            raise NeoxRtError(f"unknown --method {args.method!r}; choose {', '.join(METHODS)}")
        fmt = "int8" if args.bits == 8 else "int4"
        calibration = read_calibration(args)
        save_quantized(args.src, args.dst, fmt, args.group_size, args.method, METHODS[args.method], args.dtype,
                       args.include_lm_head, parse_size(args.max_shard_size), progress=sys.stderr.isatty(),
                       calibration=calibration, device=args.device)
    except NeoxRtError as e:
        print(f"neox_rt: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({fmt}, {args.method})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
