"""gpt-neox native checkpoints: load any TP/PP layout (resharded to the runtime TP), convert both ways.

Checkpoints are written two ways: by ``neox_rt.convert`` (HF -> neox) and by an independent writer in this
file (Megatron rules spelled out by hand), so the converter is never only tested against itself.
"""
import argparse
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import neox_rt
from neox_rt import NeoxRtError
from neox_rt.convert import hf_to_neox, main as convert_main, neox_to_hf
from tests.conftest import REPO, SMALL_CONFIGS, make_hf_model, save_hf, train_tiny_tokenizer

# A: parallel residual (row biases SUMMED over ranks), gelu; vocab 320 divides by 4; tokenizer has 300 ids.
CFG_A = dict(SMALL_CONFIGS["parallel_rot25_hd32_gelu"], vocab_size=320)
# B: sequential residual (row biases replicated), gelu_fast; vocab 250 needs padding at TP 4 (to 252).
CFG_B = dict(SMALL_CONFIGS["sequential_rot100_hd16_gelufast"], vocab_size=250)
IDS = torch.randint(2, 250, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (transformers model, HF dir, neox_rt logits on the HF dir)."""
    out = {}
    tok = train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    for name, cfg in (("A", CFG_A), ("B", CFG_B)):
        hf = make_hf_model(**cfg)
        d = save_hf(hf, tmp_path_factory.mktemp(f"hf{name}"))
        if name == "A":
            shutil.copy(tok, os.path.join(d, "tokenizer.json"))
        out[name] = (hf, d, neox_rt.load(d, device="cpu", progress=False).logits(IDS))
    return out


# ---------------------------------------------------------------------------------------------------------
# An independent writer: Megatron sharding rules, spelled out without neox_rt's helpers.
# ---------------------------------------------------------------------------------------------------------

YAML_A = """# a gpt-neox config in the style of configs/20B.yml (JSON-ish YAML, mixed - and _ keys)
{
  "pipe-parallel-size": 4,
  "model-parallel-size": {tp},
  "num-layers": 2,
  "hidden-size": 128,
  "num_attention_heads": 4,
  "seq-length": 128,
  "max-position-embeddings": 128,
  "norm": "layernorm",
  "pos-emb": "rotary",
  "rotary_pct": 0.25,
  "no-weight-tying": true,
  "gpt_j_residual": true,
  "activation": "gelu",
  "bias-gelu-fusion": false,
  "layernorm-epsilon": 1.0e-5,
  "vocab-file": "./20B_checkpoints/20B_tokenizer.json",
  "tokenizer_type": "HFTokenizer",
  # training settings are ignored
  "optimizer": {"type": "Adam", "params": {"lr": 0.97e-4, "betas": [0.9, 0.95], "eps": 1.0e-8}},
  "train_micro_batch_size_per_gpu": 4,
}
"""


def write_by_hand(hf_dir, directory, tp, layout, new_mlp_names, parallel_residual, yaml_text, tokenizer=None,
                  tag="global_step150000"):
    """gpt-neox checkpoint of the HF checkpoint ``hf_dir`` at ``tp``: QKV / h->4h / vocab split on dim 0,
    dense / 4h->h on dim 1, row biases divided by tp (parallel residual: ranks' copies sum to the bias)."""
    sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("gpt_neox.layers."))
    up, down = ("mlp.linear1", "mlp.linear2") if new_mlp_names else ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    stages = {0: [{"word_embeddings.weight": w} for w in sd["gpt_neox.embed_in.weight"].chunk(tp, 0)]}
    for i in range(n):
        p = f"gpt_neox.layers.{i}."
        ranks = []
        for r in range(tp):
            s = {f"{ln}.{w}": sd[f"{p}{ln}.{w}"] for ln in ("input_layernorm", "post_attention_layernorm")
                 for w in ("weight", "bias")}
            s["attention.query_key_value.weight"] = sd[p + "attention.query_key_value.weight"].chunk(tp, 0)[r]
            s["attention.query_key_value.bias"] = sd[p + "attention.query_key_value.bias"].chunk(tp, 0)[r]
            s["attention.dense.weight"] = sd[p + "attention.dense.weight"].chunk(tp, 1)[r]
            s[up + ".weight"] = sd[p + "mlp.dense_h_to_4h.weight"].chunk(tp, 0)[r]
            s[up + ".bias"] = sd[p + "mlp.dense_h_to_4h.bias"].chunk(tp, 0)[r]
            s[down + ".weight"] = sd[p + "mlp.dense_4h_to_h.weight"].chunk(tp, 1)[r]
            for ours, theirs in (("attention.dense.bias", "attention.dense.bias"),
                                 (down + ".bias", "mlp.dense_4h_to_h.bias")):
                s[ours] = sd[p + theirs] / tp if parallel_residual else sd[p + theirs]
            s["attention.rotary_emb.inv_freq"] = torch.ones(4)  # a buffer the loader must ignore
            ranks.append(s)
        stages[i + 2] = ranks
    stages[n + 3] = [{"norm.weight": sd["gpt_neox.final_layer_norm.weight"],
                      "norm.bias": sd["gpt_neox.final_layer_norm.bias"]} for _ in range(tp)]
    stages[n + 4] = [{"final_linear.weight": w} for w in sd["embed_out.weight"].chunk(tp, 0)]
    tag_dir = os.path.join(directory, tag)
    os.makedirs(os.path.join(directory, "configs"))
    os.makedirs(tag_dir)
    for r in range(tp):
        if layout == "pipeline":
            for stage, states in stages.items():
                torch.save({k: v.clone() for k, v in states[r].items()},
                           os.path.join(tag_dir, f"layer_{stage:02d}-model_{r:02d}-model_states.pt"))
            # metadata with objects weights_only refuses: the loader must never open these
            torch.save({"args": argparse.Namespace(lr=1.0), "iteration": 150000},
                       os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt"))
        else:
            module = {f"sequential.{stage}.{k}": v.clone() for stage, states in stages.items()
                      for k, v in states[r].items()}
            torch.save({"module": module, "iteration": 150000, "dp_world_size": 1},
                       os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt"))
    with open(os.path.join(directory, "latest"), "w") as f:
        f.write(tag)
    with open(os.path.join(directory, "configs", "20B.yml"), "w") as f:
        f.write(yaml_text.replace("{tp}", str(tp)))
    if tokenizer:
        shutil.copy(tokenizer, os.path.join(directory, "20B_tokenizer.json"))
    return str(directory)


@pytest.fixture(scope="module")
def by_hand(hf_dirs, tmp_path_factory):
    """Model A written by hand: pipeline layout at TP 2 (old MLP names), sequential at TP 4 (new names)."""
    _, d, _ = hf_dirs["A"]
    tok = os.path.join(d, "tokenizer.json")
    return {
        "pipe2": write_by_hand(d, tmp_path_factory.mktemp("pipe2"), 2, "pipeline", False, True, YAML_A, tok),
        "seq4": write_by_hand(d, tmp_path_factory.mktemp("seq4"), 4, "sequential", True, True, YAML_A, tok),
    }


@pytest.mark.parametrize("which", ["pipe2", "seq4"])
def test_hand_written_checkpoint_loads_like_hf(hf_dirs, by_hand, which):
    hf, _, ref = hf_dirs["A"]
    m = neox_rt.load(by_hand[which], device="cpu", progress=False)
    assert m.config.vocab_size == 320 and m.config.use_parallel_residual
    assert m.tokenizer is not None and m.tokenizer.path.endswith("20B_tokenizer.json")  # via vocab-file
    # Same weights as the HF load (per-rank biases summed exactly in float64), same op order: bitwise equal.
    assert torch.equal(m.logits(IDS), ref)
    with torch.no_grad():
        oracle = hf(IDS).logits
    assert ((m.logits(IDS) - oracle).abs().max() / oracle.abs().max()).item() < 1e-4


def test_tag_directory_and_explicit_config(hf_dirs, by_hand, tmp_path):
    _, _, ref = hf_dirs["A"]
    tag_dir = os.path.join(by_hand["pipe2"], "global_step150000")
    assert torch.equal(neox_rt.load(tag_dir, device="cpu", progress=False).logits(IDS), ref)
    cfg = str(tmp_path / "elsewhere.yml")
    shutil.copy(os.path.join(by_hand["pipe2"], "configs", "20B.yml"), cfg)
    m = neox_rt.load(by_hand["pipe2"], device="cpu", progress=False, config=cfg)
    assert torch.equal(m.logits(IDS), ref)


# ---------------------------------------------------------------------------------------------------------
# The converter: HF -> neox at TP/PP layouts, back to HF exactly, and transformers agrees.
# ---------------------------------------------------------------------------------------------------------

LAYOUTS = [("A", 1, 1, "dense"), ("A", 2, 4, "linear"), ("A", 4, 0, "dense"), ("B", 2, 0, "linear"),
           ("B", 4, 1, "dense")]


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    out = {}
    for model, tp, pp, names in LAYOUTS:
        d = str(tmp_path_factory.mktemp(f"neox{model}{tp}{pp}") / "ckpt")
        out[(model, tp, pp, names)] = hf_to_neox(hf_dirs[model][1], d, tp=tp, pp=pp, mlp_names=names)
    return out


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"{m}-tp{t}-pp{p}-{n}" for m, t, p, n in LAYOUTS])
def test_converted_checkpoint_loads_like_hf(hf_dirs, converted, layout):
    model, tp, pp, names = layout
    ref = hf_dirs[model][2]
    d = converted[layout]
    files = os.listdir(os.path.join(d, "global_step0"))
    assert any(f.startswith("layer_") for f in files) == (pp > 0)
    m = neox_rt.load(d, device="cpu", progress=False)
    out = m.logits(IDS)
    v = ref.shape[-1]
    assert out.shape[-1] == (252 if (model, tp) == ("B", 4) else v)  # vocab padded to a multiple of TP
    assert torch.equal(out[..., v:], torch.zeros_like(out[..., v:]))  # padding rows are zero
    # Same weights; only the LM head's width may differ (padding), so allow BLAS blocking differences.
    torch.testing.assert_close(out[..., :v], ref, rtol=1e-6, atol=1e-6)


def test_new_mlp_names_are_written(converted):
    d = converted[("A", 2, 4, "linear")]
    state = torch.load(os.path.join(d, "global_step0", "layer_02-model_01-model_states.pt"), weights_only=True)
    assert {"mlp.linear1.weight", "mlp.linear2.bias"} <= set(state)
    assert state["attention.query_key_value.weight"].shape == (3 * 128 // 2, 128)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"{m}-tp{t}-pp{p}-{n}" for m, t, p, n in LAYOUTS])
def test_round_trip_hf_neox_hf_is_exact(hf_dirs, converted, layout, tmp_path):
    model = layout[0]
    src = load_file(os.path.join(hf_dirs[model][1], "model.safetensors"))
    back = load_file(os.path.join(neox_to_hf(converted[layout], str(tmp_path / "hf")), "model.safetensors"))
    assert sorted(back) == sorted(src)
    for k, t in src.items():
        got = back[k]
        if got.shape != t.shape:  # vocabulary padding rows added for TP: zeros
            assert k in ("gpt_neox.embed_in.weight", "embed_out.weight") and got.shape[0] == 252
            assert torch.equal(got[t.shape[0]:], torch.zeros_like(got[t.shape[0]:]))
            got = got[: t.shape[0]]
        assert torch.equal(got, t), k


def test_transformers_loads_converted_directory(hf_dirs, by_hand, tmp_path):
    from transformers import GPTNeoXForCausalLM
    hf = hf_dirs["A"][0]
    out = neox_to_hf(by_hand["pipe2"], str(tmp_path / "hf"), max_shard_bytes=200_000)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))  # sharded
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    loaded = GPTNeoXForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, hf(IDS).logits)


