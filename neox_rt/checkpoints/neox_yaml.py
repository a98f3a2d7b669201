"""gpt-neox YAML configs: read, merge, type-check, and turn the model-shape keys into a NeoXConfig.

gpt-neox drives everything from YAML files (``generate.py configs/20B.yml``), possibly split over several
files merged in order. Keys may be written with ``-`` or ``_`` (``top-k`` = ``top_k``). This module knows
three kinds of keys:

- keys neox_rt reads (:data:`KEYS`: model shape, checkpoint layout, generation settings, and the few
  neox_rt extensions that mirror command-line flags); each has a type, and a wrong type is an error that
  names the key and the file;
- training-only keys (:data:`TRAINING_KEYS`: optimizer, lr, data paths, zero_optimization, ...), ignored
  silently so a training config can be used as is;
- anything else: ignored with a warning that names it (usually a typo).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Iterable

from neox_rt.model.config import ACTIVATIONS, NeoXConfig
from neox_rt.errors import NeoxRtError, read_bytes

TOKENIZER_20B_SIZE = 50277
"""Entries of the 20B tokenizer (``20B_tokenizer.json``), the tokenizer of GPT-NeoX-20B and Pythia."""

# key -> (type, meaning). Types: int, float (numbers; also numeric strings such as YAML 1.1's "1e-5"),
# bool, str, str_list (a string or a list of strings).
KEYS: dict[str, tuple[str, str]] = {
    # -- model shape (used only when the checkpoint directory has no config.json) --
    "num_layers": ("int", "number of transformer layers"),
    "hidden_size": ("int", "model width"),
    "num_attention_heads": ("int", "attention heads per layer"),
    "seq_length": ("int", "training sequence length; the default for max_position_embeddings"),
    "max_position_embeddings": ("int", "longest sequence (prompt + generation) the model supports"),
    "intermediate_size": ("int", "MLP width (default 4 * hidden_size)"),
    "rotary_pct": ("float", "fraction of each head's dims that get rotary (gpt-neox default 1.0)"),
    "rotary_emb_base": ("float", "rotary base theta (default 10000)"),
    "gpt_j_residual": ("bool", "parallel residual x + attn(ln1(x)) + mlp(ln2(x)) (gpt-neox default false)"),
    "gpt_j_tied": ("bool", "one LayerNorm shared by attention and MLP (not supported)"),
    "no_weight_tying": ("bool", "separate input embedding and LM head (gpt-neox default false: tied)"),
    "layernorm_epsilon": ("float", "LayerNorm epsilon (default 1e-5)"),
    "activation": ("str", "MLP activation: gelu, relu, silu (or an HF name such as gelu_fast)"),
    "bias_gelu_fusion": ("bool", "gelu computed by gpt-neox's fused bias-gelu kernel, i.e. the tanh "
                                 "approximation: activation gelu then means gelu_fast"),
    "pos_emb": ("str", "position embedding; neox_rt supports rotary only"),
    "norm": ("str", "normalisation; neox_rt supports layernorm only"),
    "mlp_type": ("str", "MLP kind; neox_rt supports regular only"),
    "num_kv_heads": ("int", "key/value heads; must equal num_attention_heads"),
    "use_bias_in_attn_linear": ("bool", "query_key_value and dense carry biases (default true)"),
    "use_qk_layernorm": ("bool", "LayerNorm on q and k (not supported)"),
    "make_vocab_size_divisible_by": ("int", "vocabulary padding unit before model parallelism (default 128)"),
    "padded_vocab_size": ("int", "rows of the embedding; default: tokenizer size padded to a multiple of "
                                 "make_vocab_size_divisible_by * model_parallel_size"),
    # -- checkpoint and layout --
    "load": ("str", "checkpoint directory (HF directory, or gpt-neox native); --model"),
    "vocab_file": ("str", "tokenizer JSON (e.g. 20B_tokenizer.json), relative to the working directory or "
                          "to the checkpoint directory; --tokenizer"),
    "model_parallel_size": ("int", "tensor-parallel size the checkpoint was saved with; the default --tp when "
                                   "run under torchrun (WORLD_SIZE > 1); it also pads the vocabulary"),
    "pipe_parallel_size": ("int", "pipeline stages of the saved checkpoint; describes its file layout only, "
                                  "neox_rt does not pipeline"),
    "tokenizer_type": ("str", "gpt-neox tokenizer class; neox_rt reads tokenizers JSON files (HFTokenizer)"),
    # -- generation (gpt-neox names) --
    "text_gen_type": ("str", "unconditional, input-file or interactive"),
    "sample_input_file": ("str", "prompts, split on prompt_end; -i"),
    "sample_output_file": ("str", "JSON lines output; -o"),
    "num_samples": ("int", "samples in unconditional mode (default 1; 3 on the embedded default model without a config)"),
    "maximum_tokens": ("int", "new tokens per prompt at most (default 102 with a config, as gpt-neox; see --help)"),
    "temperature": ("float", "0 is greedy (default 1.0 with a config, as gpt-neox; see --help)"),
    "top_k": ("int", "keep the k most likely tokens (0: off)"),
    "top_p": ("float", "nucleus sampling in [0, 1] (0: off)"),
    "prompt_end": ("str", "prompt separator in input files and interactive mode (default newline)"),
    "recompute": ("bool", "rerun the whole sequence each step instead of using the KV cache"),
    "return_logits": ("bool", "add per-token log-probabilities ('logprobs') to each record"),
    "seed": ("int", "random seed for sampling"),
    # -- neox_rt extensions (each mirrors a command-line flag) --
    "stop": ("str_list", "stop strings; --stop"),
    "dtype": ("str", "float32, float16 or bfloat16; --dtype"),
    "device": ("str", "cpu, cuda, cuda:1, ...; --device"),
    "batch_size": ("int", "prompts generated together; --batch-size"),
    "prompt": ("str", "a single prompt; --prompt"),
    "resume": ("bool", "skip prompts already in the output file; --resume"),
    "on_invalid_utf8": ("str", "fail or skip a line of the input file that is not UTF-8; --on-invalid-utf8"),
    "strict": ("bool", "a prompt too long for the context is an error instead of a null record; --strict"),
}

MODEL_KEYS = frozenset(list(KEYS)[:list(KEYS).index("load")])
"""The keys that describe the model's shape."""

