"""Checkpoint loading: formats, and a clear error for each kind of broken checkpoint."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import neox_rt
from neox_rt import NeoxRtError
from tests.conftest import SMALL_CONFIGS, make_hf_model, save_hf

CFG = SMALL_CONFIGS["parallel_rot25_hd32_gelu"]
IDS = torch.randint(0, 160, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    hf = make_hf_model(**CFG)
    d = save_hf(hf, tmp_path_factory.mktemp("single"))
    return hf, d, neox_rt.load(d, device="cpu", progress=False).logits(IDS)


def test_sharded_safetensors(reference, tmp_path):
    hf, _, ref = reference
    save_hf(hf, tmp_path, max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert torch.equal(neox_rt.load(str(tmp_path), device="cpu", progress=False).logits(IDS), ref)


def test_pytorch_bin_with_ignored_buffers(reference, tmp_path):
    hf, d, ref = reference
    state = load_file(os.path.join(d, "model.safetensors"))
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(open(os.path.join(d, "config.json")).read())
    assert torch.equal(neox_rt.load(str(tmp_path), device="cpu", progress=False).logits(IDS), ref)


def _copy_with(d, tmp_path, edit):
    state = load_file(os.path.join(d, "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(os.path.join(d, "config.json")).read())
    return str(tmp_path)


def test_missing_tensor(reference, tmp_path):
    d = _copy_with(reference[1], tmp_path, lambda s: s.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias"))
    with pytest.raises(NeoxRtError, match=r"missing tensors: gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.bias"):
        neox_rt.load(d, device="cpu")


def test_unexpected_tensor(reference, tmp_path):
    d = _copy_with(reference[1], tmp_path, lambda s: s.__setitem__("gpt_neox.extra.weight", torch.ones(3)))
    with pytest.raises(NeoxRtError, match=r"unexpected tensors: gpt_neox\.extra\.weight"):
        neox_rt.load(d, device="cpu")


def test_wrong_shape(reference, tmp_path):
    key = "gpt_neox.layers.0.attention.dense.weight"
    d = _copy_with(reference[1], tmp_path, lambda s: s.__setitem__(key, torch.ones(128, 64)))
    with pytest.raises(NeoxRtError, match=rf"{key} has shape \[128, 64\], expected \[128, 128\]"):
        neox_rt.load(d, device="cpu")


def test_corrupt_safetensors(reference, tmp_path):
    data = open(os.path.join(reference[1], "model.safetensors"), "rb").read()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 3])
    (tmp_path / "config.json").write_text(open(os.path.join(reference[1], "config.json")).read())
    with pytest.raises(NeoxRtError, match="corrupt checkpoint file .*model.safetensors"):
        neox_rt.load(str(tmp_path), device="cpu")


def test_corrupt_bin_and_unsafe_pickle(reference, tmp_path):
    (tmp_path / "config.json").write_text(open(os.path.join(reference[1], "config.json")).read())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(NeoxRtError, match="cannot load checkpoint file .*pytorch_model.bin safely"):
        neox_rt.load(str(tmp_path), device="cpu")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(NeoxRtError, match="safely"):
        neox_rt.load(str(tmp_path), device="cpu")


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(NeoxRtError, match="checkpoint directory not found: /no/such/dir"):
        neox_rt.load("/no/such/dir", device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(dict(vocab_size=8, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2)))
    with pytest.raises(NeoxRtError, match="no weights in"):
        neox_rt.load(str(tmp_path), device="cpu")


def test_loads_to_target_dtype(reference):
    m = neox_rt.load(reference[1], dtype="bfloat16", device="cpu", progress=False)
    assert all(p.dtype == torch.bfloat16 for p in m.model.parameters())
