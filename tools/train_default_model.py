#!/usr/bin/env python3
"""Train neox_rt's embedded default model: a small GPT-NeoX on Python source code.

The architecture is the real GPT-NeoX one (parallel residual, partial rotary 0.25, untied embeddings,
erf gelu) in HF ``config.json`` format, trained with transformers' ``GPTNeoXForCausalLM`` and torch AdamW
(bf16 autocast on a GPU). The text is the ``*.py`` files of the running interpreter's standard library (test
suites excluded), sorted by path, plus (``--extra-corpus``) the Python sources of permissively licensed PyPI
packages built by ``tools/build_default_corpus.py`` (``.corpus/extra.txt.xz``; per-package names, versions,
licenses and sizes in ``tools/default_model_corpus.json``), every file preceded by ``<|endoftext|>``. A fixed
list of stdlib files (:data:`HELDOUT_FILES`) is held out of both the tokenizer's and the model's training and
gives the held-out perplexity; extra files that share long lines with them are dropped here once more.

Modes::

    # train (GPU: 7.5 minutes of optimisation, ~9 minutes in all; CPU smoke test with --tiny)
    python tools/train_default_model.py --out $OUT/default_model --minutes 7.5 --device cuda --seed 0 \
        --extra-corpus .corpus/extra.txt.xz --compile --dropout 0
    python tools/train_default_model.py --out /tmp/x --minutes 0.3 --device cpu --tiny \
        --extra-corpus .corpus/extra.txt.xz
    # recompute tests/data/default_model_golden.json and the card's heldout_sample_perplexity (CPU fp32)
    python tools/train_default_model.py --write-golden neox_rt/default_model
    # rewrite tests/data/heldout_sample.txt from this interpreter's held-out files
    python tools/train_default_model.py --write-sample

Perplexity (both the held-out files and the stored sample) is token-level: the token ids are cut into
chunks of ``max_position_embeddings - 1`` tokens, each chunk is scored after a leading ``<|endoftext|>``
(so every token of the text is predicted exactly once) and ppl = exp(total NLL / number of tokens).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import os
import platform
import re
import sys
import sysconfig
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

HELDOUT_FILES = (
    "textwrap.py", "calendar.py", "fractions.py", "shlex.py", "fnmatch.py",
    "heapq.py", "graphlib.py", "sched.py", "colorsys.py", "reprlib.py",
)
"""Held-out stdlib modules (present in Python 3.9 to 3.13); never seen by the tokenizer or the model."""

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                           "lib2to3", "turtledemo"})
"""Directories of the stdlib tree that are not library source (test suites, installed packages)."""

SAMPLE_PATH = os.path.join(REPO, "tests", "data", "heldout_sample.txt")
GOLDEN_PATH = os.path.join(REPO, "tests", "data", "default_model_golden.json")
SAMPLE_CHARS_PER_FILE = 800
"""The stored sample holds the first ~800 characters (whole lines) of each held-out file: ~8 KB."""

GOLDEN_PROMPTS = ("def fibonacci(n):", "import os\n", "class Stack:", "    def __init__(self",
                  '"""Utilities for')
GOLDEN_NEW_TOKENS = 32

EOS, PAD = "<|endoftext|>", "<|padding|>"

# Model shapes. Full: hidden 384, 6 layers, 6 heads of 64 -> 13.77M parameters (10.62M without the two
# 4096 x 384 embeddings), 27.5 MB in fp16. (The first default model, 6.84M parameters: hidden 256, 4 heads.)
SHAPES = {
    "full": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, vocab_size=4096,
                 max_position_embeddings=1024, seq_len=1024, batch_size=64, lr=1.5e-3, warmup=200),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=512,
                 max_position_embeddings=256, seq_len=128, batch_size=16, lr=3e-3, warmup=10),
}
MAX_CHECKPOINT_BYTES = 16 * 2**20  # files come back from the GPU machine only up to 16 MiB
MAX_SHARD_SIZE = "15MB"
"""save_pretrained's shard limit (15e6 bytes < 15 MiB): the weights go out as model-0000k-of-0000n.safetensors."""

TOOLS = os.path.dirname(os.path.abspath(__file__))
MANIFEST_PATH = os.path.join(TOOLS, "default_model_corpus.json")
EXTRA_SEPARATOR = "\x00"
TOKENIZER_EXTRA_CHARS = 60_000_000
"""The tokenizer trains on the stdlib files plus an evenly spread subset of the extra files of about this size."""
TINY_EXTRA_CHARS = 2_000_000


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------