TRAINING_KEYS = frozenset("""
optimizer lr min_lr lr_decay_style lr_decay_iters lr_decay_fraction warmup train_iters train_epochs
zero_optimization zero_stage zero_reduce_scatter zero_contiguous_gradients zero_reduce_bucket_size
zero_allgather_bucket_size zero_allow_untested_optimizer train_micro_batch_size_per_gpu train_batch_size
gradient_accumulation_steps data_path train_data_paths valid_data_paths test_data_paths train_data_weights
valid_data_weights test_data_weights label_data_paths data_impl split weight_by_num_documents
weighted_sampler_alpha save save_interval checkpoint_factor extra_save_iters keep_last_n_checkpoints
eval_interval eval_iters eval_tasks log_interval steps_per_print wall_clock_breakdown tensorboard_dir log_dir
log_grad_norm log_grad_pct_zeros log_param_norm log_optimizer_states log_gradient_noise_scale
use_wandb wandb_group wandb_team wandb_project wandb_host wandb_init_all_ranks checkpoint_activations
checkpoint_num_layers partition_activations contiguous_checkpointing checkpoint_in_cpu synchronize_each_layer
profile_backward gradient_clipping weight_decay hidden_dropout attention_dropout fp16 bf16 precision
fp32_allreduce amp loss_scale loss_scale_window initial_scale_power hysteresis min_loss_scale
dynamic_loss_scale prescale_gradients gradient_predivide_factor distributed_backend local_rank launcher
hostfile include exclude num_nodes num_gpus global_num_gpus master_port master_addr deepspeed
deepspeed_slurm deepspeed_mpi deepspeed_extra_args comment user_script iteration finetune no_load_optim
no_load_rng no_save_optim no_save_rng init_method output_layer_init_method init_method_std
scaled_upper_triang_masked_softmax_fusion scaled_masked_softmax_fusion rope_fusion attention_config
sparsity_config sparse_gradients output_layer_parallelism num_workers short_seq_prob mmap_warmup
reset_position_ids reset_attention_mask eod_mask_loss adlr_autoresume adlr_autoresume_interval
char_level_ppl use_checkpoint_lr_scheduler override_lr_scheduler memory_profiling memory_profiling_path
profile profile_step_start profile_step_stop dummy onnx_safe pipe_partition_method
checkpoint_validation_with_forward_pass merge_file soft_prompt_tuning is_pipe_parallel eval_results_prefix
lazy_mpu_init use_shared_fs s3_path s3_chunk_size save_base_shapes base_shapes_file coord_check use_mup
curriculum_learning autotuning flops_profiler activation_checkpointing sparse_attention data_types
elasticity comms_logger attention_softmax_in_fp32 apply_query_key_layer_scaling scalenorm_epsilon
rms_norm_epsilon opt_pos_emb_offset gradient_noise_scale_n_batches gradient_noise_scale_cpu_offload
hidden_dropout_prob attention_dropout_prob train_data_path valid_data_path test_data_path
pack_impl dataset_impl allow_chopped use_bnb_optimizer optimizer_type zero_optimization_stage
eval_batch_size warmup_iters decay_lr_to lr_warmup_iters train_label_data_paths valid_label_data_paths
test_label_data_paths do_train do_valid do_test save_iters checkpoint_scale pos_emb_scale
tensorboard_writer wandb_run_name git_hash config_files
""".split())
"""gpt-neox keys that matter for training only; ignored without a word."""


