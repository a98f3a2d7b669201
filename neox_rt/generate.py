"""``python -m neox_rt.generate``: gpt-neox's ``generate.py``, run by neox_rt.

    python -m neox_rt.generate                                   # embedded default model, 3 samples
    python -m neox_rt.generate configs/20B.yml -i prompt.txt -o sample_outputs.txt
    python -m neox_rt.generate --model CHECKPOINT_DIR --text-gen-type interactive

Three modes as in gpt-neox (``text_gen_type``): ``unconditional`` (``num_samples`` samples started from
``<|endoftext|>``), ``input-file`` (prompts from a file, split on ``prompt_end``) and ``interactive``.
Every prompt gives one JSON record per line, written and flushed as soon as its batch finishes:
``{"context", "text", "length", "finished", "message", "duration_seconds"}`` (+ ``logprobs``), to the output
file or to stdout; on a terminal (stdout not redirected, no output file) each sample's text is printed under a
header line instead.
Settings come from gpt-neox YAML configs (merged in order, see :mod:`neox_rt.checkpoints.neox_yaml`), then from flags,
which override the config key of the same name. The defaults of the keys no config or flag sets depend on the run:
:data:`DEFAULT_MODEL_SAMPLING` for the embedded default model without a config, gpt-neox's
:data:`GPT_NEOX_GENERATION_DEFAULTS` when a config is given, else :class:`Settings`' (greedy, 64 tokens).
Generation itself is :meth:`neox_rt.NeoX.generate`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

from neox_rt.checkpoints import neox_yaml
from neox_rt.engine.sampling import SamplingParams
from neox_rt.errors import NeoxRtError, read_bytes

MODES = ("unconditional", "input-file", "interactive")
INTERACTIVE_PROMPT = "Context prompt >>> "

# The first impression: `python -m neox_rt.generate` with no config and no --model runs the embedded default model
# (trained on Python source) with these, unless flags set them: a few reproducible samples that read as Python.
# configs/default.yml holds the same values.
DEFAULT_MODEL_SAMPLING = dict(num_samples=3, maximum_tokens=100, temperature=0.8, top_k=0, top_p=0.95, seed=1234)

# gpt-neox's configs/text_generation.yml: what a run given a YAML config uses for the keys neither the config nor a
# flag sets (gpt-neox samples at temperature 1 with no filter; it is greedy when temperature, top_k and top_p are
# all 0).
GPT_NEOX_GENERATION_DEFAULTS = dict(maximum_tokens=102, temperature=1.0, top_k=0, top_p=0.0)


# -- settings ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """Everything a run needs, after merging configs and flags; validated in __post_init__."""
    text_gen_type: str = "unconditional"
    """unconditional, input-file or interactive."""
    load: str | None = None
    """Checkpoint directory; None: the embedded default model."""
    vocab_file: str | None = None
    """Tokenizer JSON; None: the checkpoint's tokenizer.json."""
    sample_input_file: str | None = None
    """Prompts file (input-file mode)."""
    sample_output_file: str | None = None
    """JSON lines output; None: stdout."""
    prompt: str | None = None
    """A single prompt given on the command line (input-file mode without a file)."""
    num_samples: int = 1
    """Unconditional samples (3 on the embedded default model without a config)."""
    maximum_tokens: int = 64
    """New tokens per prompt at most (100 on the embedded default model without a config, 102 with a config)."""
    temperature: float = 0.0
    """0 is greedy (gpt-neox: greedy when temperature, top_k and top_p are all 0; here temperature 0 suffices).
    0.8 on the embedded default model without a config, 1.0 with a config (gpt-neox's default)."""
    top_k: int = 0
    """Top-k filter (0: off)."""
    top_p: float = 0.0
    """Nucleus filter in [0, 1] (0: off; 0.95 on the embedded default model without a config)."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends where one appears, the text is cut before it."""
    seed: int | None = None
    """Sampling seed; batch i of a run uses seed + index of its first prompt. None: a random seed (1234 on the
    embedded default model without a config)."""
    prompt_end: str = "\n"
    """Prompt separator in input files and interactive mode."""
    recompute: bool = False
    """No KV cache: rerun the whole sequence each step."""
    return_logits: bool = False
    """Add 'logprobs' (log p of each generated token) to the records."""
    dtype: str | None = None
    """float32, float16, bfloat16; None: float16 on CUDA, float32 on CPU."""
    device: str | None = None
    """None: cuda if available, else cpu."""
    batch_size: int | None = None
    """Prompts per generate call; None: 8 on a GPU, 4 on CPU."""
    quantize: str | None = None
    """int8 or int4: quantize the layers' linears at load (weight-only; --quantize); None: as stored."""
    group_size: int = 128
    """int4 group size along the input features (--group-size)."""
    quantize_lm_head: bool | str = False
    """With quantize: the LM head quantized too (--quantize-lm-head), in the layers' format (True) or in the one
    named ("int8", "int4"); else it stays in dtype."""
    tp: int | None = None
    """Tensor-parallel size (--tp); None: model_parallel_size when run under torchrun, else 1."""
    model_parallel_size: int = 1
    """The checkpoint's model-parallel size (config)."""
    resume: bool = False
    """Skip prompts whose records are already in the output file."""
    on_invalid_utf8: str = "fail"
    """fail: an input line that is not UTF-8 is an error; skip: drop it with a warning."""
    strict: bool = False
    """A prompt too long for the context is an error, not a record with text null."""
    model_config: dict = dataclasses.field(default_factory=dict, repr=False)
    """The merged config (model shape keys are read from it when the checkpoint has no config.json)."""

    def __post_init__(self):
        if self.text_gen_type not in MODES:
            raise NeoxRtError(f"unknown text-gen-type {self.text_gen_type!r}; choose {', '.join(MODES)}")
        for name in ("maximum_tokens", "num_samples"):
            if getattr(self, name) <= 0:
                raise NeoxRtError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise NeoxRtError(f"batch_size must be positive, got {self.batch_size}")
        if self.quantize not in (None, "int8", "int4"):
            raise NeoxRtError(f"quantize must be int8 or int4, got {self.quantize!r}")
        if self.quantize_lm_head and self.quantize is None:
            raise NeoxRtError("--quantize-lm-head needs --quantize int8 or int4")
        if self.quantize_lm_head not in (True, False, "int8", "int4"):
            raise NeoxRtError(f"quantize_lm_head must be true, false, int8 or int4, got {self.quantize_lm_head!r}")
        if self.group_size <= 0 or self.group_size % 8:
            raise NeoxRtError(f"group size must be a positive multiple of 8, got {self.group_size}")
        if self.tp is not None and self.tp <= 0:
            raise NeoxRtError(f"--tp must be positive, got {self.tp}")
        SamplingParams(self.temperature, self.top_k, self.top_p)  # raises NeoxRtError naming the value
        if not self.prompt_end:
            raise NeoxRtError("prompt_end must not be empty")
        if self.on_invalid_utf8 not in ("fail", "skip"):
            raise NeoxRtError(f"on_invalid_utf8 must be fail or skip, got {self.on_invalid_utf8!r}")
        if self.dtype is not None:
            from neox_rt.model.build import parse_dtype
            parse_dtype(self.dtype)
        if self.text_gen_type == "input-file" and self.sample_input_file is None and self.prompt is None:
            raise NeoxRtError("input-file mode needs a prompts file: -i/--sample-input-file (or --prompt TEXT)")
        if self.sample_input_file is not None and self.prompt is not None and self.text_gen_type == "input-file":
            raise NeoxRtError("give either --prompt or an input file, not both")
        if self.resume and self.sample_output_file is None:
            raise NeoxRtError("--resume needs an output file (-o/--sample-output-file)")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, like every other user error
        print(f"neox_rt: error: {message}", file=sys.stderr)
        sys.exit(2)