def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training files, held-out files) as (relative posix path, text), sorted by path.

    Files under :data:`EXCLUDED_DIRS` and files that are not UTF-8 are skipped.
    """
    root = root or stdlib_root()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                paths.append(name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}")
    train, heldout = [], []
    for rel in sorted(paths):
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        (heldout if rel in HELDOUT_FILES else train).append((rel, text))
    return train, heldout


def read_manifest(path: str = MANIFEST_PATH) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


_LEAK_DOCS: list[str] = []
_LEAK_LINES: set[str] = set()


def _leak_flags(bounds: tuple[int, int]) -> list[bool]:
    from build_default_corpus import shares_heldout
    return [shares_heldout(_LEAK_DOCS[i], _LEAK_LINES) for i in range(*bounds)]


def extra_files(path: str, heldout: list[tuple[str, str]], train_texts: list[str],
                max_chars: int | None = None) -> tuple[list[str], dict]:
    """The extra corpus's files (NUL-separated text, xz), less any that could leak the held-out files.

    Dropped: files that share long lines with this machine's held-out files (the build's check, repeated
    against the real held-out text) and files identical to a stdlib training file. ``max_chars``: only the
    first files up to about that many characters (the smoke test).
    """
    global _LEAK_DOCS, _LEAK_LINES
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    from build_default_corpus import leak_lines
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        blob = f.read()
    sha = hashlib.sha256(blob).hexdigest()
    docs = lzma.decompress(blob).decode("utf-8").split(EXTRA_SEPARATOR)
    del blob
    info = dict(path=path, sha256=sha, files_in_file=len(docs))
    if max_chars is not None:
        n, total = 0, 0
        while n < len(docs) and total < max_chars:
            total += len(docs[n])
            n += 1
        docs = docs[:n]
    _LEAK_DOCS, _LEAK_LINES = docs, leak_lines({rel: [text] for rel, text in heldout})
    workers = min(16, os.cpu_count() or 1)
    step = -(-len(docs) // (workers * 4))
    bounds = [(i, min(len(docs), i + step)) for i in range(0, len(docs), step)]
    if workers > 1 and len(docs) > 1000:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            flags = [x for part in pool.map(_leak_flags, bounds) for x in part]
    else:
        flags = [x for b in bounds for x in _leak_flags(b)]
    stdlib_hashes = {hashlib.sha256(t.encode("utf-8")).digest() for t in train_texts}
    kept, leaks, dups = [], 0, 0
    for text, leak in zip(docs, flags):
        if leak:
            leaks += 1
        elif hashlib.sha256(text.encode("utf-8")).digest() in stdlib_hashes:
            dups += 1
        else:
            kept.append(text)
    _LEAK_DOCS, _LEAK_LINES = [], set()
    info.update(files_read=len(docs), dropped_heldout_lines=leaks, dropped_stdlib_duplicates=dups,
                files=len(kept), chars=sum(len(t) for t in kept), seconds=round(time.perf_counter() - t0, 1))
    return kept, info


def tokenizer_subset(stdlib_texts: list[str], extra: list[str], extra_chars: int) -> list[str]:
    """The stdlib files plus every k-th extra file, k chosen so that about ``extra_chars`` are taken."""
    total = sum(len(t) for t in extra)
    k = max(1, round(total / extra_chars)) if extra_chars else len(extra) + 1
    return stdlib_texts + extra[::k]


def heldout_sample(heldout: list[tuple[str, str]]) -> str:
    """The first whole lines (up to :data:`SAMPLE_CHARS_PER_FILE` characters) of each held-out file."""
    parts = []
    for _, text in heldout:
        head = text[:SAMPLE_CHARS_PER_FILE]
        if len(text) > SAMPLE_CHARS_PER_FILE and "\n" in head:
            head = head[:head.rindex("\n") + 1]
        parts.append(head)
    return "\n".join(parts)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE like GPT-NeoX's: <|endoftext|> = 0, <|padding|> = 1, no prefix space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    assert tok.token_to_id(EOS) == 0 and tok.token_to_id(PAD) == 1
    return tok


def encode_corpus(tok, texts: list[str], batch: int = 2048) -> torch.Tensor:
    """All texts as one int32 stream: <eos> file0 <eos> file1 ... (every file follows an <eos>).

    ``encode_batch`` runs on all cores; batches keep the Encoding objects (offsets etc.) few at a time.
    """
    import numpy as np
    eos = tok.token_to_id(EOS)
    parts = []
    for i in range(0, len(texts), batch):
        for enc in tok.encode_batch(texts[i:i + batch], add_special_tokens=False):
            ids = np.empty(len(enc.ids) + 1, dtype=np.int32)
            ids[0] = eos
            ids[1:] = enc.ids
            parts.append(ids)
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int32)


def scoring_chunks(ids: list[int], max_positions: int, eos: int) -> list[list[int]]:
    """[eos] + each run of max_positions - 1 ids: every id is predicted once (see the module docstring)."""
    step = max_positions - 1
    return [[eos] + ids[i:i + step] for i in range(0, len(ids), step)]


def sample_perplexity(neox, text: str) -> tuple[float, int]:
    """(perplexity, tokens) of ``text`` under a loaded ``neox_rt`` model, via ``NeoX.score``."""
    tok = neox.tokenizer
    nll, count = 0.0, 0
    for chunk in scoring_chunks(tok.encode(text), neox.config.max_position_embeddings, tok.eos_id):
        _, logprobs = neox.score(chunk)
        nll -= math.fsum(logprobs)
        count += len(logprobs)
    return math.exp(nll / count), count


# ----------------------------------------------------------------------------------------------------
# Model and training
# ----------------------------------------------------------------------------------------------------

def hf_config(shape: dict, dropout: float):
    from transformers import GPTNeoXConfig
    h = shape["hidden_size"]
    return GPTNeoXConfig(
        vocab_size=shape["vocab_size"], hidden_size=h, num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"], intermediate_size=4 * h,
        max_position_embeddings=shape["max_position_embeddings"], rotary_pct=0.25, rotary_emb_base=10000,
        use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=0, hidden_dropout=dropout, attention_dropout=0.0,
        initializer_range=0.02)


def lr_at(step: int, total: int, peak: float, warmup: int, time_fraction: float = 0.0,
          floor: float = 0.1) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine down to ``floor * peak`` at ``total``.

    ``time_fraction`` (elapsed / budget, 0 with --steps) moves the cosine along if the steps run slower
    than measured, so a time-budgeted run always ends decayed.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def batch_at(data: torch.Tensor, seq_len: int, batch_size: int, gen: torch.Generator, device):
    """Random windows of seq_len + 1 tokens -> (inputs [b, seq_len], targets [b, seq_len]) int64."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None]  # [b, seq_len + 1]
    win = data[idx.to(data.device)].long()
    return win[:, :-1].to(device, non_blocking=True), win[:, 1:].to(device, non_blocking=True)


