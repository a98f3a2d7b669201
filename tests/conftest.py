"""Shared fixtures: random-weights HF checkpoints, a small trained tokenizer, the 20B tokenizer path."""
from __future__ import annotations

import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_20B = os.path.join(REPO, "..", "shared", "tokenizers", "20B_tokenizer.json")

# Small configs that cover the family: parallel/sequential residual, rotary 0.25/1.0, head sizes,
# gelu/gelu_fast/relu, tied and untied embeddings.
SMALL_CONFIGS = {
    "parallel_rot25_hd32_gelu": dict(hidden_size=128, num_attention_heads=4, rotary_pct=0.25,
                                     use_parallel_residual=True, hidden_act="gelu"),
    "sequential_rot100_hd16_gelufast": dict(hidden_size=64, num_attention_heads=4, rotary_pct=1.0,
                                            use_parallel_residual=False, hidden_act="gelu_fast"),
    "parallel_hd64_tied": dict(hidden_size=128, num_attention_heads=2, rotary_pct=0.25,
                               use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=True),
    "parallel_hd80_rot25": dict(hidden_size=160, num_attention_heads=2, rotary_pct=0.25,
                                use_parallel_residual=True, hidden_act="gelu_fast"),
    "sequential_hd96_relu": dict(hidden_size=192, num_attention_heads=2, rotary_pct=0.25,
                                 use_parallel_residual=False, hidden_act="relu"),
}


def hf_config(vocab_size=160, num_hidden_layers=2, max_position_embeddings=128, **kw):
    from transformers import GPTNeoXConfig
    kw.setdefault("intermediate_size", 4 * kw["hidden_size"])
    return GPTNeoXConfig(vocab_size=vocab_size, num_hidden_layers=num_hidden_layers,
                         max_position_embeddings=max_position_embeddings, **kw)


def make_hf_model(seed=0, **kw):
    """A transformers GPTNeoXForCausalLM with random weights (std 0.2 so that attention is not uniform)."""
    from transformers import GPTNeoXForCausalLM
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(hf_config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def save_hf(model, directory, **kw):
    model.save_pretrained(directory, **kw)
    return str(directory)


def train_tiny_tokenizer(path, vocab_size=300):
    """A byte-level BPE tokenizer with <|endoftext|> = 0 and <|padding|> = 1, trained on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
            "Hello world. The quick brown fox jumps over the lazy dog.\n"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    """An HF checkpoint directory (random weights, parallel residual) with a tokenizer.json."""
    import shutil
    d = tmp_path_factory.mktemp("ckpt")
    model = make_hf_model(vocab_size=320, **SMALL_CONFIGS["parallel_rot25_hd32_gelu"])
    save_hf(model, d)
    shutil.copy(tiny_tokenizer, d / "tokenizer.json")
    return str(d)


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    n_gpu = torch.cuda.device_count() if has_gpu else 0
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (runs on the device machine)"))
        if "multigpu" in item.keywords and n_gpu < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))


@pytest.fixture(scope="module")
def ext():
    """torch.ops.neox_rt, for the GPU tests (on the GPU machine a missing extension is a failure, not a skip)."""
    from neox_rt.ops import cuda as cuda_ops
    try:
        return cuda_ops.load_extension()
    except ImportError as e:
        pytest.fail(f"extension not built on the GPU machine: {e}")


def train_tool():
    """tools/train_default_model.py as a module (perplexity helpers, the held-out files, the golden prompts)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_default_model",
                                                  os.path.join(REPO, "tools", "train_default_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def teacher_forced_logits(model, prompt, continuation, runner=None):
    """Logits [len(continuation), V] (fp32) of prefill then decode steps fed ``continuation``, on the GPU; with
    ``runner`` (a DecodeGraphRunner) the decode steps replay its CUDA graphs."""
    from neox_rt.engine.kv_cache import KVCache

    dev = "cuda"
    cache = KVCache.for_model(model, 1, len(prompt) + len(continuation))
    ids = torch.tensor([prompt], device=dev)
    out = [model(ids, torch.arange(len(prompt), device=dev)[None], cache,
                 last_index=torch.tensor([len(prompt) - 1], device=dev)).float()]
    for p, t in enumerate(continuation[:-1], start=len(prompt)):
        tok, pos = torch.tensor([t], device=dev), torch.tensor([p], device=dev)
        if runner is not None:
            logits, _ = runner.step(tok, pos, cache)
        else:
            logits = model(tok[:, None], pos[:, None], cache, decode=True)[:, 0]
        out.append(logits.float().clone())  # the runner's logits are a view of its static output
    return torch.cat(out)