def _flags_text(values: dict) -> str:
    """``{"top_p": 0.95}`` as ``top-p 0.95``, for the help."""
    return ", ".join(f"{k.replace('_', '-')} {v}" for k, v in values.items())


def _default_model_sampling_text() -> str:
    d = DEFAULT_MODEL_SAMPLING
    return (f"{d['num_samples']} samples of up to {d['maximum_tokens']} tokens at temperature {d['temperature']}, "
            f"top-p {d['top_p']}, top-k {d['top_k']}, seed {d['seed']}")


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS
    p = _Parser(
        prog="python -m neox_rt.generate", allow_abbrev=False, argument_default=S,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate text with a GPT-NeoX-family model, driven like gpt-neox's generate.py.\n"
                    "Without a model or config it runs the embedded default model (trained on Python source):\n"
                    + _default_model_sampling_text() + ".",
        epilog="""modes (text-gen-type):
  unconditional  num-samples samples started from <|endoftext|> (the default without -i/--prompt)
  input-file     prompts from -i, split on prompt-end, stripped, empty ones skipped; records in input order
  interactive    'Context prompt >>> ' loop on stdin, text streamed to stdout; exit, quit or EOF ends it;
                 with a prompt-end other than newline, lines are read until one ends with prompt-end

records (one JSON object per line, to -o or stdout):
  {"context", "text", "length", "finished", "message", "duration_seconds"} (+ "logprobs" with
  --return-logits). A prompt too long for the context gives text null and a message (an error with --strict).
  On a terminal (no -o, stdout not redirected) each prompt's text is printed under a header line instead;
  pipe stdout (e.g. | cat) for the JSON lines.

sampling defaults (a flag always wins):
  embedded default model, no config: @DEFAULT_MODEL_SAMPLING@
                                     (the values of configs/default.yml)
  a config given (gpt-neox):         @GPT_NEOX_GENERATION_DEFAULTS@ unless it sets them
  --model without a config:          greedy (temperature 0), maximum-tokens 64, num-samples 1, random seed

configs: gpt-neox YAML files (keys with - or _), merged in order, then the flags on top. Read keys: the model
  shape (num-layers, hidden-size, num-attention-heads, seq-length, max-position-embeddings, rotary-pct,
  rotary-emb-base, gpt-j-residual, no-weight-tying, layernorm-epsilon, activation, ...; used only when the
  checkpoint has no config.json), load, vocab-file, model-parallel-size (the default --tp under torchrun),
  pipe-parallel-size (the checkpoint's layout only: neox_rt does not pipeline) and the generation keys.
  Training-only keys are ignored; an unknown key is ignored with a warning.

examples:
  python -m neox_rt.generate
  python -m neox_rt.generate configs/20B.yml -i prompt.txt -o sample_outputs.txt
  python -m neox_rt.generate --model pythia-1.4b --prompt "def fibonacci(n):" --maximum-tokens 32
  torchrun --nproc-per-node 2 -m neox_rt.generate configs/20B.yml --tp 2 -i prompt.txt -o out.jsonl

exit status: 0 done, 2 bad input (one line 'neox_rt: error: ...' on stderr), 130 interrupted; records
already written stay in the output file (continue with --resume).""".replace(
            "@DEFAULT_MODEL_SAMPLING@", _flags_text(DEFAULT_MODEL_SAMPLING)).replace(
            "@GPT_NEOX_GENERATION_DEFAULTS@", _flags_text(GPT_NEOX_GENERATION_DEFAULTS)))
    p.add_argument("configs", nargs="*", metavar="CONFIG.yml",
                   help="gpt-neox YAML config files, merged in order (a later file's key wins)")
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="load", metavar="DIR",
                   help="checkpoint directory (HF format, or gpt-neox native with the shape from the config); "
                        "config key: load. Default: the embedded default model")
    g.add_argument("--tokenizer", dest="vocab_file", metavar="FILE",
                   help="tokenizers JSON file (e.g. 20B_tokenizer.json); config key: vocab-file. "
                        "Default: the checkpoint's tokenizer.json")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="weights and activations dtype (default: float16 on CUDA, float32 on CPU)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    g.add_argument("--tp", type=int, metavar="N",
                   help="tensor-parallel size; launch with torchrun --nproc-per-node N "
                        "(default: model-parallel-size under torchrun, else 1)")
    g.add_argument("--quantize", choices=("int8", "int4"),
                   help="weight-only quantization of the layers' linears at load (int8 per output channel, int4 "
                        "in groups); the embedding stays in --dtype, the LM head too unless --quantize-lm-head")
    g.add_argument("--group-size", dest="group_size", type=int, metavar="N",
                   help="int4 group size along the input features (default 128)")
    g.add_argument("--quantize-lm-head", dest="quantize_lm_head", nargs="?", const=True, type=head_format_arg,
                   metavar="int8|int4",
                   help="with --quantize: the LM head quantized too, in the layers' format or the one named (e.g. "
                        "--quantize int4 --quantize-lm-head int8; less memory and a faster token, the logits carry "
                        "its rounding)")
    g.add_argument("--no-quantize-lm-head", dest="quantize_lm_head", action="store_false",
                   help="the LM head stays in --dtype (the default)")
    g = p.add_argument_group("mode and files")
    g.add_argument("--text-gen-type", dest="text_gen_type", choices=MODES,
                   help="unconditional, input-file or interactive (default: input-file with -i or --prompt, "
                        "else unconditional)")
    g.add_argument("-i", "--sample-input-file", dest="sample_input_file", metavar="FILE",
                   help="prompts file for input-file mode")
    g.add_argument("-o", "--sample-output-file", dest="sample_output_file", metavar="FILE",
                   help="write records here (JSON lines); default: stdout")
    g.add_argument("--prompt", metavar="TEXT", help="generate for this single prompt (input-file mode)")
    g.add_argument("--prompt-end", dest="prompt_end", metavar="STR",
                   help="prompt separator in the input file and interactive mode (default: newline; "
                        "\\n and \\t are understood)")
    g.add_argument("--num-samples", dest="num_samples", type=int, metavar="N",
                   help="samples in unconditional mode (default 1; 3 on the embedded default model)")
    g.add_argument("--batch-size", dest="batch_size", type=int, metavar="N",
                   help="prompts generated together (default 8 on a GPU, 4 on CPU)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction,
                   help="append to the output file, skipping prompts whose records it already holds "
                        "(matched by context, in order)")
    g.add_argument("--on-invalid-utf8", dest="on_invalid_utf8", choices=("fail", "skip"),
                   help="a line of the input file that is not UTF-8: fail (default) or skip it with a warning")
    g.add_argument("--strict", action=argparse.BooleanOptionalAction,
                   help="a prompt too long for the context stops the run (exit 2) instead of giving a "
                        "record with text null")
    g = p.add_argument_group("sampling")
    g.add_argument("--maximum-tokens", dest="maximum_tokens", type=int, metavar="N",
                   help="new tokens per prompt at most (default: see sampling defaults below)")
    g.add_argument("--temperature", type=float,
                   help="0 is greedy; otherwise logits / temperature (default: see sampling defaults below)")
    g.add_argument("--top-k", dest="top_k", type=int, metavar="K", help="keep the K most likely tokens (0: off)")
    g.add_argument("--top-p", dest="top_p", type=float, metavar="P",
                   help="nucleus sampling, P in [0, 1] (0: off); applied after top-k")
    g.add_argument("--stop", action="append", metavar="STR",
                   help="stop string (repeatable): generation ends there, the text is cut before it")
    g.add_argument("--seed", type=int,
                   help="sampling seed (reproducible runs; default: random, 1234 on the embedded default model)")
    g.add_argument("--recompute", action=argparse.BooleanOptionalAction,
                   help="no KV cache: rerun the whole sequence every step (slow; for checking)")
    g.add_argument("--return-logits", dest="return_logits", action=argparse.BooleanOptionalAction,
                   help="add 'logprobs' (log-probability of each generated token) to the records")
    return p


