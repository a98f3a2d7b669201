"""Tensor parallelism: TP=2 against TP=1 on the same checkpoint, in real processes (gloo on CPU, NCCL on GPUs).

Every rank loads its slice of the same random HF checkpoint; the TP=2 logits must equal the TP=1 logits
to float32 rounding and the greedy tokens must be identical. The CPU run spawns the two ranks once for
all cases (about 10 s); the in-process tests check sharded loading and the error messages.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch

import neox_rt
from neox_rt.errors import NeoxRtError
from neox_rt.engine.generation import Generator
from neox_rt.parallel import TensorParallel, check_tp_size, padded_vocab_size, tp_split_dim
from tests.conftest import make_hf_model, save_hf

VOCAB = 161  # odd: TP=2 pads the vocabulary to 162, so the padding row and the logits strip are exercised
LAYERS = 3
CASES = {
    # x = x + attn(ln1(x)) + mlp(ln2(x)): one all-reduce per layer
    "parallel": dict(hidden_size=64, num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True,
                     hidden_act="gelu"),
    # a = x + attn(ln1(x)); x = a + mlp(ln2(a)): two per layer
    "sequential": dict(hidden_size=64, num_attention_heads=4, rotary_pct=1.0, use_parallel_residual=False,
                       hidden_act="gelu_fast"),
    # the LM head is the (padded, sharded) input embedding
    "tied": dict(hidden_size=64, num_attention_heads=2, rotary_pct=0.25, use_parallel_residual=True,
                 hidden_act="gelu", tie_word_embeddings=True),
}
"""Every case has large row-parallel biases (attention.dense, dense_4h_to_h): a rank adding its copy
before the all-reduce (the bias counted tp times) would change every logit (test_big_bias_matters)."""
IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))  # [b, s]
PROMPT = [3, 141, 59, 26, 5, 35, 89, 7, 9]
NEW_TOKENS = 10


class IdsTokenizer:
    """Token ids only; an EOS id the model never emits, so every run goes to the token cap."""
    eos_id = -1
    vocab_size = 1 << 30

    def decode(self, ids):
        return " ".join(map(str, ids))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _big_bias_model(case: str, bias_scale: float = 1.0):
    hf = make_hf_model(seed=1, vocab_size=VOCAB, num_hidden_layers=LAYERS, **CASES[case])
    with torch.no_grad():
        for layer in hf.gpt_neox.layers:
            dense, down = layer.attention.dense.bias, layer.mlp.dense_4h_to_h.bias
            dense.copy_(bias_scale * (3.0 + torch.randn_like(dense)))
            down.copy_(bias_scale * (-2.0 + torch.randn_like(down)))
    return hf


def _make_checkpoints(root) -> dict[str, str]:
    return {name: save_hf(_big_bias_model(name), root / name) for name in CASES}


def run_case(model, tp: TensorParallel, seed: int) -> dict:
    """What both TP sizes compute: full logits, the all-reduces of one forward, greedy and sampled ids."""
    tp.all_reduce_calls = 0
    logits = model.logits(IDS)  # [b, s, V]
    calls = tp.all_reduce_calls
    gen = Generator(model.model, IdsTokenizer())
    greedy = gen.generate([PROMPT], max_new_tokens=NEW_TOKENS, return_logprobs=True)[0]
    # a different seed on every rank: the ranks still agree because rank 0's choice is broadcast
    sampled = gen.generate([PROMPT, PROMPT[:4]], max_new_tokens=NEW_TOKENS, seed=seed,
                           sampling=neox_rt.SamplingParams(temperature=1.0, top_k=40))
    return dict(logits=logits.float().cpu(), calls=calls, greedy=greedy.token_ids,
                logprobs=greedy.logprobs, sampled=[r.token_ids for r in sampled])


def launch_rank(rank: int, world: int, port: int, device: str = "cpu", env: dict | None = None) -> TensorParallel:
    """One rank of a torchrun-like launch (in a spawned process): the environment torchrun sets (and ``env``), one
    thread, then init_from_env; the caller destroys the process group."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}))
    from neox_rt.parallel import init_from_env
    torch.set_num_threads(1)
    return init_from_env(world, device)