@torch.no_grad()
def heldout_nll(model, chunks: list[list[int]], device, autocast: bool) -> tuple[float, int]:
    """(total NLL, predicted tokens) of the scoring chunks, one chunk at a time."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for chunk in chunks:
        ids = torch.tensor([chunk], device=device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids).logits[0, :-1].float()  # [n-1, V]
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += len(chunk) - 1
    model.train(was_training)
    return nll, count


def decay_groups(model, weight_decay: float):
    """Weight decay on matrices (linear weights, embeddings), none on biases and LayerNorms."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(args) -> dict:
    from transformers import GPTNeoXForCausalLM
    t_start = time.perf_counter()
    shape = dict(SHAPES["tiny" if args.tiny else "full"])
    for key in ("batch_size", "lr"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    train_files, heldout = stdlib_files()
    if args.tiny:  # a CPU smoke test: every 8th file
        train_files = train_files[::8]
    missing = sorted(set(HELDOUT_FILES) - {rel for rel, _ in heldout})
    log(f"stdlib {stdlib_root()} (Python {platform.python_version()}): {len(train_files)} training files, "
        f"{sum(len(t) for _, t in train_files) / 1e6:.2f} M chars; held out {len(heldout)} files"
        + (f" (missing here: {', '.join(missing)})" if missing else ""))

    t0 = time.perf_counter()
    stdlib_texts = [t for _, t in train_files]
    extra, extra_info = [], None
    if args.extra_corpus:
        max_chars = args.extra_max_chars if args.extra_max_chars is not None else (
            TINY_EXTRA_CHARS if args.tiny else None)
        extra, extra_info = extra_files(args.extra_corpus, heldout, stdlib_texts, max_chars)
        log(f"extra corpus {args.extra_corpus}: {extra_info['files']:,} files, {extra_info['chars'] / 1e6:.1f} M chars "
            f"(dropped: {extra_info['dropped_heldout_lines']} sharing held-out lines, "
            f"{extra_info['dropped_stdlib_duplicates']} stdlib copies) in {extra_info['seconds']} s")
    t1 = time.perf_counter()
    tok_texts = tokenizer_subset(stdlib_texts, extra, TOKENIZER_EXTRA_CHARS)
    tok = train_tokenizer(tok_texts, shape["vocab_size"])
    tok_seconds = time.perf_counter() - t1
    t1 = time.perf_counter()
    stdlib_data = encode_corpus(tok, stdlib_texts)
    extra_data = encode_corpus(tok, extra)
    encode_seconds = time.perf_counter() - t1
    # The stdlib (the held-out files' own distribution) is repeated --stdlib-repeat times in the stream.
    data = torch.cat([stdlib_data] * max(1, args.stdlib_repeat) + [extra_data])
    eos = tok.token_to_id(EOS)
    heldout_chunks = []
    for _, text in heldout:
        heldout_chunks += scoring_chunks(tok.encode(text, add_special_tokens=False).ids,
                                         shape["max_position_embeddings"], eos)
    prep_seconds = time.perf_counter() - t0
    stdlib_chars = sum(len(t) for t in stdlib_texts)
    extra_chars = sum(len(t) for t in extra)
    log(f"tokenizer {tok.get_vocab_size()} entries from {sum(len(t) for t in tok_texts) / 1e6:.1f} M chars in "
        f"{tok_seconds:.1f} s; encoded in {encode_seconds:.1f} s: stdlib {stdlib_data.numel():,} tokens "
        f"({stdlib_chars / max(1, stdlib_data.numel()):.2f} chars/token), extra {extra_data.numel():,} tokens "
        f"({extra_chars / max(1, extra_data.numel()):.2f} chars/token); stream {data.numel():,} tokens; "
        f"prep {prep_seconds:.1f} s")
    del extra
    data = data.to(device)

    config = hf_config(shape, args.dropout)
    model = GPTNeoXForCausalLM(config).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters ({2 * n_params / 2**20:.1f} MiB in fp16)")
    opt = torch.optim.AdamW(decay_groups(model, args.weight_decay), lr=shape["lr"], betas=(0.9, 0.95),
                            eps=1e-8, fused=gpu)
    def loss_of(x, y):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=gpu):
            logits = model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))

    step_fn = loss_of
    if args.compile:
        import torch._dynamo as dynamo
        dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly
        step_fn = torch.compile(loss_of)
    gen = torch.Generator().manual_seed(args.seed)
    seq_len, bsz, warmup = shape["seq_len"], shape["batch_size"], shape["warmup"]
    budget = args.minutes * 60.0
    total = args.steps  # None: fixed from the measured step time after the calibration steps
    # The step count is fixed at the end of warmup from the time of its second half (the LR before it
    # does not depend on the total), so the cosine schedule is exact and the card's --steps reproduces it.
    calib_from, calib_to = warmup // 2, warmup
    curve = []
    eval_subset = heldout_chunks[:16]
    step, t_calib, eval_every = 0, None, None
    loss_sum, loss_n = torch.zeros((), device=device), 0

    def record(lr):
        nonlocal loss_n
        nll, n = heldout_nll(model, eval_subset, device, autocast=gpu)
        point = dict(step=step, seconds=round(time.perf_counter() - t_train, 1), lr=float(f"{lr:.3g}"),
                     train_loss=round(loss_sum.item() / max(1, loss_n), 4), heldout_loss_subset=round(nll / n, 4))
        loss_sum.zero_()
        loss_n = 0
        curve.append(point)
        log(f"step {step}/{total}  " + "  ".join(f"{k} {v}" for k, v in point.items() if k != "step"))

    t_train = time.perf_counter()
    lr = 0.0
    while total is None or step < total:
        if step == calib_from:
            sync(device)
            t_calib = time.perf_counter()
        if total is None and step == calib_to:
            sync(device)
            per_step = (time.perf_counter() - t_calib) / (calib_to - calib_from)
            left = budget - (time.perf_counter() - t_train)
            total = max(calib_to + 1, calib_to + int(left / per_step))
            log(f"{per_step * 1e3:.1f} ms/step, {bsz * seq_len / per_step:,.0f} tokens/s -> {total} steps")
        if eval_every is None and total is not None:
            eval_every = max(1, total // 8)
        elapsed = time.perf_counter() - t_train
        if args.steps is None and total is not None and elapsed >= budget:
            log(f"time budget reached at step {step} of {total}")
            total = step
            break
        lr = lr_at(step, total or 10**9, shape["lr"], warmup, elapsed / budget if args.steps is None else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch_at(data, seq_len, bsz, gen, device)
        loss = step_fn(x, y)
        if step == 0:
            sync(device)
            log(f"first step (compile included) {time.perf_counter() - t_train:.1f} s")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_sum += loss.detach()
        loss_n += 1
        step += 1
        if eval_every is not None and step % eval_every == 0:
            record(lr)
    if not curve or curve[-1]["step"] != step:
        record(lr)
    sync(device)
    train_seconds = time.perf_counter() - t_train

    # Save the shipped form (fp16) and evaluate exactly those weights in fp32.
    os.makedirs(args.out, exist_ok=True)
    model = model.eval().half()
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    fix_config(os.path.join(args.out, "config.json"))
    gen_config = os.path.join(args.out, "generation_config.json")
    if os.path.isfile(gen_config):  # neox_rt does not read it; one file fewer to bring back
        os.remove(gen_config)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    model = model.float()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    nll, n = heldout_nll(model, heldout_chunks, device, autocast=False)
    heldout_text_chars = sum(len(t) for _, t in heldout)

    import neox_rt
    neox = neox_rt.load(args.out, dtype="float32", device="cpu", progress=False)
    sample_ppl, sample_tokens = sample_perplexity(neox, read_sample())
    extra_files_n = extra_info["files"] if extra_info else 0
    results = dict(
        seed=args.seed, python_version=platform.python_version(), train_files=len(train_files) + extra_files_n,
        stdlib_files=len(train_files), stdlib_chars=stdlib_chars, stdlib_tokens=int(stdlib_data.numel()),
        stdlib_repeat=max(1, args.stdlib_repeat), extra_files=extra_files_n, extra_chars=extra_chars,
        extra_tokens=int(extra_data.numel()), extra=extra_info, train_chars=stdlib_chars + extra_chars,
        train_tokens=int(stdlib_data.numel() + extra_data.numel()), stream_tokens=int(data.numel()),
        tokenizer_chars=sum(len(t) for t in tok_texts), vocab_size=tok.get_vocab_size(),
        heldout_files=[rel for rel, _ in heldout], heldout_chars=heldout_text_chars, heldout_tokens=n,
        heldout_loss=round(nll / n, 5), heldout_perplexity=round(math.exp(nll / n), 4),
        heldout_nats_per_char=round(nll / heldout_text_chars, 5),
        heldout_bits_per_char=round(nll / heldout_text_chars / math.log(2), 5),
        epochs=round(step * bsz * seq_len / max(1, data.numel()), 2),
        heldout_sample_tokens=sample_tokens, heldout_sample_perplexity=round(sample_ppl, 6),
        parameters=n_params, steps=step, batch_size=bsz, seq_len=seq_len, tokens_seen=step * bsz * seq_len,
        peak_lr=shape["lr"], warmup_steps=warmup, weight_decay=args.weight_decay, dropout=args.dropout,
        train_seconds=round(train_seconds, 1), prep_seconds=round(prep_seconds, 1),
        tokenizer_seconds=round(tok_seconds, 1), encode_seconds=round(encode_seconds, 1),
        hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        tokens_per_second=round(step * bsz * seq_len / train_seconds),
        total_seconds=round(time.perf_counter() - t_start, 1), device=device_name(device),
        torch=torch.__version__, transformers=__import__("transformers").__version__,
        tokenizers=__import__("tokenizers").__version__, tiny=bool(args.tiny), compile=bool(args.compile),
        command=" ".join(["python", "tools/train_default_model.py"] + sys.argv[1:]), curve=curve)
    results.update(weight_files=len(weight_files(args.out)), max_shard_size=args.max_shard_size)
    write_card(args.out, results)
    return results


def fix_config(path: str) -> None:
    """Inference config: no dropout; the classic GPT-NeoX rotary fields next to transformers 5's."""
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0, rotary_pct=0.25,
               rotary_emb_base=10000, use_parallel_residual=True, tie_word_embeddings=False,
               hidden_act="gelu", bos_token_id=0, eos_token_id=0)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def log(msg: str) -> None:
    print(f"[train_default_model] {msg}", flush=True)


def read_sample() -> str:
    with open(SAMPLE_PATH, encoding="utf-8", newline="") as f:
        return f.read()


# ----------------------------------------------------------------------------------------------------
# Model card and golden outputs
# ----------------------------------------------------------------------------------------------------

CARD_KEYS = ("seed", "python_version", "train_files", "train_tokens", "steps", "tokens_seen", "train_seconds",
             "tokens_per_second", "device", "parameters", "heldout_loss", "heldout_perplexity",
             "heldout_bits_per_char", "heldout_sample_perplexity")


def license_list(packages: list[dict]) -> str:
    """'MIT: attrs 26.1.0, black 26.10.1, ...; BSD-3-Clause: ...' from the manifest's kept packages."""
    groups: dict[str, list[str]] = {}
    for p in packages:
        if p["files"]:
            groups.setdefault(p["license"], []).append(f"{p['name']} {p['version']}")
    order = sorted(groups, key=lambda k: (-len(groups[k]), k))
    return "\n".join(f"  - {lic}: {', '.join(sorted(groups[lic], key=str.lower))}" for lic in order)


def write_card(out: str, r: dict) -> None:
    front = "\n".join(f"{k}: {json.dumps(r[k])}" for k in CARD_KEYS if k in r)
    curve = "\n".join(f"| {p['step']} | {p['seconds']} | {p['lr']:.2e} | {p['train_loss']} | "
                      f"{p['heldout_loss_subset']} |" for p in r["curve"])
    manifest = read_manifest() if r.get("extra") else None
    extra = r.get("extra")
    if extra:
        pkgs = [p for p in (manifest or {}).get("packages", []) if p["files"]]
        matches = manifest is not None and manifest.get("sha256") == extra["sha256"]
        part = extra["files_read"] < extra["files_in_file"]
        where = (f"the first {extra['files_read']:,} of the {extra['files_in_file']:,} files of"
                 if part else "all the files of")
        data = f"""- Data, {r['train_chars']:,} characters, {r['train_tokens']:,} tokens in all (each file preceded by
  `<|endoftext|>`; the stdlib part appears {r['stdlib_repeat']} times in the training stream of {r['stream_tokens']:,} tokens):
  - {r['stdlib_files']} `*.py` files of the Python {r['python_version']} stdlib (test suites, `site-packages`, `lib2to3`,
    `turtledemo` excluded): {r['stdlib_chars']:,} characters, {r['stdlib_tokens']:,} tokens, PSF license.
  - {r['extra_files']:,} `*.py` files of PyPI packages: {where} `{os.path.basename(extra['path'])}` (sha256
    `{extra['sha256'][:16]}...`{'' if matches else ', NOT the corpus that tools/default_model_corpus.json describes'}):
    {r['extra_chars']:,} characters, {r['extra_tokens']:,} tokens; built by `tools/build_default_corpus.py`
    from the pinned wheels (test folders, vendored third-party trees, generated and non-UTF-8 files left out;
    at most {(manifest or {}).get('filters', {}).get('max_package_chars', 0):,} characters per package; exact duplicates dropped);
    {extra['dropped_heldout_lines']} more files dropped here for sharing long lines with the held-out files and
    {extra['dropped_stdlib_duplicates']} as copies of stdlib files. Per-package versions, licenses, files and
    characters: `tools/default_model_corpus.json`. Packages by license (as their wheels' metadata states it):
{license_list(pkgs)}"""
        about = ("the source code of the Python standard library and of\n"
                 f"{len(pkgs)} permissively licensed (MIT, BSD, Apache-2.0, PSF, ISC) PyPI packages")
    else:
        data = f"""- Data: {r['train_files']} `*.py` files of the Python {r['python_version']} stdlib (test suites,
  `site-packages`, `lib2to3`, `turtledemo` excluded), sorted by path, joined with `<|endoftext|>`:
  {r['train_chars']:,} characters, {r['train_tokens']:,} tokens. The text is under the PSF license."""
        about = f"the source code of the Python {r['python_version']} standard library"
    tok_data = "the same files" if not extra else (
        f"the stdlib files and {r['tokenizer_chars'] - r['stdlib_chars']:,} characters of the others (every k-th file)")
    text = f"""---
library_name: neox_rt
model_type: gpt_neox
{front}
---
# neox_rt default model

A {r['parameters'] / 1e6:.2f}M-parameter GPT-NeoX (hidden {r['hidden_size']}, {r['num_hidden_layers']} layers,
{r['num_attention_heads']} heads of 64; parallel residual, rotary on 25% of each head's dims, untied embeddings,
erf gelu) trained from scratch on {about},
with a byte-level BPE tokenizer of {r['vocab_size']} entries trained on {tok_data}
(`<|endoftext|>` = 0, `<|padding|>` = 1). It writes Python-looking code; it knows nothing else. It exists so that neox_rt runs
out of the box and its tests have a real trained model; it is not a useful language model.

- Command: `{r['command']}`
- Seed {r['seed']}; {r['device']}; torch {r['torch']}, transformers {r['transformers']}, tokenizers {r['tokenizers']}
{data}
- Held out of the tokenizer and of training: {', '.join(f'`{f}`' for f in r['heldout_files'])}
  ({r['heldout_chars']:,} characters, {r['heldout_tokens']:,} tokens).
- Training: {r['steps']} AdamW steps (betas 0.9/0.95, weight decay {r['weight_decay']}, peak LR
  {r['peak_lr']}, {r['warmup_steps']} warmup steps, cosine to 10% over the steps or the time budget), batch {r['batch_size']} x {r['seq_len']}
  tokens, dropout {r['dropout']} (0 in the shipped config), bf16 autocast on GPU, gradient clip 1.0{', torch.compile' if r['compile'] else ''}:
  {r['tokens_seen']:,} tokens seen ({r['epochs']} passes over the stream) in {r['train_seconds']} s ({r['tokens_per_second']:,} tokens/s);
  data preparation {r['prep_seconds']} s (tokenizer training {r['tokenizer_seconds']} s, encoding {r['encode_seconds']} s).
- Held-out loss {r['heldout_loss']} nats/token, perplexity {r['heldout_perplexity']} (fp32, the shipped
  fp16 weights, every token predicted once in chunks that start with `<|endoftext|>`); per character (comparable
  across tokenizers): {r['heldout_nats_per_char']} nats, {r['heldout_bits_per_char']} bits.
- `heldout_sample_perplexity` {r['heldout_sample_perplexity']}: the same measure on
  `tests/data/heldout_sample.txt` ({r['heldout_sample_tokens']} tokens), computed with neox_rt's reference
  runtime (CPU, float32); the tests check it.
- Weights: fp16 safetensors, {r['weight_files']} file(s) of at most {r['max_shard_size']} (`save_pretrained`'s `max_shard_size`).

| step | seconds | lr | train loss | held-out loss (first 16 chunks, bf16) |
|---|---|---|---|---|
{curve}
"""
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


def card_value(card_text: str, key: str) -> float | None:
    m = re.search(rf"^{re.escape(key)}:\s*([-+0-9.eE]+)\s*$", card_text, re.MULTILINE)
    return float(m.group(1)) if m else None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weight_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors files: model.safetensors, or the shards its index names (sorted)."""
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    with open(os.path.join(model_dir, "model.safetensors.index.json"), encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(model_dir, s) for s in shards]


def weights_sha256(model_dir: str) -> str:
    """sha256 of model.safetensors; for a sharded checkpoint, of the lines "<shard name> <sha256>\\n"."""
    files = weight_files(model_dir)
    if len(files) == 1 and os.path.basename(files[0]) == "model.safetensors":
        return file_sha256(files[0])
    lines = "".join(f"{os.path.basename(p)} {file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def greedy_continuations(neox) -> list[dict]:
    out = []
    for prompt in GOLDEN_PROMPTS:
        r = neox.generate(prompt, max_new_tokens=GOLDEN_NEW_TOKENS, temperature=0.0)
        out.append(dict(prompt=prompt, token_ids=r.token_ids, text=r.text, finish_reason=r.finish_reason))
    return out


def write_golden(model_dir: str, golden_path: str = GOLDEN_PATH) -> dict:
    """Reference (CPU, float32) greedy outputs and sample perplexity of a shipped model directory."""
    import neox_rt
    neox = neox_rt.load(model_dir, dtype="float32", device="cpu", backend="torch", progress=False)
    ppl, tokens = sample_perplexity(neox, read_sample())
    golden = dict(
        model_sha256=weights_sha256(model_dir),
        max_new_tokens=GOLDEN_NEW_TOKENS, heldout_sample_perplexity=round(ppl, 6), heldout_sample_tokens=tokens,
        continuations=greedy_continuations(neox))
    with open(golden_path, "w", encoding="utf-8") as f:  # one line per continuation
        head = {k: v for k, v in golden.items() if k != "continuations"}
        f.write(json.dumps(head, indent=1, ensure_ascii=False)[:-2] + ',\n "continuations": [\n')
        f.write(",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in golden["continuations"]))
        f.write("\n ]\n}\n")
    card = os.path.join(model_dir, "README.md")
    if os.path.isfile(card):
        with open(card, encoding="utf-8") as f:
            text = f.read()
        text, n = re.subn(r"^heldout_sample_perplexity:.*$", f"heldout_sample_perplexity: {round(ppl, 6)}",
                          text, count=1, flags=re.MULTILINE)
        text = re.sub(r"(`heldout_sample_perplexity` )[-+0-9.eE]+", rf"\g<1>{round(ppl, 6)}", text, count=1)
        if n:
            with open(card, "w", encoding="utf-8") as f:
                f.write(text)
    return golden


# ----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output checkpoint directory")
    p.add_argument("--minutes", type=float, default=3.0, help="optimisation time budget (default 3)")
    p.add_argument("--steps", type=int, default=None, help="exact number of steps (overrides --minutes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny model on 1/8 of the files (CPU smoke test)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.1, help="hidden dropout during training")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compile time counts)")
    p.add_argument("--extra-corpus", dest="extra_corpus", default=None,
                   help="extra training text: .corpus/extra.txt.xz from tools/build_default_corpus.py")
    p.add_argument("--extra-max-chars", dest="extra_max_chars", type=int, default=None,
                   help=f"only the first extra files up to this many characters (--tiny: {TINY_EXTRA_CHARS:,})")
    p.add_argument("--max-shard-size", dest="max_shard_size", default=MAX_SHARD_SIZE,
                   help=f"save_pretrained's shard limit (default {MAX_SHARD_SIZE}; every file must stay under 16 MiB)")
    p.add_argument("--stdlib-repeat", dest="stdlib_repeat", type=int, default=2,
                   help="times the stdlib files appear in the training stream (default 2)")
    p.add_argument("--write-golden", metavar="MODEL_DIR",
                   help="recompute tests/data/default_model_golden.json and the card's sample perplexity")
    p.add_argument("--write-sample", action="store_true", help="rewrite tests/data/heldout_sample.txt")
    args = p.parse_args(argv)

    if args.write_sample:
        _, heldout = stdlib_files()
        with open(SAMPLE_PATH, "w", encoding="utf-8", newline="") as f:
            f.write(heldout_sample(heldout))
        log(f"wrote {SAMPLE_PATH} from Python {platform.python_version()}")
        return 0
    if args.write_golden:
        g = write_golden(args.write_golden)
        log(f"wrote {GOLDEN_PATH}: sample perplexity {g['heldout_sample_perplexity']}")
        for c in g["continuations"]:
            log(f"{c['prompt']!r} -> {c['text']!r}")
        return 0
    if not args.out:
        p.error("--out is required for training")
    r = train(args)
    files = {name: os.path.getsize(os.path.join(args.out, name)) for name in sorted(os.listdir(args.out))}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_default_model.json"), "w", encoding="utf-8") as f:
            json.dump(dict(results=r, files=files), f, indent=1)
    too_big = [n for n, s in files.items() if s >= MAX_CHECKPOINT_BYTES]
    print()
    print(f"{'file':<24}{'bytes':>12}")
    for name, size in files.items():
        print(f"{name:<24}{size:>12,}")
    print(f"{'steps':<24}{r['steps']:>12,}\n{'tokens seen':<24}{r['tokens_seen']:>12,}")
    print(f"{'tokens/s':<24}{r['tokens_per_second']:>12,}\n{'train seconds':<24}{r['train_seconds']:>12}")
    print(f"{'heldout loss':<24}{r['heldout_loss']:>12}\n{'heldout ppl':<24}{r['heldout_perplexity']:>12}")
    print(f"{'sample ppl':<24}{r['heldout_sample_perplexity']:>12}")
    if too_big:
        print(f"ERROR: files of 16 MiB or more will not come back from the device: {too_big}")
        return 1
    if len(files) > 7:  # the device returns at most 8 files: these plus train_default_model.json
        print(f"WARNING: {len(files)} files in {args.out}: with train_default_model.json more than 8 files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