def _unescape(s: str) -> str:
    return s.replace("\\n", "\n").replace("\\t", "\t")


def run_defaults(config_given: bool, model_given: bool) -> dict:
    """The generation defaults under the configs and flags: gpt-neox's with a config, the embedded default
    model's without a config or --model, else none (Settings' own: greedy, 64 tokens, one sample)."""
    if config_given:
        return dict(GPT_NEOX_GENERATION_DEFAULTS)
    return {} if model_given else dict(DEFAULT_MODEL_SAMPLING)


def head_format_arg(text: str) -> str:
    """--quantize-lm-head's optional value: the LM head's own format."""
    if text not in ("int8", "int4"):
        raise argparse.ArgumentTypeError(f"expected int8 or int4, got {text!r}")
    return text


def parse_settings(argv, warn=None) -> Settings:
    """Configs merged in order, then the flags; the mode chosen as gpt-neox does."""
    args = vars(build_parser().parse_args(argv))
    paths = args.pop("configs", [])
    cfg = neox_yaml.read_configs(paths, **({"warn": warn} if warn else {}))
    flags = {k: v for k, v in args.items() if v is not None}
    if "prompt_end" in flags:
        flags["prompt_end"] = _unescape(flags["prompt_end"])
    tp = flags.pop("tp", None)
    merged = {**run_defaults(bool(paths), "load" in flags), **cfg, **flags}
    # the mode: the flag; else -i or --prompt on the command line; else the config's; else unconditional
    if "text_gen_type" in flags:
        mode = flags["text_gen_type"]
    elif "sample_input_file" in flags or "prompt" in flags:
        mode = "input-file"
    elif "text_gen_type" in cfg:
        mode = cfg["text_gen_type"]
    elif "sample_input_file" in cfg or "prompt" in cfg:
        mode = "input-file"
    else:
        mode = "unconditional"
    if mode == "input-file" and "prompt" in flags and "sample_input_file" not in flags:
        merged.pop("sample_input_file", None)  # --prompt replaces the config's input file
    fields = {f.name for f in dataclasses.fields(Settings)}
    kwargs = {k: v for k, v in merged.items() if k in fields}
    kwargs["text_gen_type"] = mode
    kwargs["tp"] = tp
    if "stop" in kwargs:
        kwargs["stop"] = tuple(kwargs["stop"])
    return Settings(**kwargs, model_config=cfg)


