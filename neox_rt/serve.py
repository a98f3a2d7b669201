"""``python -m neox_rt.serve``: the OpenAI-compatible server (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health``, ``/metrics``) over the continuous-batching engine, on the model that
``python -m neox_rt.generate`` would load (the embedded default model when none is named)."""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

from neox_rt.errors import NeoxRtError, read_bytes

DEFAULT_ENGINE = "neox_rt.engine.llm_engine"
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 10**12, "tb": 10**12}


def parse_kv_memory(text: str) -> int | float:
    """``--kv-cache-memory``: a size (``2GiB``, ``512MiB``, ``1000000``), or a fraction of the device's free memory
    after the model is loaded (``0.9``, ``90%``), as a float in (0, 1]."""
    m = re.fullmatch(r"\s*(0?\.[0-9]+|1\.0*|[0-9]+(?:\.[0-9]+)?%)\s*", text)
    if m:
        frac = float(m.group(1)[:-1]) / 100 if m.group(1).endswith("%") else float(m.group(1))
        if not 0 < frac <= 1:
            raise argparse.ArgumentTypeError(f"a fraction of free memory must be in (0, 1], got {text!r}")
        return frac
    return parse_bytes(text)


def parse_bytes(text: str) -> int:
    """``2GiB``, ``512MiB``, ``1.5GB``, ``1000000`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 512MiB, 1000000)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, like generate
        print(f"neox_rt.serve: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from neox_rt.generate import head_format_arg
    p = _Parser(prog="python -m neox_rt.serve", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", metavar="CONFIG.yml", help="gpt-neox YAML configs, as generate takes them")
    g = p.add_argument_group("model (as python -m neox_rt.generate)")
    g.add_argument("--model", metavar="DIR", help="HF checkpoint directory or gpt-neox checkpoint; default: the "
                                                   "embedded default model")
    g.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json when the checkpoint has none")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: float16 on a GPU, "
                                                                               "float32 on CPU")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    g.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantization at load")
    g.add_argument("--group-size", type=int, metavar="N", help="int4 group size along the input features "
                                                                "(default 128)")
    g.add_argument("--quantize-lm-head", nargs="?", const=True, type=head_format_arg, metavar="int8|int4",
                   help="with --quantize: the LM head quantized too, in that format or the one named")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    g.add_argument("--port", type=int, default=8000, help="default 8000")
    g.add_argument("--served-model-name", metavar="NAME", help="the model's name in the API (default: the "
                                                                "checkpoint directory's name, or neox_rt-default)")
    g.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template (messages, add_generation_prompt); "
                                                            "default: 'Role: content' lines, then 'Assistant:'")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=64, metavar="N", help="most sequences running at once")
    g.add_argument("--max-model-len", type=int, metavar="N", help="most tokens (prompt + max_tokens) a request "
                                                                  "may span (default: the model's positions)")
    g.add_argument("--kv-cache-memory", type=parse_kv_memory, metavar="SIZE", help="KV cache size (e.g. 2GiB), "
                   "or a fraction of the free device memory once the model is loaded (e.g. 0.9 or 90%%); default: "
                   "what max-num-seqs x max-model-len need, at most half of the free memory (256 MiB on CPU)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, metavar="N", help="per-step token budget")
    g.add_argument("--max-queue", type=int, metavar="N", help="most requests waiting; more get 429 (default: no "
                                                              "limit)")
    g.add_argument("--tp", type=int, metavar="N", help="tensor-parallel size; launch with torchrun "
                   "--nproc-per-node N (rank 0 serves HTTP and schedules, every rank runs its shard; default: "
                   "WORLD_SIZE under torchrun, else 1)")
    g.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the engine in a process of its own, apart from the HTTP event loop (default: on, and "
                        "off under --tp > 1); --no-engine-process runs it in a thread of the server's process")
    # tests only: a module with LLMEngine and SamplingRequest standing in for the engine
    p.add_argument("--engine", default=DEFAULT_ENGINE, help=argparse.SUPPRESS)
    return p


def load_neox(args, tp=None):
    """The model, loaded by generate's helpers (configs, --model, --tokenizer, --dtype, --device, --quantize), on
    this rank's shard when ``tp`` is a tensor-parallel context."""
    from neox_rt import generate, parallel
    tp = tp or parallel.SINGLE
    s = _settings(args)
    device = _rank_device(generate._device(s), tp)
    import torch
    dtype = s.dtype or ("float16" if torch.device(device).type == "cuda" else "float32")
    return generate.load_model(s, device, dtype, tp, tp.is_main), s.load


def _settings(args):
    from neox_rt import generate
    argv = list(args.configs)
    for flag, value in (("--model", args.model), ("--tokenizer", args.tokenizer), ("--dtype", args.dtype),
                        ("--device", args.device), ("--quantize", args.quantize)):
        if value is not None:
            argv += [flag, value]
    for flag, value in (("--tp", args.tp), ("--group-size", args.group_size)):
        if value is not None:
            argv += [flag, str(value)]
    if args.quantize_lm_head:
        argv += ["--quantize-lm-head"] + ([args.quantize_lm_head] if isinstance(args.quantize_lm_head, str) else [])
    return generate.parse_settings(argv)


