"""The engine: runs a model over a KV cache to generate text. :mod:`.generation` (the batched prefill + decode loop
with per-sequence stops and streaming), :mod:`.sampling`, :mod:`.kv_cache`, :mod:`.graphs` (CUDA-graph decode) and
:mod:`.tokenizer`."""
from neox_rt.engine.generation import GenerationResult, Generator
from neox_rt.engine.kv_cache import KVCache
from neox_rt.engine.sampling import SamplingParams, sample
from neox_rt.engine.tokenizer import Tokenizer

__all__ = ["Generator", "GenerationResult", "KVCache", "SamplingParams", "sample", "Tokenizer"]