def test_converter_writes_fp16(hf_dirs, tmp_path):
    d = hf_to_neox(hf_dirs["A"][1], str(tmp_path / "n"), tp=2, dtype="float16")
    m = neox_rt.load(d, device="cpu", progress=False)
    assert m.config.vocab_size == 320
    state = torch.load(os.path.join(d, "global_step0", "layer_00-model_01-model_states.pt"), weights_only=True)
    assert state["word_embeddings.weight"].dtype == torch.float16
    # the YAML beside it names the tokenizer copy, which load() finds
    assert m.tokenizer is not None and "vocab-file: tokenizer.json" in open(os.path.join(d, "neox_config.yml")).read()


# ---------------------------------------------------------------------------------------------------------
# Runtime tensor parallelism (TP=2 over gloo on CPU) on resharded checkpoints
# ---------------------------------------------------------------------------------------------------------

def _tp_worker(rank, world, rdzv, cases, result_dir):
    import torch.distributed as dist
    from neox_rt.parallel import TensorParallel
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        tp = TensorParallel(rank=rank, size=world)
        for i, path in enumerate(cases):
            logits = neox_rt.load(path, device="cpu", progress=False, tp=tp).logits(IDS)
            if rank == 0:
                torch.save(logits, os.path.join(result_dir, f"{i}.pt"))
    finally:
        dist.destroy_process_group()