def _tp_worker(rank: int, world: int, port: int, dirs: dict, out_dir: str, device: str, dtype: str,
               env: dict | None = None) -> None:
    """One rank of a torchrun-like launch (launch_rank), running every case."""
    import torch.distributed as dist
    tp = launch_rank(rank, world, port, device, env)
    try:
        results = {"p2p": (tp.p2p is not None, tp.p2p_off_reason)}
        for name, d in dirs.items():
            model = neox_rt.load(d, dtype=dtype, device=device, tp=tp, progress=False)
            results[name] = run_case(model, tp, seed=100 + rank)
        if device == "cuda" and rank == 0:  # the TP=1 baselines on the same GPU, for the tolerance rule
            for name, d in dirs.items():
                for dt in ("float32", dtype):
                    single = neox_rt.load(d, dtype=dt, device=device, progress=False)
                    results[f"{name}/tp1/{dt}"] = run_case(single, single.model.tp, seed=0)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_tp(dirs: dict, out_dir, world: int = 2, device: str = "cpu", dtype: str = "float32",
             env: dict | None = None) -> list[dict]:
    import torch.multiprocessing as mp
    mp.spawn(_tp_worker, args=(world, _free_port(), dirs, str(out_dir), device, dtype, env), nprocs=world,
             join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


# ------------------------------------------------------------------------------------------------------
# CPU, gloo, two processes
# ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """(TP=1 results per case computed here, [rank 0, rank 1] results of the spawned TP=2 run)."""
    dirs = _make_checkpoints(tmp_path_factory.mktemp("tp_ckpt"))
    torch.manual_seed(0)
    single = {}
    for name, d in dirs.items():
        m = neox_rt.load(d, dtype="float32", device="cpu", progress=False)
        single[name] = run_case(m, m.model.tp, seed=100)
    ranks = spawn_tp(dirs, tmp_path_factory.mktemp("tp_out"))
    return single, ranks


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_logits_equal_tp1(tp_results, case):
    single, ranks = tp_results
    ref = single[case]["logits"]
    assert ref.shape == (*IDS.shape, VOCAB)
    for r in ranks:
        got = r[case]["logits"]
        assert got.shape == ref.shape  # the padding column of TP=2 (vocab 162) is stripped
        # float32: only the order of the partial sums differs
        assert rel_err(got, ref) < 1e-5, case


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_greedy_tokens_identical(tp_results, case):
    single, ranks = tp_results
    for r in ranks:
        assert r[case]["greedy"] == single[case]["greedy"]
        assert len(r[case]["greedy"]) == NEW_TOKENS
        assert max(abs(a - b) for a, b in zip(r[case]["logprobs"], single[case]["logprobs"])) < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_ranks_agree_on_sampled_tokens(tp_results, case):
    """Each rank seeds its sampler differently; rank 0 samples and broadcasts, so all ranks hold its ids."""
    _, (r0, r1) = tp_results
    assert r0[case]["sampled"] == r1[case]["sampled"]
    assert all(len(t) == NEW_TOKENS for t in r0[case]["sampled"])
    assert all(0 <= t < VOCAB for seq in r0[case]["sampled"] for t in seq)


@pytest.mark.parametrize("case", sorted(CASES))
def test_all_reduce_count(tp_results, case):
    """Parallel residual: one all-reduce per layer; sequential: two; plus the embedding's one."""
    single, ranks = tp_results
    per_layer = 1 if CASES[case]["use_parallel_residual"] else 2
    for r in ranks:
        assert r[case]["calls"] == per_layer * LAYERS + 1
    assert single[case]["calls"] == 0  # TP=1 issues none


def test_tp4_equals_tp1_on_cpu(tp_results, tmp_path):
    """Four gloo ranks (the 4x T4 layout of the 20B run, on CPU): logits and greedy ids equal TP=1."""
    single, _ = tp_results
    cases = {name: save_hf(_big_bias_model(name), tmp_path / name) for name in ("parallel", "sequential")}
    (tmp_path / "out4").mkdir()
    ranks = spawn_tp(cases, tmp_path / "out4", world=4)
    for name in cases:
        for r in ranks:
            assert rel_err(r[name]["logits"], single[name]["logits"]) < 1e-5, name
            assert r[name]["greedy"] == single[name]["greedy"], name
        # vocab 161 pads to 164 at TP=4; the stripped logits keep the real 161 columns
        assert ranks[0][name]["logits"].shape[-1] == VOCAB


def test_big_bias_matters(tp_results, tmp_path):
    """The cases would catch a bias added once per rank: doubling the row-parallel biases moves the logits."""
    single, _ = tp_results
    doubled = save_hf(_big_bias_model("parallel", bias_scale=2.0), tmp_path / "doubled")
    doubled = neox_rt.load(doubled, dtype="float32", device="cpu", progress=False)
    assert rel_err(doubled.logits(IDS), single["parallel"]["logits"]) > 1e-2


# ------------------------------------------------------------------------------------------------------
# In process: sharded loading, padding, errors
# ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parallel_ckpt(tmp_path_factory):
    from safetensors.torch import load_file
    hf = make_hf_model(vocab_size=VOCAB, num_hidden_layers=2, **CASES["parallel"])
    directory = save_hf(hf, tmp_path_factory.mktemp("tp_shard"))
    return directory, load_file(os.path.join(directory, "model.safetensors"))  # names as in the file


@pytest.mark.parametrize("tp_size", [2, 4])
def test_each_rank_reads_only_its_slice(parallel_ckpt, monkeypatch, tp_size):
    """Every tensor a rank reads has the shape of its shard (never the full tensor, except replicated
    ones), and the shards of all ranks put together are the checkpoint (plus zero padding rows)."""
    from neox_rt.checkpoints import hf as weights
    directory, state = parallel_ckpt
    reads: dict[str, tuple] = {}
    real_index = weights.index_checkpoint

    def spying_index(d):
        sources = real_index(d)
        for src in sources.values():
            def read(dim, start, stop, _read=src.read, _name=src.name):
                t = _read(dim, start, stop)
                reads[_name] = tuple(t.shape)
                return t
            src.read = read
        return sources

    monkeypatch.setattr(weights, "index_checkpoint", spying_index)
    shards = []
    for rank in range(tp_size):
        reads.clear()
        tp = TensorParallel(rank=rank, size=tp_size)  # loading communicates nothing: no process group needed
        model = neox_rt.build_model(neox_rt.NeoXConfig.from_json(directory), "float32", "cpu", tp)
        weights.load_weights(model, directory, progress=False)
        params = dict(model.named_parameters())
        assert set(reads) == set(params)
        rows = padded_vocab_size(VOCAB, tp_size) // tp_size
        for name, p in params.items():
            dim = tp_split_dim(name)
            full = tuple(state[name].shape)
            if dim is None:
                assert reads[name] == full, name
                continue
            assert p.shape[dim] * tp_size == (padded_vocab_size(VOCAB, tp_size) if "embed" in name else full[dim])
            if "embed" in name:  # the last rank's shard runs past the checkpoint's rows: it reads fewer
                have = max(0, min(rows, VOCAB - rank * rows))
                assert reads[name] == (have, full[1]), name
            else:
                assert reads[name] == tuple(p.shape), name
                assert reads[name][dim] == full[dim] // tp_size, name
        shards.append({n: p.detach().clone() for n, p in params.items()})
    for name, full in state.items():
        if name not in shards[0]:
            continue
        dim = tp_split_dim(name)
        if dim is None:
            assert all(torch.equal(s[name], full) for s in shards), name
            continue
        joined = torch.cat([s[name] for s in shards], dim=dim)
        assert torch.equal(joined.narrow(dim, 0, full.shape[dim]), full), name
        assert not joined.narrow(dim, full.shape[dim], joined.shape[dim] - full.shape[dim]).any(), name


def test_padded_vocab_size():
    assert padded_vocab_size(161, 1) == 161
    assert padded_vocab_size(161, 2) == 162
    assert padded_vocab_size(161, 4) == 164
    assert padded_vocab_size(50432, 2) == 50432
    assert padded_vocab_size(50277, 8) == 50280
    for v in (1, 7, 161, 50304):
        for tp in (1, 2, 3, 4, 8):
            p = padded_vocab_size(v, tp)
            assert p % tp == 0 and v <= p < v + tp


def test_split_dims_cover_every_parameter():
    model = neox_rt.build_model(neox_rt.NeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4), "float32", "meta")
    dims = {n: tp_split_dim(n) for n, _ in model.named_parameters()}
    column = [n for n, d in dims.items() if d == 0]
    row = [n for n, d in dims.items() if d == 1]
    assert sorted(n.split(".", 3)[-1] if n.startswith("gpt_neox.layers") else n for n in column) == sorted([
        "attention.query_key_value.weight", "attention.query_key_value.bias", "mlp.dense_h_to_4h.weight",
        "mlp.dense_h_to_4h.bias", "gpt_neox.embed_in.weight", "embed_out.weight"])
    assert sorted(n.split(".", 3)[-1] for n in row) == ["attention.dense.weight", "mlp.dense_4h_to_h.weight"]
    # replicated: LayerNorms and the row-parallel biases (added once, after the all-reduce)
    assert any(n.endswith("attention.dense.bias") for n, d in dims.items() if d is None)
    assert any(n.endswith("dense_4h_to_h.bias") for n, d in dims.items() if d is None)


