"""The engine: runs a model over a KV cache to generate text. :mod:`.generation` (the batched prefill + decode loop
with per-sequence stops and streaming), :mod:`.sampling`, :mod:`.kv_cache`, :mod:`.graphs` (CUDA-graph decode) and
:mod:`.tokenizer`; continuous batching over a paged cache in :mod:`.llm_engine` (driving :mod:`.scheduler`,
:mod:`.block_manager` and :mod:`.model_runner`)."""
from neox_rt.engine.generation import GenerationResult, Generator
from neox_rt.engine.kv_cache import KVCache, PagedKVCache
from neox_rt.engine.llm_engine import LLMEngine, RequestOutput, SamplingRequest
from neox_rt.engine.model_runner import ModelRunner
from neox_rt.engine.sampling import SamplingParams, sample
from neox_rt.engine.tokenizer import Tokenizer

__all__ = ["Generator", "GenerationResult", "KVCache", "PagedKVCache", "LLMEngine", "ModelRunner", "RequestOutput",
           "SamplingParams", "SamplingRequest", "sample", "Tokenizer"]