# -- input and output -------------------------------------------------------------------------------
def read_prompts(path: str, prompt_end: str = "\n", on_invalid_utf8: str = "fail", warn=None) -> list[str]:
    """Prompts of an input file: split on prompt_end, stripped, empty ones dropped."""
    raw = read_bytes(path, "input file")
    lines = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            if on_invalid_utf8 != "skip":
                raise NeoxRtError(f"input file {path}: line {number} is not valid UTF-8 (byte {e.start + 1}); "
                                  f"fix it or pass --on-invalid-utf8 skip") from None
            (warn or _warn)(f"input file {path}: skipping line {number}: not valid UTF-8")
    text = "\n".join(lines)
    prompts = [p.strip() for p in text.split(prompt_end)]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise NeoxRtError(f"input file {path} holds no prompts" + (" (it is empty)" if not raw.strip() else ""))
    return prompts


def read_done(path: str, contexts: list[str], warn=None) -> int:
    """How many leading prompts already have records in ``path`` (for --resume).

    Records must match the prompts' contexts in order. A last line cut off by an interrupted write is
    removed from the file, so that appending continues on a clean line.
    """
    if not os.path.exists(path):
        return 0
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise NeoxRtError(f"cannot read output file {path} to resume: {e.strerror or e}") from None
    done, offset = 0, 0
    lines = data.split(b"\n")  # the last piece is b"" when the file ends with a newline
    for index, line in enumerate(lines):
        terminated = index < len(lines) - 1
        is_final = not any(rest.strip() for rest in lines[index + 1:])
        if not line.strip():
            if not terminated:
                break
            offset += len(line) + 1
            continue
        record = None
        if terminated:
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                pass
        if not isinstance(record, dict) or "context" not in record:
            if not is_final:
                raise NeoxRtError(f"output file {path}: line {index + 1} is not a JSON record; cannot resume")
            # a record cut off by an interrupted write: drop it, its prompt runs again
            (warn or _warn)(f"output file {path}: dropping an incomplete last record (line {index + 1})")
            with open(path, "r+b") as f:
                f.truncate(offset)
            break
        if done >= len(contexts):
            raise NeoxRtError(f"output file {path} holds more records than there are prompts; cannot resume")
        if record["context"] != contexts[done]:
            raise NeoxRtError(f"output file {path}: record {done + 1} has context {record['context'][:40]!r} but "
                              f"prompt {done + 1} is {contexts[done][:40]!r}; not this input, cannot resume")
        done += 1
        offset += len(line) + 1
    return done


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def readable_record(record: dict, number: int) -> str:
    """A record for a person at a terminal: a header line, then the prompt and its continuation."""
    kind = "sample" if record["context"] == "" else "prompt"
    if record["text"] is None:
        return f"--- {kind} {number}: skipped ---\n{record['context']}\n({record['message']})\n\n"
    end = "ended" if record["finished"] else "cut at maximum_tokens"
    head = f"--- {kind} {number}: {record['length']} tokens, {end} ---"
    if record.get("message"):
        head += f" ({record['message']})"
    return f"{head}\n{record['context']}{record['text']}\n\n"


