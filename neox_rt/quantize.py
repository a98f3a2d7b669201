"""``python -m neox_rt.quantize SRC DST --bits 8|4 [--group-size 128] [--method rtn]``: a float HF checkpoint to a
quantized one (``quantization_config`` in config.json, tokenizer copied) that ``neox_rt.load(DST)`` loads directly.

A method is a function ``(weight [out, in], format name, group size, stats) -> WeightFormat`` in :data:`METHODS`;
``stats`` is the calibration statistics of that linear (None for a method that needs none, such as round to
nearest). GPTQ (``neox_rt/quant/gptq.py``, to come) plugs in here with its calibration pass; until then
``--method gptq`` is one error line.
"""
from __future__ import annotations

import argparse
import sys

from neox_rt.convert import parse_size
from neox_rt.errors import NeoxRtError
from neox_rt.quant.apply import quantize_weight
from neox_rt.quant.checkpoint import save_quantized

METHODS = {"rtn": quantize_weight}
"""Method name -> quantize function (see the module docstring); round to nearest is the default."""
PLANNED_METHODS = ("gptq",)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise NeoxRtError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m neox_rt.quantize",
                description="Quantize a float HF GPT-NeoX checkpoint (weight-only int8 per channel, or int4 in "
                            "groups) into a checkpoint neox_rt.load reads directly.")
    p.add_argument("src", help="float HF checkpoint directory (config.json + safetensors or .bin)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True, help="8: int8 per output channel; 4: int4 "
                   "groups along the input dim")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--method", default="rtn", help="quantization method: rtn (round to nearest, default)")
    p.add_argument("--calibration", metavar="FILE", help="calibration text (methods that need one)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="dtype of the scales and of the float tensors (embedding, LM head, LayerNorms, biases)")
    p.add_argument("--include-lm-head", action="store_true", help="quantize the LM head too")
    p.add_argument("--max-shard-size", default="4GB", help="safetensors shard size (default 4GB)")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.method in PLANNED_METHODS:
            raise NeoxRtError(f"--method {args.method} is not implemented yet; use --method rtn")
        if args.method not in METHODS:
            raise NeoxRtError(f"unknown --method {args.method!r}; choose {', '.join(METHODS)}")
        fmt = "int8" if args.bits == 8 else "int4"
        save_quantized(args.src, args.dst, fmt, args.group_size, args.method, METHODS[args.method], args.dtype,
                       args.include_lm_head, parse_size(args.max_shard_size), progress=sys.stderr.isatty())
    except NeoxRtError as e:
        print(f"neox_rt: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({fmt}, {args.method})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