def test_heads_not_divisible_error(tmp_path):
    config = neox_rt.NeoXConfig(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=1, num_attention_heads=6)
    with pytest.raises(NeoxRtError, match=r"num_attention_heads \(6\) is not divisible by the "
                                          r"tensor-parallel size \(4\)"):
        neox_rt.build_model(config, "float32", "cpu", TensorParallel(rank=0, size=4))
    check_tp_size(config, 3)  # 6 heads split over 3 ranks: fine
    hf = make_hf_model(vocab_size=VOCAB, num_hidden_layers=1, hidden_size=96, num_attention_heads=6)
    d = save_hf(hf, tmp_path / "six_heads")
    with pytest.raises(NeoxRtError, match=r"\(6\).*\(4\)"):
        neox_rt.load(d, device="cpu", tp=TensorParallel(rank=1, size=4), progress=False)


def test_init_from_env_single_and_mismatch(monkeypatch):
    from neox_rt.parallel import init_from_env
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tp = init_from_env(None)
    assert (tp.rank, tp.size) == (0, 1)
    with pytest.raises(NeoxRtError, match="--tp 2 needs 2 processes, but WORLD_SIZE is 1"):
        init_from_env(2)


# ------------------------------------------------------------------------------------------------------
# GPUs, NCCL, fp16
# ------------------------------------------------------------------------------------------------------