class RecordWriter:
    """JSON lines to a file (opened on first use, flushed after every record) or to stdout; to a terminal
    (no file, stdout not redirected) each record is printed readably instead (:func:`readable_record`)."""

    def __init__(self, path: str | None, append: bool):
        self.path, self.append, self.file = path, append, None
        self.readable = path is None and _stdout_is_terminal()
        self.written = 0
        if path is not None:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise NeoxRtError(f"output directory does not exist: {parent}")
            if os.path.isdir(path):
                raise NeoxRtError(f"output file {path} is a directory")

    def open(self):
        if self.file is None and self.path is not None:
            try:
                self.file = open(self.path, "a" if self.append else "w", encoding="utf-8")
            except OSError as e:
                raise NeoxRtError(f"cannot write output file {self.path}: {e.strerror or e}") from None
        return self

    def write(self, record: dict) -> None:
        out = self.open().file or sys.stdout
        self.written += 1
        if self.readable and out is sys.stdout:
            text = readable_record(record, self.written)
            encoding = getattr(out, "encoding", None) or "utf-8"
            out.write(text.encode(encoding, "replace").decode(encoding))  # a terminal that is not UTF-8
        else:
            ascii_only = out is sys.stdout and (getattr(out, "encoding", None) or "").lower().replace("-", "") != "utf8"
            out.write(json.dumps(record, ensure_ascii=ascii_only) + "\n")
        out.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def _warn(message: str) -> None:
    print(f"neox_rt: warning: {message}", file=sys.stderr)