def _rank_device(device: str, tp) -> str:
    """Under tensor parallelism each rank's GPU is its local rank's (init_from_env selected it)."""
    import torch
    if tp.size > 1 and torch.device(device).type == "cuda":
        return f"cuda:{torch.cuda.current_device()}"
    return device


def setup_parallel(args):
    """The tensor-parallel context: SINGLE unless --tp > 1 or torchrun started several processes."""
    from neox_rt import generate
    import torch
    s = _settings(args)
    return generate.setup_parallel(s, torch.device(generate._device(s)).type)


def build(args, tp=None):
    """(app, model name) from parsed arguments: the model, the engine, its async driver and the HTTP app (rank 0
    of a tensor-parallel launch: the other ranks run :func:`serve_worker`). The engine runs in a process of its own
    (:class:`~neox_rt.engine.process_engine.ProcessEngine`) unless ``--no-engine-process`` or ``--tp`` > 1 put it in
    a thread of this one."""
    from neox_rt import parallel
    from neox_rt.engine.async_engine import AsyncEngine
    from neox_rt.server.app import build_app, load_chat_template
    template = None
    if args.chat_template is not None:
        try:
            template = load_chat_template(read_bytes(args.chat_template, "chat template").decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise NeoxRtError(f"--chat-template {args.chat_template}: {e}") from None
    tp = tp or parallel.SINGLE
    engine_module = _engine_module(args)
    if _engine_process(args, tp):
        from neox_rt.engine.process_engine import ProcessEngine
        driver = ProcessEngine(engine_process_main, args, log_level=args.log_level)
        path = driver.info["path"]
    else:
        engine, path = make_engine(args, tp)
        driver = AsyncEngine(engine)
    name = args.served_model_name or (path.rstrip("/").split("/")[-1] if path else "neox_rt-default")
    app = build_app(driver, engine_module.SamplingRequest, model_name=name, chat_template=template, model_root=path)
    return app, name


def _engine_module(args):
    try:
        return importlib.import_module(args.engine)
    except ImportError as e:
        raise NeoxRtError(f"cannot import the engine {args.engine}: {e}") from None


def _engine_process(args, tp) -> bool:
    return tp.size == 1 if args.engine_process is None else args.engine_process


def make_engine(args, tp=None):
    """(engine, checkpoint path): the model loaded and its ``LLMEngine`` built."""
    engine_module = _engine_module(args)
    neox, path = load_neox(args, tp)
    if neox.tokenizer is None:
        raise NeoxRtError("the checkpoint has no tokenizer.json: pass --tokenizer FILE")
    try:
        engine = engine_module.LLMEngine(neox, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                         kv_cache_memory=args.kv_cache_memory,
                                         max_num_batched_tokens=args.max_num_batched_tokens, max_queue=args.max_queue)
    except ValueError as e:
        raise NeoxRtError(f"engine settings: {e}") from None
    return engine, path


def engine_process_main(args):
    """The engine process's factory (:class:`~neox_rt.engine.process_engine.ProcessEngine`): the engine, and the
    checkpoint path for the server's model name."""
    engine, path = make_engine(args)
    return engine, {"path": path}


def serve_worker(args, tp) -> int:
    """Ranks 1..N-1: load this rank's shard, size the paged KV pool as rank 0 did, run rank 0's steps until it
    stops (:mod:`neox_rt.engine.distributed`)."""
    from neox_rt.engine.distributed import share_pool_size, worker_loop
    neox, _ = load_neox(args, tp)
    num_blocks = share_pool_size(tp, neox.model, None)
    if num_blocks < 1:  # rank 0 failed to size its pool and says so
        return 2
    worker_loop(tp, neox.model, num_blocks, block_size=16)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tp = setup_parallel(args)
    except NeoxRtError as e:
        print(f"neox_rt.serve: error: {e}", file=sys.stderr)
        return 2
    try:
        return _main(args, tp)
    finally:
        if tp.size > 1:
            from neox_rt.generate import _leave_process_group
            _leave_process_group()


def _main(args, tp) -> int:
    if args.engine_process and tp.size > 1:  # every rank says so and stops: none waits for the others
        print(f"neox_rt.serve{f' (rank {tp.rank})' if tp.rank else ''}: error: --engine-process does not run under "
              "--tp > 1 (rank 0's engine drives the other ranks from its own process)", file=sys.stderr)
        return 2
    if not tp.is_main:
        try:
            return serve_worker(args, tp)
        except NeoxRtError as e:
            print(f"neox_rt.serve (rank {tp.rank}): error: {e}", file=sys.stderr)
            return 2
    try:
        app, name = build(args, tp)
    except NeoxRtError as e:
        print(f"neox_rt.serve: error: {e}", file=sys.stderr)
        return 2
    import uvicorn
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tp_note = f" (tensor parallel over {tp.size} ranks)" if tp.size > 1 else ""
    print(f"neox_rt.serve: serving {name} on http://{args.host}:{args.port}/v1{tp_note}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