def _near_tie(ref_logits_fn, prompt, a: list[int], b: list[int], tol: float) -> bool:
    """True if a and b are equal, or first differ where the fp32 model puts the two choices within tol."""
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if k is None:
        return len(a) == len(b)
    logits = ref_logits_fn(prompt + a[:k])  # [V] at the diverging step
    return abs(logits[a[k]] - logits[b[k]]).item() <= tol


ALLREDUCES = {  # the all-reduce under test: NCCL; the peer-to-peer kernels in every call; in the decode graphs only
    "nccl": {"NEOX_RT_P2P_ALLREDUCE": "0"},
    "p2p": {"NEOX_RT_P2P_ALLREDUCE": "2"},  # at batch 1 the layers' all-reduces fused into the LayerNorms
    "p2p_unfused": {"NEOX_RT_P2P_ALLREDUCE": "2", "NEOX_RT_P2P_FUSE": "0"},
    "p2p_graphs": {"NEOX_RT_P2P_ALLREDUCE": "1", "NEOX_RT_CUDA_GRAPHS": "1"},
}


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("allreduce", sorted(ALLREDUCES))
def test_tp2_nccl_fp16_matches_tp1(tmp_path, allreduce):
    """NCCL (and the peer-to-peer all-reduce), fp16, 2 GPUs. Rule: |TP2 fp16 - fp32| <= 2 |TP1 fp16 - fp32| (max
    over logits), and greedy tokens equal to TP=1 fp16, or diverging only where the fp32 logits of the two choices
    nearly tie."""
    if allreduce != "nccl" and not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("GPUs 0 and 1 cannot access each other's memory: no peer-to-peer all-reduce here")
    dirs = _make_checkpoints(tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    r0, r1 = spawn_tp(dirs, out, device="cuda", dtype="float16", env=ALLREDUCES[allreduce])
    for r in (r0, r1):
        assert r["p2p"][0] == (allreduce != "nccl"), r["p2p"]
    for case in CASES:
        ref = r0[f"{case}/tp1/float32"]
        base = r0[f"{case}/tp1/float16"]
        base_err = (base["logits"] - ref["logits"]).abs().max().item()
        for r in (r0, r1):
            err = (r[case]["logits"] - ref["logits"]).abs().max().item()
            assert err <= 2 * base_err + 1e-6, (case, err, base_err)
        assert r0[case]["greedy"] == r1[case]["greedy"]
        assert r0[case]["sampled"] == r1[case]["sampled"]
        assert r0[case]["calls"] == (1 if CASES[case]["use_parallel_residual"] else 2) * LAYERS + 1
        fp32 = neox_rt.load(dirs[case], dtype="float32", device="cpu", progress=False)

        def last_logits(ids):
            return fp32.logits(torch.tensor([ids]))[0, -1]
        # near tie: within 4x the fp16 logit error of TP=1 (two fp16 runs may each be off by base_err)
        assert _near_tie(last_logits, PROMPT, r0[case]["greedy"], base["greedy"], 4 * base_err), case


# ------------------------------------------------------------------------------------------------------
# Quantized loading under tensor parallelism (gloo): each rank quantizes its own shard
# ------------------------------------------------------------------------------------------------------

def _tp_quant_worker(rank: int, world: int, port: int, d: str, out_dir: str) -> None:
    import torch.distributed as dist

    from neox_rt.quant.formats import WeightFormat
    tp = launch_rank(rank, world, port)
    try:
        results = {}
        for fmt in ("int8", "int4"):
            m = neox_rt.load(d, dtype="float32", device="cpu", tp=tp, progress=False, quantize=fmt, group_size=16)
            shards = {n: mod.dequantize(torch.float32) for n, mod in m.model.named_modules()
                      if isinstance(mod, WeightFormat)}
            results[fmt] = dict(logits=m.logits(IDS).float(), shards=shards)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tp2_quantized_load_equals_its_dequantized_shards(tmp_path):
    """--quantize at TP=2: every rank streams and quantizes its own shard (an int4 group never straddles a shard:
    group 16 divides each rank's 32 input features of a row-parallel layer); the TP=2 logits equal a TP=1 model
    whose linears hold the ranks' dequantized shards put together (column-parallel on dim 0, row-parallel on
    dim 1), so the kernels and the all-reduce add nothing but float32 rounding."""
    import torch.multiprocessing as mp
    d = save_hf(_big_bias_model("parallel"), tmp_path / "ckpt")
    mp.spawn(_tp_quant_worker, args=(2, _free_port(), d, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    for fmt in ("int8", "int4"):
        ref = neox_rt.load(d, dtype="float32", device="cpu", progress=False)
        with torch.no_grad():
            for name, w0 in ranks[0][fmt]["shards"].items():
                dim = tp_split_dim(name)  # a format module sits where the linear's weight was
                full = torch.cat([r[fmt]["shards"][name] for r in ranks], dim=dim)
                ref.model.get_submodule(name.rpartition(".")[0]).weight.copy_(full)
        want = ref.logits(IDS)
        for r in ranks:
            assert rel_err(r[fmt]["logits"][..., :VOCAB], want) < 1e-5, fmt
