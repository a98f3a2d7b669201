"""neox_rt: a custom-kernel inference runtime for GPT-NeoX-family models (GPT-NeoX-20B, Pythia)."""
from neox_rt.api import NeoX, build_model, init_random, load
from neox_rt.config import NeoXConfig
from neox_rt.errors import NeoxRtError
from neox_rt.generation import GenerationResult
from neox_rt.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["load", "NeoX", "NeoXConfig", "NeoxRtError", "GenerationResult", "SamplingParams",
           "build_model", "init_random"]
