"""Config validation names the offending field."""
import json

import pytest

from neox_rt import NeoXConfig, NeoxRtError

BASE = dict(vocab_size=50304, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16)


def test_pythia_shape():
    c = NeoXConfig.from_dict(dict(BASE, rotary_pct=0.25))
    assert (c.head_dim, c.rotary_ndims, c.intermediate_size) == (128, 32, 8192)


def test_hf5_rope_parameters():
    c = NeoXConfig.from_dict(dict(BASE, rope_parameters={"rope_theta": 500.0, "partial_rotary_factor": 0.5}))
    assert c.rotary_emb_base == 500.0 and c.rotary_pct == 0.5


def test_20b_parameter_count():
    c = NeoXConfig(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64)
    assert c.num_parameters() == 20_554_567_680


@pytest.mark.parametrize("change,field", [
    (dict(hidden_size=2050), "hidden_size"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(rotary_pct=1.5), "rotary_pct"),
    (dict(rotary_pct=0.2), "rotary_pct"),  # hd 128 * 0.2 -> 25 rotary dims, odd
    (dict(hidden_act="swish2"), "hidden_act"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(layer_norm_eps=0), "layer_norm_eps"),
])
def test_invalid_field_is_named(change, field):
    with pytest.raises(NeoxRtError, match=f"'{field}'"):
        NeoXConfig.from_dict(dict(BASE, **change))


def test_missing_required_field_and_bad_json(tmp_path):
    with pytest.raises(NeoxRtError, match="missing required field 'num_attention_heads'"):
        NeoXConfig.from_dict({k: v for k, v in BASE.items() if k != "num_attention_heads"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(NeoxRtError, match="not valid JSON"):
        NeoXConfig.from_json(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    assert NeoXConfig.from_json(str(tmp_path)).num_hidden_layers == 24
