"""gpt-neox YAML configs: key spelling, merging, ignored and unknown keys, types, and the model shape."""
import glob
import os

import pytest

from neox_rt import NeoxRtError
from neox_rt.checkpoints import neox_yaml
from tests.conftest import REPO

CONFIGS = os.path.join(REPO, "configs")

# name -> (layers, hidden, heads, head dim, padded vocab): the table of NEOX_FACTS.md
FAMILY = {
    "pythia-70m": (6, 512, 8, 64, 50304),
    "pythia-160m": (12, 768, 12, 64, 50304),
    "pythia-410m": (24, 1024, 16, 64, 50304),
    "pythia-1b": (16, 2048, 8, 256, 50304),
    "pythia-1.4b": (24, 2048, 16, 128, 50304),
    "pythia-2.8b": (32, 2560, 32, 80, 50304),
    "pythia-6.9b": (32, 4096, 32, 128, 50432),
    "pythia-12b": (36, 5120, 40, 128, 50688),
    "20B": (44, 6144, 64, 96, 50432),
}

# The style of gpt-neox's own configs: a flow mapping with comments, True, trailing commas, 1e-5 (a
# string in YAML 1.1), nested training-only dicts.
NEOX_STYLE = """
# a gpt-neox config
{
  "pipe-parallel-size": 1,
  "model-parallel-size": 1,
  "num-layers": 2,
  "hidden-size": 64,
  "num-attention-heads": 4,
  "seq-length": 256,
  "max-position-embeddings": 256,
  "norm": "layernorm",
  "pos-emb": "rotary",
  "rotary_pct": 0.25,
  "no-weight-tying": true,
  "gpt_j_residual": True,
  "layernorm-epsilon": 1e-5,
  "optimizer": {"type": "Adam", "params": {"lr": 0.0006, "betas": [0.9, 0.95], "eps": 1.0e-8,}},
  "zero_optimization": {"stage": 1, "overlap_comm": True,},
  "train_micro_batch_size_per_gpu": 4,
  "data-path": "data/enwik8_text_document",
  "fp16": {"enabled": true},
  "train-iters": 320000,
  "checkpoint-activations": true,
}
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_dash_and_underscore_and_training_keys_are_quiet(tmp_path):
    warnings = []
    cfg = neox_yaml.read_configs([write(tmp_path, "a.yml", NEOX_STYLE)], warn=warnings.append)
    assert warnings == []
    assert cfg["num_layers"] == 2 and cfg["rotary_pct"] == 0.25 and cfg["gpt_j_residual"] is True
    assert cfg["layernorm_epsilon"] == 1e-5  # numeric string converted
    assert "optimizer" not in cfg and "train_iters" not in cfg
    c = neox_yaml.to_model_config(cfg)
    assert (c.num_hidden_layers, c.hidden_size, c.max_position_embeddings, c.layer_norm_eps) == (2, 64, 256, 1e-5)
    assert c.use_parallel_residual and not c.tie_word_embeddings and c.vocab_size == 50304


def test_merge_in_order_and_unknown_key_warns(tmp_path):
    a = write(tmp_path, "a.yml", "top-k: 5\ntemperature: 0.5\nnum-layers: 4\n")
    b = write(tmp_path, "b.yml", "top_k: 7\nmaximum-tokens: 9\nnum_layerz: 3\n")
    warnings = []
    cfg = neox_yaml.read_configs([a, b], warn=warnings.append)
    assert cfg["top_k"] == 7 and cfg["temperature"] == 0.5 and cfg["maximum_tokens"] == 9 and cfg["num_layers"] == 4
    assert len(warnings) == 1 and "num_layerz" in warnings[0] and "b.yml" in warnings[0]


@pytest.mark.parametrize("text,key", [
    ("top_k: high\n", "top_k"),
    ("temperature: warm\n", "temperature"),
    ("recompute: 1\n", "recompute"),
    ("num-layers: 2.5\n", "num_layers"),
    ("stop: [1, 2]\n", "stop"),
    ("load: [a]\n", "load"),
])
def test_wrong_type_names_the_key(tmp_path, text, key):
    with pytest.raises(NeoxRtError, match=f"'{key}'.*c.yml|c.yml.*'{key}'"):
        neox_yaml.read_configs([write(tmp_path, "c.yml", text)])


@pytest.mark.parametrize("text,match", [
    ("top_k: [1,\n", "not valid YAML.*line"),
    ("- a\n- b\n", "must hold a mapping"),
    ("key: 'unterminated\n", "not valid YAML"),
])
def test_malformed_yaml(tmp_path, text, match):
    with pytest.raises(NeoxRtError, match=match):
        neox_yaml.read_configs([write(tmp_path, "bad.yml", text)])


def test_missing_config_file(tmp_path):
    with pytest.raises(NeoxRtError, match="config file not found"):
        neox_yaml.read_configs([str(tmp_path / "nope.yml")])


def test_shipped_configs_exist_and_parse():
    names = {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(CONFIGS, "*.yml"))}
    assert set(FAMILY) | {"default"} <= names
    for name in names:
        warnings = []
        neox_yaml.read_configs([os.path.join(CONFIGS, f"{name}.yml")], warn=warnings.append)
        assert warnings == [], (name, warnings)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_shipped_model_shapes(name):
    layers, hidden, heads, head_dim, vocab = FAMILY[name]
    cfg = neox_yaml.read_configs([os.path.join(CONFIGS, f"{name}.yml")])
    c = neox_yaml.to_model_config(cfg)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.head_dim, c.vocab_size) == \
        (layers, hidden, heads, head_dim, vocab)
    assert c.intermediate_size == 4 * hidden and c.max_position_embeddings == 2048
    assert c.rotary_pct == 0.25 and c.use_parallel_residual and not c.tie_word_embeddings
    assert c.hidden_act == ("gelu_fast" if name == "20B" else "gelu")  # as the HF configs say


def test_20b_config():
    cfg = neox_yaml.read_configs([os.path.join(CONFIGS, "20B.yml")])
    assert (cfg["model_parallel_size"], cfg["pipe_parallel_size"]) == (2, 4)
    assert cfg["load"] == "./20B_checkpoints" and cfg["vocab_file"].endswith("20B_tokenizer.json")
    for key in ("text_gen_type", "sample_input_file", "sample_output_file", "num_samples", "maximum_tokens",
                "temperature", "top_k", "top_p", "prompt_end", "recompute", "return_logits", "seed"):
        assert key in cfg, key
    c = neox_yaml.to_model_config(cfg)
    assert c.num_parameters() == 20_554_567_680 and c.rotary_ndims == 24


def test_gpt_neox_defaults_and_vocab_padding():
    base = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4}
    c = neox_yaml.to_model_config(base)
    # gpt-neox's defaults: full rotary, sequential residual, tied embeddings, seq 2048
    assert c.rotary_pct == 1.0 and not c.use_parallel_residual and c.tie_word_embeddings
    assert c.max_position_embeddings == 2048 and c.vocab_size == 50304
    for mp, vocab in [(1, 50304), (2, 50432), (4, 50688)]:
        assert neox_yaml.to_model_config({**base, "model-parallel-size": mp}).vocab_size == vocab
    assert neox_yaml.to_model_config(base, tokenizer_vocab_size=300).vocab_size == 384
    assert neox_yaml.to_model_config({**base, "padded_vocab_size": 320}).vocab_size == 320
    assert neox_yaml.to_model_config({**base, "seq_length": 512}).max_position_embeddings == 512


def test_checkpoint_args_dict():
    """The args saved in a gpt-neox checkpoint: underscore keys, None for unset ones, many others."""
    args = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": None,
            "padded_vocab_size": 50432, "gpt_j_residual": True, "no_weight_tying": True, "rotary_pct": 0.25,
            "activation": "gelu", "bias_gelu_fusion": True, "lr": 1e-4, "some_new_arg": [1, 2]}
    c = neox_yaml.to_model_config(args)
    assert c.vocab_size == 50432 and c.intermediate_size == 256 and c.hidden_act == "gelu_fast"


@pytest.mark.parametrize("change,match", [
    ({"pos-emb": "learned"}, "rotary only"),
    ({"norm": "rmsnorm"}, "layernorm only"),
    ({"num-kv-heads": 2}, "num-kv-heads"),
    ({"activation": "geglu"}, "activation"),
    ({"hidden-size": "wide"}, "hidden_size"),
])
def test_unsupported_shape(change, match):
    with pytest.raises(NeoxRtError, match=match):
        neox_yaml.to_model_config({"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, **change})


def test_missing_shape_key():
    with pytest.raises(NeoxRtError, match="num-attention-heads"):
        neox_yaml.to_model_config({"num-layers": 2, "hidden-size": 64})
