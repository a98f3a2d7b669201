"""Model shape: a frozen, validated dataclass read from an HF ``config.json``."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from neox_rt.errors import NeoxRtError

ACTIVATIONS = ("gelu", "gelu_fast", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu")


@dataclass(frozen=True)
class NeoXConfig:
    vocab_size: int
    """Rows of the embedding and LM head (the padded vocabulary, e.g. 50304 for Pythia)."""
    hidden_size: int
    """Model width h."""
    num_hidden_layers: int
    """Number of transformer layers."""
    num_attention_heads: int
    """Heads per layer; head_dim = hidden_size / num_attention_heads."""
    intermediate_size: int | None = None
    """MLP width (4h in every released model)."""
    max_position_embeddings: int = 2048
    """Longest sequence (prompt plus generation) the model supports."""
    rotary_pct: float = 0.25
    """Fraction of each head's dims that get rotary; rotary_ndims = int(head_dim * rotary_pct)."""
    rotary_emb_base: float = 10000.0
    """Rotary base (theta)."""
    use_parallel_residual: bool = True
    """x + attn(ln1(x)) + mlp(ln2(x)) when true; sequential residual when false."""
    tie_word_embeddings: bool = False
    """embed_out shares embed_in's weight."""
    hidden_act: str = "gelu"
    """MLP activation: gelu (erf), gelu_fast / gelu_new (tanh approximation), relu, ..."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon."""
    attention_bias: bool = True
    """query_key_value and dense carry biases (true for every released model)."""

    def __post_init__(self):
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise NeoxRtError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise NeoxRtError(
                f"config field 'hidden_size' ({self.hidden_size}) must be divisible by "
                f"'num_attention_heads' ({self.num_attention_heads})")
        if not 0.0 <= float(self.rotary_pct) <= 1.0:
            raise NeoxRtError(f"config field 'rotary_pct' must be in [0, 1], got {self.rotary_pct!r}")
        if self.rotary_ndims % 2:
            raise NeoxRtError(
                f"config field 'rotary_pct' ({self.rotary_pct}) gives an odd number of rotary dims "
                f"({self.rotary_ndims}) for head_dim {self.head_dim}; rotary dims must be even")
        if float(self.rotary_emb_base) <= 0:
            raise NeoxRtError(f"config field 'rotary_emb_base' must be positive, got {self.rotary_emb_base!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise NeoxRtError(f"config field 'hidden_act' is {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if not float(self.layer_norm_eps) > 0:
            raise NeoxRtError(f"config field 'layer_norm_eps' must be positive, got {self.layer_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    def num_parameters(self) -> int:
        h, f, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
        return v * h * (1 if self.tie_word_embeddings else 2) + n * per_layer + 2 * h

    @classmethod
    def from_dict(cls, data: dict) -> "NeoXConfig":
        """Build from an HF GPTNeoX config dict; unknown keys are ignored, missing required ones named."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        if "num_hidden_layers" not in kwargs and "num_layers" in data:
            kwargs["num_hidden_layers"] = data["num_layers"]
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        rope = rope if isinstance(rope, dict) else {}
        if "rotary_pct" not in kwargs:
            if "partial_rotary_factor" in rope:
                kwargs["rotary_pct"] = rope["partial_rotary_factor"]
            elif "partial_rotary_factor" in data:
                kwargs["rotary_pct"] = data["partial_rotary_factor"]
        if "rotary_emb_base" not in kwargs:
            if "rope_theta" in rope:
                kwargs["rotary_emb_base"] = rope["rope_theta"]
            elif "rope_theta" in data:
                kwargs["rotary_emb_base"] = data["rope_theta"]
        for required in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if required not in kwargs:
                raise NeoxRtError(f"config is missing required field '{required}'")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str) -> "NeoXConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise NeoxRtError(f"config file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise NeoxRtError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise NeoxRtError(f"config file {path} must hold a JSON object")
        return cls.from_dict(data)

    def to_hf_dict(self) -> dict:
        """The HF ``config.json`` content (loadable by transformers.GPTNeoXConfig)."""
        d = dataclasses.asdict(self)
        d.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", bos_token_id=0,
                 eos_token_id=0, initializer_range=0.02, use_cache=True, attention_dropout=0.0,
                 hidden_dropout=0.0)
        return d
