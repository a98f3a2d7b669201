"""neox_rt: a custom-kernel inference runtime for GPT-NeoX-family models (GPT-NeoX-20B, Pythia)."""
from neox_rt.api import NeoX, load
from neox_rt.engine.generation import GenerationResult
from neox_rt.engine.sampling import SamplingParams
from neox_rt.errors import NeoxRtError
from neox_rt.model.build import build_model, init_random
from neox_rt.model.config import NeoXConfig

__version__ = "0.1.0"
__all__ = ["load", "NeoX", "NeoXConfig", "NeoxRtError", "GenerationResult", "SamplingParams",
           "build_model", "init_random"]