def _info(message: str) -> None:
    print(f"neox_rt: {message}", file=sys.stderr, flush=True)


# -- generation ---------------------------------------------------------------------------------------
def make_record(context: str, result, return_logits: bool) -> dict:
    record = {"context": context, "text": result.text, "length": len(result.token_ids),
              "finished": result.finished, "message": result.message,
              "duration_seconds": round(result.duration_seconds, 6)}
    if return_logits:
        record["logprobs"] = result.logprobs
    return record


def null_record(context: str, message: str, return_logits: bool) -> dict:
    record = {"context": context, "text": None, "length": 0, "finished": False, "message": message,
              "duration_seconds": 0.0}
    if return_logits:
        record["logprobs"] = None
    return record


@dataclass
class Stats:
    prompts: int = 0
    tokens: int = 0
    seconds: float = 0.0
    ms_per_token: list = dataclasses.field(default_factory=list)

    def add(self, records: list[dict], seconds: float) -> None:
        self.seconds += seconds
        for r in records:
            self.prompts += 1
            self.tokens += r["length"]
            if r["length"]:
                self.ms_per_token.append(1000.0 * r["duration_seconds"] / r["length"])

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        mean = sum(self.ms_per_token) / len(self.ms_per_token) if self.ms_per_token else 0.0
        return (f"done: {self.prompts} prompts, {self.tokens} generated tokens in {self.seconds:.2f} s, "
                f"{rate:.1f} tokens/s, {mean:.2f} ms per token (mean)")


def _sampling_kwargs(s: Settings) -> dict:
    return dict(max_new_tokens=s.maximum_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                stop=list(s.stop), recompute=s.recompute, return_logprobs=s.return_logits)


def generate_batch(model, items: list[tuple[str, object]], s: Settings, seed: int | None,
                   on_text=None) -> tuple[list[dict], float]:
    """Records for (context, prompt) pairs, in order; a prompt too long for the context gets a null record."""
    generator = model._need_tokenizer()
    prepared, records = [], [None] * len(items)
    for j, (context, prompt) in enumerate(items):
        try:
            ids, _ = generator.prepare_prompt(prompt, s.maximum_tokens, truncate="error")
            prepared.append((j, ids))
        except NeoxRtError as e:
            if s.strict:
                raise NeoxRtError(f"prompt {context[:40]!r}: {e}") from None
            records[j] = null_record(context, f"{e}; prompt skipped", s.return_logits)
    start = time.perf_counter()
    if prepared:
        results = model.generate([ids for _, ids in prepared], seed=seed, on_text=on_text, **_sampling_kwargs(s))
        for (j, _), result in zip(prepared, results):
            records[j] = make_record(items[j][0], result, s.return_logits)
    return records, time.perf_counter() - start


def run_batches(model, items, s: Settings, writer: RecordWriter | None, first_index: int, batch_size: int,
                stats: Stats, main_rank: bool) -> None:
    total = first_index + len(items)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        seed = None if s.seed is None else s.seed + first_index + start
        records, seconds = generate_batch(model, chunk, s, seed)
        stats.add(records, seconds)
        if main_rank:
            for record in records:
                writer.write(record)
            done = first_index + start + len(chunk)
            _info(f"{done}/{total} prompts, {sum(r['length'] for r in records)} tokens in {seconds:.2f} s")


def read_interactive(stream, prompt_end: str) -> str | None:
    """One prompt from ``stream``: a line, or with another prompt_end the lines up to one that ends with it.
    None at EOF (with nothing read) or on exit / quit."""
    sys.stdout.write(INTERACTIVE_PROMPT)
    sys.stdout.flush()
    parts = []
    while True:
        line = stream.readline()
        if not line:
            if not parts:
                return None
            break
        if prompt_end == "\n":
            parts.append(line.rstrip("\n"))
            break
        body = line.rstrip("\n")
        if body.endswith(prompt_end):
            parts.append(body[:-len(prompt_end)])
            break
        parts.append(line)
    text = "".join(parts) if prompt_end != "\n" else parts[0]
    if text.strip() in ("exit", "quit"):
        return None
    return text.strip()