def normalize_key(key: str) -> str:
    """``top-k`` and ``top_k`` are the same key."""
    return str(key).strip().replace("-", "_")


def _warn_stderr(message: str) -> None:
    print(f"neox_rt: warning: {message}", file=sys.stderr)


def check_value(key: str, value, where: str = "config"):
    """``value`` converted to ``key``'s type, or a NeoxRtError that names the key. None means unset."""
    kind = KEYS[key][0]
    if value is None:
        return None
    bad = None
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            bad = "an integer"
    elif kind == "float":
        if isinstance(value, bool):
            bad = "a number"
        elif isinstance(value, (int, float)):
            value = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                bad = "a number"
        else:
            bad = "a number"
    elif kind == "bool":
        if not isinstance(value, bool):
            bad = "true or false"
    elif kind == "str":
        if not isinstance(value, str):
            bad = "a string"
    elif kind == "str_list":
        if isinstance(value, str):
            value = [value]
        elif not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            bad = "a string or a list of strings"
        else:
            value = list(value)
    if bad:
        raise NeoxRtError(f"{where}: key '{key}' must be {bad}, got {value!r}")
    return value


def load_yaml(path: str) -> dict:
    """The raw mapping of one YAML file (keys as written)."""
    import yaml
    raw = read_bytes(path, "config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NeoxRtError(f"config file {path} is not UTF-8 (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise NeoxRtError(f"config file {path} is not valid YAML: {problem}{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NeoxRtError(f"config file {path} must hold a mapping of keys to values, "
                          f"not a {type(data).__name__}")
    return data


def parse_config(data: dict, where: str = "config",
                 warn: Callable[[str], None] | None = _warn_stderr) -> dict:
    """Normalised, type-checked known keys of one mapping; training keys dropped, unknown keys warned."""
    out = {}
    for raw_key, value in data.items():
        key = normalize_key(raw_key)
        if key in KEYS:
            value = check_value(key, value, where)
            if value is not None:
                out[key] = value
        elif key not in TRAINING_KEYS and warn is not None:
            warn(f"{where}: unknown key '{raw_key}' (ignored)")
    return out


def read_configs(paths: Iterable[str], warn: Callable[[str], None] | None = _warn_stderr) -> dict:
    """Read several YAML files and merge them in order (a later file's key wins)."""
    merged: dict = {}
    for path in paths:
        merged.update(parse_config(load_yaml(path), where=f"config {path}", warn=warn))
    return merged


def has_model_shape(cfg: dict) -> bool:
    """True when a config names the model's shape (enough for :func:`to_model_config`)."""
    keys = {normalize_key(k) for k, v in cfg.items() if v is not None}
    return {"num_layers", "hidden_size", "num_attention_heads"} <= keys


def _activation(act: str, fused_gelu: bool) -> str:
    if act == "gelu":
        return "gelu_fast" if fused_gelu else "gelu"
    if act == "swish":
        return "silu"
    if act in ACTIVATIONS:
        return act
    raise NeoxRtError(f"config key 'activation' is {act!r}; neox_rt supports gelu, relu and silu")


def to_model_config(cfg: dict, tokenizer_vocab_size: int | None = None) -> NeoXConfig:
    """The NeoXConfig a gpt-neox config describes.

    ``cfg`` is a gpt-neox mapping, keys with ``-`` or ``_`` (a merged YAML config, or the ``args`` saved in
    a gpt-neox checkpoint); keys other than the model shape are ignored, missing shape keys take gpt-neox's
    defaults. The vocabulary is ``padded_vocab_size`` when given, else ``tokenizer_vocab_size`` (default:
    the 20B tokenizer's 50277) rounded up to a multiple of ``make_vocab_size_divisible_by`` (128) x
    ``model_parallel_size``: 50304 at model-parallel-size 1, 50432 at 2, 50688 at 4.
    """
    c = {}
    for raw_key, value in cfg.items():
        key = normalize_key(raw_key)
        if key in KEYS and (key in MODEL_KEYS or key == "model_parallel_size"):
            value = check_value(key, value, "model config")
            if value is not None:
                c[key] = value
    for required in ("num_layers", "hidden_size", "num_attention_heads"):
        if required not in c:
            raise NeoxRtError(f"config has no '{required.replace('_', '-')}': cannot build the model shape")
    if c.get("pos_emb", "rotary") != "rotary":
        raise NeoxRtError(f"config key 'pos-emb' is {c['pos_emb']!r}; neox_rt supports rotary only")
    if c.get("norm", "layernorm") != "layernorm":
        raise NeoxRtError(f"config key 'norm' is {c['norm']!r}; neox_rt supports layernorm only")
    if c.get("mlp_type", "regular") != "regular":
        raise NeoxRtError(f"config key 'mlp-type' is {c['mlp_type']!r}; neox_rt supports regular only")
    if c.get("gpt_j_tied", False):
        raise NeoxRtError("config key 'gpt-j-tied' is true (one shared LayerNorm); neox_rt does not support it")
    if c.get("use_qk_layernorm", False):
        raise NeoxRtError("config key 'use-qk-layernorm' is true; neox_rt does not support it")
    heads = c["num_attention_heads"]
    if c.get("num_kv_heads", heads) != heads:
        raise NeoxRtError(f"config key 'num-kv-heads' is {c['num_kv_heads']} but num-attention-heads is "
                          f"{heads}; neox_rt supports multi-head attention only")
    vocab = c.get("padded_vocab_size")
    if vocab is None:
        unit = c.get("make_vocab_size_divisible_by", 128) * max(c.get("model_parallel_size", 1), 1)
        size = tokenizer_vocab_size or TOKENIZER_20B_SIZE
        vocab = -(-size // unit) * unit
    return NeoXConfig(
        vocab_size=vocab,
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_layers"],
        num_attention_heads=heads,
        intermediate_size=c.get("intermediate_size"),
        max_position_embeddings=c.get("max_position_embeddings", c.get("seq_length", 2048)),
        rotary_pct=c.get("rotary_pct", 1.0),
        rotary_emb_base=c.get("rotary_emb_base", 10000.0),
        use_parallel_residual=c.get("gpt_j_residual", False),
        tie_word_embeddings=not c.get("no_weight_tying", False),
        hidden_act=_activation(c.get("activation", "gelu"), c.get("bias_gelu_fusion", False)),
        layer_norm_eps=c.get("layernorm_epsilon", 1e-5),
        attention_bias=c.get("use_bias_in_attn_linear", True),
    )


def resolve_vocab_file(vocab_file: str | None, checkpoint_dir: str | None) -> str | None:
    """A tokenizer path as given if it exists, else relative to the checkpoint directory if it exists there."""
    if vocab_file is None or os.path.exists(vocab_file) or os.path.isabs(vocab_file) or not checkpoint_dir:
        return vocab_file
    inside = os.path.join(checkpoint_dir, vocab_file)
    return inside if os.path.exists(inside) else vocab_file