def test_runtime_tp2_over_gloo(hf_dirs, by_hand, converted, tmp_path):
    """Source TP 2 (by hand), 4 (sequential, new names), 1 and 4 with vocabulary padding -> runtime TP 2."""
    import torch.multiprocessing as mp
    cases = [(by_hand["pipe2"], "A"), (by_hand["seq4"], "A"), (converted[("A", 1, 1, "dense")], "A"),
             (converted[("B", 4, 1, "dense")], "B")]
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "rdzv"), [c for c, _ in cases], str(tmp_path)), nprocs=2,
             join=True)
    for i, (_, model) in enumerate(cases):
        ref = hf_dirs[model][2]
        out = torch.load(tmp_path / f"{i}.pt", weights_only=True)
        v = ref.shape[-1]
        # TP changes the summation order (partial sums meet in the all-reduce): fp32 rounding only.
        torch.testing.assert_close(out[..., :v], ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Corrupt or incomplete checkpoints
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def broken(by_hand, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(by_hand["pipe2"], d)
    return d, d / "global_step150000"


def test_missing_layer_file(broken):
    d, tag = broken
    os.remove(tag / "layer_03-model_01-model_states.pt")
    with pytest.raises(NeoxRtError, match=r"missing checkpoint file .*layer_03-model_01-model_states\.pt"):
        neox_rt.load(str(d), device="cpu")


def test_missing_tp_rank(broken):
    d, tag = broken
    for f in os.listdir(tag):
        if "model_01" in f:
            os.remove(tag / f)
    with pytest.raises(NeoxRtError, match=r"missing checkpoint file .*layer_00-model_01.*rank 1 of 2"):
        neox_rt.load(str(d), device="cpu")


@pytest.mark.parametrize("latest,error", [(None, r"no 'latest' file .*global_step150000"),
                                          ("global_step7", r"names tag 'global_step7'")])
def test_latest_missing_or_naming_a_missing_tag(broken, latest, error):
    d, _ = broken
    if latest is None:
        os.remove(d / "latest")
    else:
        (d / "latest").write_text(latest)
    with pytest.raises(NeoxRtError, match=error):
        neox_rt.load(str(d), device="cpu")


def _edit_layer(tag, name, edit):
    path = tag / name
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_shape_disagrees_with_config(broken):
    d, tag = broken
    _edit_layer(tag, "layer_03-model_00-model_states.pt",
                lambda s: s.__setitem__("attention.dense.weight", torch.ones(128, 32)))
    with pytest.raises(NeoxRtError, match=r"layer_03-model_00-model_states\.pt: tensor attention\.dense\.weight "
                                          r"has shape \[128, 32\], expected \[128, 64\]"):
        neox_rt.load(str(d), device="cpu")


def test_missing_and_unexpected_tensor(broken):
    d, tag = broken
    _edit_layer(tag, "layer_02-model_01-model_states.pt", lambda s: s.pop("mlp.dense_4h_to_h.bias"))
    with pytest.raises(NeoxRtError, match=r"layer_02-model_01-model_states\.pt is missing tensor "
                                          r"mlp\.dense_4h_to_h\.bias"):
        neox_rt.load(str(d), device="cpu")
    _edit_layer(tag, "layer_02-model_01-model_states.pt",
                lambda s: s.update({"mlp.dense_4h_to_h.bias": torch.ones(128), "extra.weight": torch.ones(2)}))
    with pytest.raises(NeoxRtError, match=r"unexpected tensor extra\.weight"):
        neox_rt.load(str(d), device="cpu")


def test_config_with_wrong_layer_count(broken):
    d, _ = broken
    cfg = d / "configs" / "20B.yml"
    cfg.write_text(cfg.read_text().replace('"num-layers": 2', '"num-layers": 3'))
    with pytest.raises(NeoxRtError, match=r"missing checkpoint file .*layer_04-model_00"):
        neox_rt.load(str(d), device="cpu")


def test_unsafe_pickle_is_refused(broken):
    d, tag = broken
    torch.save({"norm.weight": torch.ones(128), "evil": argparse.Namespace(x=1)},
               tag / "layer_05-model_00-model_states.pt")
    with pytest.raises(NeoxRtError, match=r"refusing to load .*layer_05-model_00-model_states\.pt: it needs "
                                          r"unsafe unpickling"):
        neox_rt.load(str(d), device="cpu")


def test_sequential_file_with_unsafe_state_is_refused(by_hand, tmp_path):
    d = tmp_path / "seq"
    shutil.copytree(by_hand["seq4"], d)
    path = d / "global_step150000" / "mp_rank_02_model_states.pt"
    state = torch.load(path, weights_only=True)
    state["args"] = argparse.Namespace(lr=1.0)  # as an RNG state or args object would need
    torch.save(state, path)
    with pytest.raises(NeoxRtError, match=r"refusing to load .*mp_rank_02_model_states\.pt"):
        neox_rt.load(str(d), device="cpu")


def test_truncated_file_and_no_config(broken):
    d, tag = broken
    path = tag / "layer_00-model_01-model_states.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(NeoxRtError, match=r"corrupt checkpoint file .*layer_00-model_01-model_states\.pt"):
        neox_rt.load(str(d), device="cpu")
    shutil.rmtree(d / "configs")
    with pytest.raises(NeoxRtError, match=r"has no YAML config"):
        neox_rt.load(str(d), device="cpu")


def test_convert_cli_errors(hf_dirs, by_hand, tmp_path, capsys):
    assert convert_main([by_hand["pipe2"], str(tmp_path / "x"), "--to", "neox"]) == 2
    assert "already a gpt-neox checkpoint" in capsys.readouterr().err
    assert convert_main([hf_dirs["A"][1], str(tmp_path / "y"), "--tp", "3"]) == 2
    assert "--tp 3 must divide the heads" in capsys.readouterr().err
    assert convert_main([hf_dirs["A"][1], str(tmp_path / "z"), "--bogus"]) == 2
    assert capsys.readouterr().err.startswith("neox_rt: error: unrecognized arguments")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert convert_main([hf_dirs["A"][1], str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err
    # as a program: one line on stderr, exit status 2, no traceback
    r = subprocess.run([sys.executable, "-m", "neox_rt.convert", "/no/such/dir", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["neox_rt: error: checkpoint directory not found: /no/such/dir"]


def test_convert_cli_round_trip(hf_dirs, tmp_path):
    neox = str(tmp_path / "neox")
    assert convert_main([hf_dirs["A"][1], neox, "--tp", "2", "--pp", "4"]) == 0
    assert convert_main([neox, str(tmp_path / "hf")]) == 0  # --to inferred
    a = load_file(os.path.join(hf_dirs["A"][1], "model.safetensors"))
    b = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)


def test_streams_one_pipeline_layer_at_a_time(by_hand, monkeypatch):
    """When a layer's files are opened, no tensor of an earlier layer is still alive (mmaps dropped)."""
    import weakref
    from neox_rt.checkpoints import neox as neox_checkpoint
    live, stale = [], []
    real = neox_checkpoint.NeoxCheckpoint.read_stage

    def spy(self, stage, rank, expected):
        stale.extend(s for s, ref in live if s != stage and ref() is not None)
        state = real(self, stage, rank, expected)
        live.extend((stage, weakref.ref(t)) for t in state.values())
        return state
    monkeypatch.setattr(neox_checkpoint.NeoxCheckpoint, "read_stage", spy)
    neox_rt.load(by_hand["pipe2"], device="cpu", progress=False)
    assert live and not stale


@pytest.mark.gpu
def test_gpu_fp16_load_matches_hf_load(hf_dirs, converted):
    hf_dir, d = hf_dirs["A"][1], converted[("A", 2, 4, "linear")]
    ours = neox_rt.load(d, dtype="float16", device="cuda", progress=False)
    ref = neox_rt.load(hf_dir, dtype="float16", device="cuda", progress=False)
    assert all(p.is_cuda and p.dtype == torch.float16 for p in ours.model.parameters())
    ids = IDS.cuda()
    # identical weights and kernels: equal up to run-to-run kernel nondeterminism (none expected)
    torch.testing.assert_close(ours.logits(ids), ref.logits(ids), rtol=0, atol=1e-3)


@pytest.mark.parametrize("which,fmt", [("pipe2", "int8"), ("seq4", "int4")])
def test_quantize_while_streaming_a_neox_checkpoint(by_hand, which, fmt, monkeypatch):
    """quantize= on a gpt-neox checkpoint quantizes each layer's linears as the layer is read: never more than one
    layer's linears are float on the device, and the result equals the float load quantized afterwards."""
    from neox_rt.model.layers import Linear
    from neox_rt.quant.apply import StageQuantizer, quantize_model
    from neox_rt.quant.formats import WeightFormat
    most = []
    real = StageQuantizer.__call__

    def spy(self, model, filled):
        # before quantizing this stage: float linear weights already allocated (not meta)
        floats = [n for n, m in model.named_modules() if isinstance(m, Linear) and n != "embed_out"
                  and isinstance(m.weight, torch.Tensor) and not m.weight.is_meta]
        most.append(len(floats))
        real(self, model, filled)
    monkeypatch.setattr(StageQuantizer, "__call__", spy)
    m = neox_rt.load(by_hand[which], device="cpu", progress=False, quantize=fmt, group_size=32)
    assert max(most) <= 4  # one layer: qkv, dense, h->4h, 4h->h
    assert all(isinstance(m.model.get_submodule(n).weight, WeightFormat)
               for n, mod in m.model.named_modules() if isinstance(mod, Linear) and n != "embed_out")
    ref = neox_rt.load(by_hand[which], device="cpu", progress=False)
    quantize_model(ref.model, fmt, 32)
    assert torch.equal(m.logits(IDS), ref.logits(IDS))