def run_interactive(model, s: Settings, writer: RecordWriter | None, stats: Stats, tp) -> None:
    main_rank = tp.is_main
    index = 0
    while True:
        prompt = read_interactive(sys.stdin, s.prompt_end) if main_rank else None
        prompt = share(prompt, tp)
        if prompt is None:
            if main_rank:
                sys.stdout.write("\n")
                sys.stdout.flush()
            return
        item = (prompt, prompt if prompt else [model.tokenizer.eos_id])

        def on_text(_, delta):
            sys.stdout.write(delta)
            sys.stdout.flush()

        seed = None if s.seed is None else s.seed + index
        records, seconds = generate_batch(model, [item], s, seed, on_text=on_text if main_rank else None)
        index += 1
        record = records[0]
        stats.add(records, seconds)
        if main_rank:
            if record["text"] is None:
                sys.stdout.write(f"neox_rt: {record['message']}; try a shorter prompt")
            sys.stdout.write("\n")
            sys.stdout.flush()
            if writer is not None and writer.path is not None:
                writer.write(record)


# -- model and parallelism --------------------------------------------------------------------------------
def share(obj, tp):
    """Rank 0's ``obj`` on every rank (prompts are read on rank 0 only)."""
    if tp.size == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def setup_parallel(s: Settings, device_type: str):
    from neox_rt import parallel
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp_size = s.tp
    if tp_size is None:
        tp_size = s.model_parallel_size if (s.model_parallel_size > 1 and world > 1) else 1
    if tp_size == 1 and world == 1:
        return parallel.SINGLE
    return parallel.init_from_env(tp_size, device_type)


def load_model(s: Settings, device: str, dtype: str, tp, main_rank: bool):
    """The model: the embedded default, an HF checkpoint, or a checkpoint whose shape the config gives."""
    import neox_rt
    from neox_rt.checkpoints.hf import resolve_checkpoint
    from neox_rt.checkpoints.neox import is_neox_checkpoint
    from neox_rt.default_model import load_default
    progress = main_rank and sys.stderr.isatty()
    if s.load is None:
        if s.vocab_file is not None:
            raise NeoxRtError("--tokenizer needs --model (the embedded default model has its own tokenizer)")
        if s.quantize is not None:
            from neox_rt.default_model import default_model_path
            from neox_rt.quant.apply import quantize_model
            if default_model_path() is not None:
                return neox_rt.load(default_model_path(), dtype=dtype, device=device, tp=tp, progress=False,
                                    quantize=s.quantize, group_size=s.group_size, quantize_lm_head=s.quantize_lm_head)
            stand_in = load_default(dtype, device, tp=tp, notice=main_rank)
            quantize_model(stand_in.model, s.quantize, s.group_size, include_lm_head=s.quantize_lm_head)
            return stand_in
        return load_default(dtype, device, tp=tp, notice=main_rank)
    directory = resolve_checkpoint(s.load)  # a missing checkpoint is named before a missing tokenizer
    tokenizer = neox_yaml.resolve_vocab_file(s.vocab_file, directory)
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise NeoxRtError(f"tokenizer not found: {tokenizer}")
    if is_neox_checkpoint(directory):
        # gpt-neox native layout (latest + global_stepN/): neox_checkpoint reshards it to tp; the shape comes
        # from our config when it has one, else from the YAML files saved in the checkpoint
        config = s.model_config if neox_yaml.has_model_shape(s.model_config) else None
        return neox_rt.load(directory, dtype=dtype, device=device, tokenizer=tokenizer, tp=tp,
                            progress=progress, config=config,
                            quantize=s.quantize, group_size=s.group_size, quantize_lm_head=s.quantize_lm_head)
    no_config_json = os.path.isdir(directory) and not os.path.isfile(os.path.join(directory, "config.json"))
    if no_config_json and neox_yaml.has_model_shape(s.model_config):
        # HF-format weights without a config.json: the shape comes from the YAML config
        from neox_rt.engine.tokenizer import Tokenizer
        tok_size = Tokenizer(tokenizer).vocab_size if tokenizer is not None else None
        config = neox_yaml.to_model_config(s.model_config, tok_size)
        return neox_rt.load(directory, dtype=dtype, device=device, tokenizer=tokenizer, tp=tp, progress=progress,
                            config=config, quantize=s.quantize, group_size=s.group_size,
                            quantize_lm_head=s.quantize_lm_head)
    return neox_rt.load(directory, dtype=dtype, device=device, tokenizer=tokenizer, tp=tp, progress=progress,
                        quantize=s.quantize, group_size=s.group_size, quantize_lm_head=s.quantize_lm_head)


def _device(s: Settings) -> str:
    import torch
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise NeoxRtError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise NeoxRtError(f"device {device} requested but CUDA is not available (use --device cpu)")
    return device


