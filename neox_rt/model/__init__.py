"""The model: its shape (:mod:`.config`), the tensor-parallel building blocks (:mod:`.layers`), GPT-NeoX itself
(:mod:`.model`) and how an empty or random one is built (:mod:`.build`)."""
from neox_rt.model.build import build_model, default_device, init_random, parse_dtype
from neox_rt.model.config import NeoXConfig
from neox_rt.model.model import Attention, Layer, MLP, NeoXForCausalLM

__all__ = ["NeoXConfig", "NeoXForCausalLM", "Attention", "MLP", "Layer", "build_model", "default_device",
           "init_random", "parse_dtype"]
