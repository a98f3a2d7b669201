"""The embedded default model: what ``python -m neox_rt.generate`` runs when given no model.

A trained model ships in this package directory (``config.json``, sharded ``model-*.safetensors`` with their
index, ``tokenizer.json``, the card ``README.md``): an ordinary HF checkpoint loaded with :func:`neox_rt.load`.
Where those files are missing (a stripped install), :func:`load_default` builds a stand-in instead: a tiny
GPT-NeoX with seeded random weights and a small byte-level BPE tokenizer trained in-process on a fixed text. It
runs the whole pipeline (tokenize, prefill, decode, detokenize) on any machine, but its text is noise, and it
says so.
"""
from __future__ import annotations

import os
import sys
import tempfile

from neox_rt.api import NeoX, load
from neox_rt.engine.tokenizer import Tokenizer
from neox_rt.errors import NeoxRtError
from neox_rt.model.build import build_model, default_device, init_random, parse_dtype
from neox_rt.model.config import NeoXConfig
from neox_rt.ops.backends import select_backend
from neox_rt.parallel.context import SINGLE

DEFAULT_MODEL_DIR = os.path.dirname(os.path.abspath(__file__))

RANDOM_NOTICE = ("the embedded default model has random weights (no trained default model is installed), so "
                 "its output is noise; pass --model CHECKPOINT_DIR or a config for real text")

# The stand-in's shape: parallel residual, rotary on a quarter of 32-dim heads, as in the family.
RANDOM_CONFIG = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                     max_position_embeddings=512, use_parallel_residual=True, hidden_act="gelu")
RANDOM_SEED = 1234
TOKENIZER_VOCAB = 512

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Hello world! ",
    "GPT-NeoX is an autoregressive transformer language model with rotary position embeddings.\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Once upon a time there was a small model that ran on every machine, in the cloud and at home.\n",
    "0123456789 +-*/=()[]{}<>,.;:!?'\"\n",
]


def default_model_path() -> str | None:
    """The shipped trained model's directory if it holds a config.json, else None."""
    return DEFAULT_MODEL_DIR if os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "config.json")) else None


def _train_tokenizer(path: str) -> None:
    """Byte-level BPE, <|endoftext|> = 0 and <|padding|> = 1 as in the 20B tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TRAINING_TEXT * 8, trainer)
    tok.save(path)


def random_tokenizer():
    """The stand-in's tokenizer (deterministic: same text, same merges)."""
    with tempfile.TemporaryDirectory(prefix="neox_rt_default_") as d:
        path = os.path.join(d, "tokenizer.json")
        _train_tokenizer(path)
        return Tokenizer(path)


def random_config(tokenizer_vocab_size: int) -> NeoXConfig:
    padded = -(-tokenizer_vocab_size // 128) * 128
    return NeoXConfig(vocab_size=padded, **RANDOM_CONFIG)


def load_default(dtype="float32", device: str | None = None, tp=None, notice: bool = True, progress: bool = False):
    """The embedded default model as a :class:`neox_rt.NeoX`: the shipped trained one, else the stand-in."""
    tp = tp or SINGLE
    path = default_model_path()
    if path is not None:
        return load(path, dtype=dtype, device=device, tp=tp, progress=progress)
    if tp.size > 1:
        raise NeoxRtError("the random stand-in default model runs in one process only: pass --model for --tp > 1")
    return load_random(dtype, device, notice)


def load_random(dtype="float32", device: str | None = None, notice: bool = True):
    """The stand-in: a tiny model with seeded random weights and an in-process tokenizer (a notice on stderr)."""
    if notice:
        print(f"neox_rt: notice: {RANDOM_NOTICE}", file=sys.stderr)
    device = device or default_device()
    tokenizer = random_tokenizer()
    config = random_config(tokenizer.vocab_size)
    select_backend(None, device)
    model = build_model(config, "float32", "cpu")
    init_random(model, seed=RANDOM_SEED, std=0.2)  # std 0.2: peaked next-token distributions, not uniform
    model = model.to(device=device, dtype=parse_dtype(dtype))
    return NeoX(model, tokenizer, None)