# -- main -----------------------------------------------------------------------------------------------
def run(argv=None) -> int:
    s = parse_settings(argv)
    device = _device(s)
    import torch
    device_type = torch.device(device).type
    dtype = s.dtype or ("float16" if device_type == "cuda" else "float32")
    tp = setup_parallel(s, device_type)
    try:
        return _run(s, device, device_type, dtype, tp)
    finally:
        if tp.size > 1:
            _leave_process_group()


def _leave_process_group() -> None:
    """Tear the process group down before exit (an abandoned gloo/NCCL group can abort at shutdown)."""
    import torch.distributed as dist
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - already failing; keep the real error
            pass


def _run(s: Settings, device: str, device_type: str, dtype: str, tp) -> int:
    main_rank = tp.is_main

    # rank 0 reads the prompts (and what a resumed run already did); the other ranks get them
    plan = None
    if main_rank:
        try:
            plan = ("ok", _plan(s))
        except NeoxRtError as e:
            plan = ("error", str(e))
    plan = share(plan, tp)
    if plan[0] == "error":
        raise NeoxRtError(plan[1]) if main_rank else _QuietExit(2)
    items, done = plan[1]

    t0 = time.perf_counter()
    model = load_model(s, device, dtype, tp, main_rank)
    if model.tokenizer is None:
        raise NeoxRtError(f"checkpoint {s.load} has no tokenizer.json: pass --tokenizer FILE "
                          f"(e.g. 20B_tokenizer.json) or vocab-file in the config")
    positions = model.config.max_position_embeddings
    if s.maximum_tokens >= positions:
        raise NeoxRtError(f"maximum_tokens ({s.maximum_tokens}) must be below the model's {positions} positions")
    if main_rank:
        c = model.config
        _info(f"model {model.path or 'embedded default'}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
              f"{c.num_parameters() / 1e6:.1f}M parameters, {device} {dtype}"
              f"{f', tp {tp.size}' if tp.size > 1 else ''}, loaded in {time.perf_counter() - t0:.1f} s")
        report = model.memory_report()
        if report.quantized_linears:
            _info(f"quantized: {report}")

    items = [(context, [model.tokenizer.eos_id] if prompt is None else prompt) for context, prompt in items]
    writer = RecordWriter(s.sample_output_file, append=s.resume) if main_rank else None
    stats = Stats()
    try:
        if s.text_gen_type == "interactive":
            run_interactive(model, s, writer, stats, tp)
        else:
            if main_rank and done:
                _info(f"resuming: {done} prompts already in {s.sample_output_file}, {len(items)} to go")
            if main_rank and s.sample_output_file is not None and not (s.resume and not items):
                writer.open()  # create (or truncate) the file even if every prompt was done before
            batch_size = s.batch_size or (8 if device_type == "cuda" else 4)
            run_batches(model, items, s, writer, done, batch_size, stats, main_rank)
    finally:
        if writer is not None:
            writer.close()
    if main_rank:
        _info(stats.summary())
    return 0


def _plan(s: Settings) -> tuple[list[tuple[str, object]], int]:
    """(context, prompt) pairs still to generate, and how many a resumed run already has."""
    if s.sample_output_file is not None:
        RecordWriter(s.sample_output_file, append=True)  # checks the directory early
    if s.text_gen_type == "interactive":
        return [], 0
    if s.text_gen_type == "unconditional":
        contexts = [""] * s.num_samples
        prompts = [None] * s.num_samples  # <|endoftext|>, filled in once the tokenizer is known
    elif s.prompt is not None:
        contexts = prompts = [s.prompt.strip() or s.prompt]
    else:
        contexts = prompts = read_prompts(s.sample_input_file, s.prompt_end, s.on_invalid_utf8)
    done = read_done(s.sample_output_file, contexts) if s.resume else 0
    return list(zip(contexts, prompts))[done:], done


class _QuietExit(Exception):
    def __init__(self, code: int):
        self.code = code


def main(argv=None) -> int:
    """Run the command; returns the exit status (0, 2 on bad input, 130 when interrupted)."""
    rank = os.environ.get("RANK", "0")
    prefix = "neox_rt" if rank == "0" else f"neox_rt[rank {rank}]"
    try:
        return run(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, message already printed)
        return e.code if isinstance(e.code, int) else 2
    except _QuietExit as e:
        return e.code
    except NeoxRtError as e:
        print(f"{prefix}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (e.g. piped into head)
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"{prefix}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        try:
            sys.stderr.write("\n")
        except Exception:  # noqa: BLE001
            pass
        return 130


if __name__ == "__main__":
    sys.exit(main())
