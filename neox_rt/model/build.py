"""Building a model: dtype names, the default device, an empty model on a device, random weights for tests."""
from __future__ import annotations

import torch

from neox_rt.errors import NeoxRtError
from neox_rt.model.config import NeoXConfig
from neox_rt.model.model import NeoXForCausalLM
from neox_rt.parallel.context import SINGLE, TensorParallel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise NeoxRtError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_model(config: NeoXConfig, dtype=torch.float32, device="cpu", tp: TensorParallel = SINGLE):
    """An uninitialised model on ``device`` (parameters allocated, not filled), in inference mode."""
    with torch.device("meta"):
        model = NeoXForCausalLM(config, tp)
    # dtype first, on meta: allocating fp32 then casting would need twice the memory (82 GB for 20B).
    model = model.to(parse_dtype(dtype)).to_empty(device=device)
    return model.eval()


def init_random(model, seed: int = 0, std: float = 0.02) -> None:
    """Fill a model with random weights (benchmarks and tests; LayerNorms near identity)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                vals = base + 0.1 * torch.randn(p.shape, generator=g)
            else:
                vals = std * torch.randn(p.shape, generator=g)
            p.copy_(vals)
