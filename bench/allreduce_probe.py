"""All-reduce latency probe: NCCL vs PyTorch symmetric-memory (NVLink P2P) all-reduce inside a CUDA graph.

What it times: the all-reduce of one decode-step hidden state, captured in a CUDA graph the way a decode step runs.

    torchrun --nproc-per-node 2 bench/allreduce_probe.py --out $OUT/allreduce_probe.json
    torchrun --nproc-per-node 2 bench/allreduce_probe.py --hidden 6144 --layers 44 --iters 200 --out result.json
    torchrun --nproc-per-node 2 bench/allreduce_probe.py --methods nccl,symm_one_shot_out --out result.json
    python bench/allreduce_probe.py --help          # argparse only: no GPU, torch not imported

One graph replay holds --layers (44, the 20B depth) back-to-back all-reduces (sum) of a [1, 1, --hidden] tensor
(fp16 by default: 12 KiB, the 20B hidden state at batch 1), each followed by ONE small elementwise kernel,
multiplication by 1/world_size, standing in for the next layer's work (so calls are not merged). The factor also
keeps the values fixed (sum of equal copies / world_size), so the graph's output can be checked exactly. Methods:

  nccl                    torch.distributed.all_reduce(x) (NCCL process group); x.mul_(s)
  symm_one_shot_out       torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", group, out); mul(out, s, out=buf)
  symm_one_shot           out = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group); mul(out, s, out=buf)
  symm_one_shot_copy_out  torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf, x, "sum", group, out) (x in plain
                          memory, copied into the symmetric buffer by the all-reduce kernel); mul(out, s, out=x)
  symm_two_shot_inplace   torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group); buf.mul_(s)
  symm_two_shot_out       torch.ops.symm_mem.two_shot_all_reduce_out(buf, "sum", group, out); mul(out, s, out=buf)

buf comes from torch.distributed._symmetric_memory.empty() and is rendezvoused eagerly (rendezvous(buf, group name))
before anything is captured. Ops are found at run time (hasattr on torch.ops.symm_mem); a missing one is reported,
not run. Symmetric memory backend: CUDA (TORCH_SYMMMEM=CUDA); NVLink multicast stays off
(TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NCCL_NVLS_ENABLE=0); these three are set only when absent from the
environment, and no multimem_* (NVLS) op is used. The symm_mem reduction kernels are dispatched for float32 and
bfloat16 only (CUDASymmetricMemoryOps.cu), so a method that rejects fp16 is rerun in bf16 (same bytes; its JSON
entry then has dtype bfloat16 and the fp16 error) and NCCL is also timed in bf16 (nccl_bf16) for a like-for-like
line; --no-bf16-fallback turns that off.

Per method, on all ranks in lock-step: set-up (allocation, rendezvous), one eager all-reduce checked against the
NCCL sum of the same inputs (max abs error <= --tol), capture, one replay checked (state == sum / world_size),
then timing: --warmup replays, then --repeats runs of --iters replays between two CUDA events. us per layer =
time / (iters x layers), max over ranks, median over repeats; baseline_us_per_layer is the same graph without
the all-reduces (the mul kernels only); allreduce_us = graph_us_per_layer - baseline_us_per_layer.
Hang safety: every phase ends with an agreement over a gloo group (a rank's failure is every rank's, so no
rank goes on to launch a kernel its peer never joins); GPU waits poll a CUDA event with a deadline (--timeout)
instead of blocking; each phase also runs under a hard faulthandler deadline that ends the process (torchrun
then stops the others). Rank 0 rewrites the JSON at every phase, so a run that dies keeps what it measured and
names the phase it died in ("status").
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import sys
import time
import traceback

METHODS = ("nccl", "symm_one_shot_out", "symm_one_shot", "symm_one_shot_copy_out", "symm_two_shot_inplace",
           "symm_two_shot_out")
SYMM_OP = {  # method -> the torch.ops.symm_mem op it needs
    "symm_one_shot_out": "one_shot_all_reduce_out",
    "symm_one_shot": "one_shot_all_reduce",
    "symm_one_shot_copy_out": "one_shot_all_reduce_copy_out",
    "symm_two_shot_inplace": "two_shot_all_reduce_",
    "symm_two_shot_out": "two_shot_all_reduce_out",
}
P2P_OPS = ("one_shot_all_reduce", "one_shot_all_reduce_out", "one_shot_all_reduce_copy",
           "one_shot_all_reduce_copy_out", "two_shot_all_reduce_", "two_shot_all_reduce_out")
MULTIMEM_OPS = ("multimem_all_reduce_", "multimem_one_shot_all_reduce", "multimem_one_shot_all_reduce_out")
SYMM_FUNCS = ("empty", "rendezvous", "set_backend", "get_backend", "enable_symm_mem_for_group",
              "is_nvshmem_available", "get_mem_pool")
ENV_DEFAULTS = {"TORCH_SYMMMEM": "CUDA", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0"}
ENV_REPORTED = tuple(ENV_DEFAULTS) + ("NCCL_P2P_DISABLE", "NCCL_ALGO", "NCCL_PROTO", "CUDA_VISIBLE_DEVICES")
DTYPES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Run under torchrun (WORLD_SIZE >= 2). See the module docstring for details.")
    p.add_argument("--hidden", type=int, default=6144, help="last dimension of the [1, 1, hidden] tensor")
    p.add_argument("--layers", type=int, default=44, help="all-reduce calls per graph replay")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=20, help="graph replays before timing")
    p.add_argument("--iters", type=int, default=200, help="graph replays timed per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list out of {', '.join(METHODS)}")
    p.add_argument("--tol", type=float, default=1e-2, help="max abs error allowed vs the NCCL sum")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a GPU wait may take before the phase fails (NCCL/store get 2x + 30 s, the gloo "
                        "agreements 3x + 60 s, the hard per-phase deadline 5x + 120 s)")
    p.add_argument("--capture-error-mode", default="global", choices=("global", "thread_local", "relaxed"),
                   help="torch.cuda.graph capture_error_mode")
    p.add_argument("--no-bf16-fallback", action="store_true",
                   help="do not rerun a symm_mem method in bf16 when it rejects fp16")
    p.add_argument("--out", default=None,
                   help="JSON file (default: $OUT/allreduce_probe.json when OUT is set, else allreduce_probe.json)")
    args = p.parse_args(argv)
    args.dtype = DTYPES[args.dtype]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    return args


class PhaseError(RuntimeError):
    """A phase failed on at least one rank (every rank raises it, with every failing rank's message)."""


class GpuHang(RuntimeError):
    """Queued GPU work did not finish in time: most likely a symm_mem kernel waiting for a peer that never came."""


def short(e: BaseException, limit: int = 600) -> str:
    s = f"{type(e).__name__}: {e}".strip()
    return s if len(s) <= limit else s[:limit] + " ..."


class Probe:
    def __init__(self, args: argparse.Namespace):
        import torch
        import torch.distributed as dist
        from datetime import timedelta

        self.args, self.torch, self.dist = args, torch, dist
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.timeout = float(args.timeout)
        self.coll_timeout = 2 * self.timeout + 30  # NCCL process group and its store (rendezvous exchanges)
        self.agree_timeout = self.coll_timeout + self.timeout + 30  # gloo agreements outlast any wait in a phase
        self.hard_timeout = self.agree_timeout + self.coll_timeout + 30  # faulthandler: the process ends
        self.poisoned = False
        self.save_error: str | None = None
        self.write_result = self.environment = None  # bench/common.py's writer and block, set by describe()
        self.keep: list = []  # symmetric buffers and handles: alive until the process group goes
        self.inputs: dict = {}  # dtype name -> (this rank's input, NCCL sum over ranks)
        self.baselines: dict = {}  # "dtype/kind" -> record
        self.out_path = args.out or (os.path.join(os.environ["OUT"], "allreduce_probe.json")
                                     if os.environ.get("OUT") else "allreduce_probe.json")

        torch.cuda.set_device(self.local_rank)
        self.device = torch.device("cuda", self.local_rank)
        pg_timeout = timedelta(seconds=self.coll_timeout)
        faulthandler.dump_traceback_later(self.hard_timeout, exit=True)
        try:
            dist.init_process_group(backend="nccl", device_id=self.device, timeout=pg_timeout)
        except TypeError:  # an older torch without device_id
            dist.init_process_group(backend="nccl", timeout=pg_timeout)
        self.cpu_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.agree_timeout))
        faulthandler.cancel_dump_traceback_later()
        self.group = dist.group.WORLD
        self.group_name = str(self.group.group_name)
        self.scale = 1.0 / self.world
        self.report = self.describe()

    # ---------------------------------------------------------------- bookkeeping
    def describe(self) -> dict:
        torch = self.torch
        try:
            from common import environment, git_commit, gpu_driver, write_result  # bench/common.py, run from bench/
            commit, driver = git_commit(), gpu_driver()
            self.write_result, self.environment = write_result, environment()  # one block for every save
        except Exception:  # noqa: BLE001 - standalone copy: the report just lacks the fields
            commit = driver = None
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001
            nccl = None
        n = torch.cuda.device_count()
        me = self.local_rank
        peers = {j: bool(torch.cuda.can_device_access_peer(me, j)) for j in range(n) if j != me}
        a = self.args
        return {
            "probe": "allreduce_probe", "status": "starting", "commit": commit, "driver": driver,
            "torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl,
            "gpu": torch.cuda.get_device_name(self.device), "capability": list(torch.cuda.get_device_capability()),
            "world_size": self.world, "group_name": self.group_name, "rank0_peer_access": peers,
            "hidden": a.hidden, "layers": a.layers, "dtype": a.dtype, "warmup": a.warmup, "iters": a.iters,
            "repeats": a.repeats, "tol": a.tol, "timeout_s": self.timeout, "capture_error_mode": a.capture_error_mode,
            "env": {k: os.environ.get(k) for k in ENV_REPORTED},
            "symm_mem": {}, "baselines": self.baselines, "methods": {},
        }

    def save(self, status: str | None = None) -> None:
        if status is not None:
            self.report["status"] = status
        if self.rank != 0:
            return
        try:  # never raise here: rank 0 failing alone would leave the other ranks waiting in an agreement
            if self.write_result is not None:  # bench/common.py: + the "environment" block, written atomically
                self.write_result(self.out_path, self.report, env=self.environment)
                return
            os.makedirs(os.path.dirname(os.path.abspath(self.out_path)), exist_ok=True)
            tmp = self.out_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.report, f, indent=1, default=str)
            os.replace(tmp, self.out_path)
        except Exception as e:  # noqa: BLE001
            if not self.save_error:
                print(f"allreduce_probe: cannot write {self.out_path}: {short(e)}", file=sys.stderr)
            self.save_error = short(e)

    # ---------------------------------------------------------------- synchronisation without infinite waits
    def wait_gpu(self, what: str) -> None:
        """Wait for the work queued on the current stream, polling an event until --timeout (never blocks)."""
        ev = self.torch.cuda.Event()
        ev.record()
        deadline = time.monotonic() + self.timeout
        while not ev.query():
            if time.monotonic() > deadline:
                raise GpuHang(f"GPU work not done after {self.timeout:.0f} s ({what}); a peer likely never joined")
            time.sleep(0.0002)

    def phase(self, label: str, fn):
        """Run fn on every rank, then agree over gloo: fn's value where every rank succeeded, else PhaseError."""
        self.save(f"running {label}")
        faulthandler.dump_traceback_later(self.hard_timeout, exit=True)
        err, hang, val = None, False, None
        try:
            val = fn()
        except GpuHang as e:
            err, hang = short(e), True
        except Exception as e:  # noqa: BLE001 - reported, and every rank drops the method
            err = short(e)
            if os.environ.get("ALLREDUCE_PROBE_TRACE"):
                traceback.print_exc()
        gathered: list = [None] * self.world
        try:
            self.dist.all_gather_object(gathered, (err, hang), group=self.cpu_group)
        except Exception as e:  # noqa: BLE001 - a rank never arrived: the ranks are out of step for good
            self.poisoned = True
            raise PhaseError(f"{label}: agreement failed ({short(e, 300)}); this rank: {err}") from None
        finally:
            faulthandler.cancel_dump_traceback_later()
        if any(h for _, h in gathered):
            self.poisoned = True  # a kernel may spin forever on some rank: nothing else can run
        errs = [f"rank {r}: {e}" for r, (e, _) in enumerate(gathered) if e]
        if errs:
            raise PhaseError(f"{label}: " + " | ".join(errs))
        return val

    # ---------------------------------------------------------------- symmetric memory discovery
    def discover(self) -> None:
        torch = self.torch
        info: dict = {"import_error": None}
        self.symm = None
        try:
            import torch.distributed._symmetric_memory as symm_mem
            self.symm = symm_mem
        except Exception as e:  # noqa: BLE001
            info["import_error"] = short(e)
        info["functions"] = {f: hasattr(self.symm, f) for f in SYMM_FUNCS} if self.symm else {}
        ns = getattr(torch.ops, "symm_mem", None)
        info["ops"] = {o: bool(ns is not None and hasattr(ns, o)) for o in P2P_OPS}
        info["multimem_ops_present_not_used"] = {o: bool(ns is not None and hasattr(ns, o)) for o in MULTIMEM_OPS}
        # Deprecated (a FutureWarning, no longer needed) from torch 2.11 on; older releases required it.
        info["enable_symm_mem_for_group_called"] = False
        try:
            major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
        except ValueError:
            major, minor = 99, 0
        if self.symm is not None and hasattr(self.symm, "enable_symm_mem_for_group") and (major, minor) < (2, 11):
            try:
                self.symm.enable_symm_mem_for_group(self.group_name)
                info["enable_symm_mem_for_group_called"] = True
            except Exception as e:  # noqa: BLE001
                info["enable_symm_mem_for_group_error"] = short(e)
        self.report["symm_mem"] = info

    def symm_buffer(self, dtype):
        """A rendezvoused symmetric [1, 1, hidden] buffer (kept alive to the end) and its handle."""
        if self.symm is None:
            raise RuntimeError(f"torch.distributed._symmetric_memory unavailable: {self.report['symm_mem']}")
        buf = self.symm.empty(1, 1, self.args.hidden, dtype=dtype, device=self.device)
        buf.zero_()
        self.wait_gpu("zero symmetric buffer")
        handle = self.symm.rendezvous(buf, self.group_name)
        self.keep += [buf, handle]
        info = self.report["symm_mem"]
        if "backend" not in info and hasattr(self.symm, "get_backend"):
            try:
                info["backend"] = self.symm.get_backend(self.device)
            except Exception as e:  # noqa: BLE001
                info["backend"] = f"? {short(e, 120)}"
        if "multicast_ptr" not in info:
            info["multicast_ptr"] = int(getattr(handle, "multicast_ptr", 0) or 0)
        return buf

    # ---------------------------------------------------------------- methods
    def make(self, name: str, dtype):
        """(setup, all_reduce, after, ar_result, state, load, mul_kind) closures over one method's tensors."""
        torch, a, s = self.torch, self.args, self.scale
        shape = (1, 1, a.hidden)
        t: dict = {}
        ops = getattr(torch.ops, "symm_mem", None)
        gn = self.group_name

        if name == "nccl":
            def setup():
                t["x"] = torch.zeros(shape, dtype=dtype, device=self.device)
            return dict(setup=setup, ar=lambda: self.dist.all_reduce(t["x"]), after=lambda: t["x"].mul_(s),
                        result=lambda: t["x"], state=lambda: t["x"], load=lambda v: t["x"].copy_(v), kind="inplace")

        op_name = SYMM_OP[name]
        if ops is None or not hasattr(ops, op_name):
            raise LookupError(f"torch.ops.symm_mem.{op_name} not in this torch {torch.__version__}")
        op = getattr(ops, op_name)

        def setup_buf():
            t["buf"] = self.symm_buffer(dtype)
            t["out"] = torch.zeros(shape, dtype=dtype, device=self.device)

        mul_out_to_buf = lambda: torch.mul(t["out"], s, out=t["buf"])  # noqa: E731
        if name == "symm_one_shot_out":
            return dict(setup=setup_buf, ar=lambda: op(t["buf"], "sum", gn, t["out"]), after=mul_out_to_buf,
                        result=lambda: t["out"], state=lambda: t["buf"], load=lambda v: t["buf"].copy_(v), kind="out")
        if name == "symm_one_shot":
            def ar():
                t["out"] = op(t["buf"], "sum", gn)  # allocated by the op (inside the graph's pool when capturing)
            return dict(setup=setup_buf, ar=ar, after=mul_out_to_buf, result=lambda: t["out"], state=lambda: t["buf"],
                        load=lambda v: t["buf"].copy_(v), kind="out")
        if name == "symm_one_shot_copy_out":
            def setup_copy():
                setup_buf()
                t["x"] = torch.zeros(shape, dtype=dtype, device=self.device)
            return dict(setup=setup_copy, ar=lambda: op(t["buf"], t["x"], "sum", gn, t["out"]),
                        after=lambda: torch.mul(t["out"], s, out=t["x"]), result=lambda: t["out"],
                        state=lambda: t["x"], load=lambda v: t["x"].copy_(v), kind="out")
        if name == "symm_two_shot_inplace":
            return dict(setup=setup_buf, ar=lambda: op(t["buf"], "sum", gn), after=lambda: t["buf"].mul_(s),
                        result=lambda: t["buf"], state=lambda: t["buf"], load=lambda v: t["buf"].copy_(v),
                        kind="inplace")
        if name == "symm_two_shot_out":
            return dict(setup=setup_buf, ar=lambda: op(t["buf"], "sum", gn, t["out"]), after=mul_out_to_buf,
                        result=lambda: t["out"], state=lambda: t["buf"], load=lambda v: t["buf"].copy_(v), kind="out")
        raise ValueError(name)

    # ---------------------------------------------------------------- the steps every method goes through
    def inputs_for(self, dtype):
        """This rank's input (multiples of 1/64 in [-1, 1]: sums exact in fp16 and bf16) and its NCCL sum."""
        key = str(dtype).replace("torch.", "")
        if key not in self.inputs:
            def make():
                torch = self.torch
                g = torch.Generator(device=self.device)
                g.manual_seed(1234 + 7919 * self.rank)
                x = torch.randint(-64, 65, (1, 1, self.args.hidden), generator=g, device=self.device)
                x = (x.float() / 64).to(dtype)
                ref = x.clone()
                self.dist.all_reduce(ref)
                self.wait_gpu("NCCL reference all-reduce")
                return x, ref
            self.inputs[key] = self.phase(f"reference/{key}", make)
        return self.inputs[key]

    def max_err(self, got, want) -> float:
        self.wait_gpu("result check")
        return float((got.float() - want.float()).abs().max().item())

    def eager_check(self, m: dict, x, ref) -> float:
        m["load"](x)
        m["ar"]()
        err = self.max_err(m["result"](), ref)
        m["after"]()
        self.wait_gpu("eager step")
        if not err <= self.args.tol:
            raise ValueError(f"eager all-reduce differs from the NCCL sum: max abs err {err:.3g} > {self.args.tol}")
        return err

    def capture(self, body):
        """One graph of --layers calls of body, after one eager pass on a side stream (as neox_rt/engine/graphs.py)."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.args.layers):
                body()
        torch.cuda.current_stream().wait_stream(side)
        self.wait_gpu("before capture")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode=self.args.capture_error_mode):
            for _ in range(self.args.layers):
                body()
        self.wait_gpu("after capture")
        return g

    def graph_check(self, m: dict, g, x, ref) -> float:
        m["load"](x)
        g.replay()
        err = self.max_err(m["state"](), ref * self.scale)
        if not err <= self.args.tol:
            raise ValueError(f"graph replay result differs from NCCL sum / world: max abs err {err:.3g}")
        return err

    def time_graph(self, label: str, g) -> list:
        """Warm-up replays, then --repeats timed runs, each its own phase: the agreement that ends one phase is the
        barrier before the next (no other collective runs inside a phase, so a failing rank cannot mismatch one)."""
        torch, a = self.torch, self.args

        def warm():
            for _ in range(a.warmup):
                g.replay()
            self.wait_gpu("warm-up replays")

        def timed() -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(a.iters):
                g.replay()
            end.record()
            self.wait_gpu("timed replays")
            return start.elapsed_time(end) * 1000.0 / (a.iters * a.layers)

        self.phase(f"{label}/warmup", warm)
        return [self.phase(f"{label}/time{i}", timed) for i in range(a.repeats)]

    def combine(self, us: list) -> dict:
        """Per-repeat max over ranks (the slowest rank sets the pace), median over repeats."""
        per_rank: list = [None] * self.world
        try:
            self.dist.all_gather_object(per_rank, us, group=self.cpu_group)
        except Exception as e:  # noqa: BLE001
            self.poisoned = True
            raise PhaseError(f"gathering timings failed ({short(e, 300)}); ranks out of step") from None
        worst = [max(r[i] for r in per_rank) for i in range(len(us))]
        return {"us_per_layer": statistics.median(worst), "per_repeat_us_per_layer": worst,
                "per_rank_us_per_layer": per_rank}

    def baseline(self, dtype, kind: str) -> dict:
        key = f"{str(dtype).replace('torch.', '')}/{kind}"
        if key not in self.baselines:
            torch, s = self.torch, self.scale
            rec: dict = {"graph": "x.mul_(s)" if kind == "inplace" else "torch.mul(y, s, out=x)"}
            try:
                x = torch.ones((1, 1, self.args.hidden), dtype=dtype, device=self.device)
                y = torch.ones_like(x)
                body = (lambda: x.mul_(s)) if kind == "inplace" else (lambda: torch.mul(y, s, out=x))
                g = self.phase(f"baseline/{key}/capture", lambda: self.capture(body))
                rec.update(self.combine(self.time_graph(f"baseline/{key}", g)))
                del g
            except PhaseError as e:
                rec["error"] = str(e)
            self.baselines[key] = rec
        return self.baselines[key]

    def run_method(self, name: str, dtype) -> dict:
        torch = self.torch
        call = "torch.distributed.all_reduce" if name == "nccl" else f"torch.ops.symm_mem.{SYMM_OP[name]}"
        rec: dict = {"ok": False, "dtype": str(dtype).replace("torch.", ""), "error": None, "call": call}
        try:
            m = self.make(name, dtype)
        except LookupError as e:
            rec["error"] = f"unavailable: {e}"
            return rec
        g = None
        try:
            x, ref = self.inputs_for(dtype)
            self.phase(f"{name}/setup", m["setup"])
            rec["eager_max_abs_err"] = self.phase(f"{name}/eager-check", lambda: self.eager_check(m, x, ref))

            def layer():
                m["ar"]()
                m["after"]()
            g = self.phase(f"{name}/capture", lambda: self.capture(layer))
            rec["graph_max_abs_err"] = self.phase(f"{name}/graph-check", lambda: self.graph_check(m, g, x, ref))
            timing = self.combine(self.time_graph(name, g))
            base = self.baseline(dtype, m["kind"])
            rec["graph_us_per_layer"] = timing["us_per_layer"]
            rec["baseline_us_per_layer"] = base.get("us_per_layer")
            rec["allreduce_us"] = (timing["us_per_layer"] - base["us_per_layer"]) if "us_per_layer" in base else None
            rec["per_repeat_us_per_layer"] = timing["per_repeat_us_per_layer"]
            rec["per_rank_us_per_layer"] = timing["per_rank_us_per_layer"]
            rec["baseline"] = f"{rec['dtype']}/{m['kind']}"
            rec["ok"] = True
        except PhaseError as e:
            rec["error"] = str(e)
        finally:
            del g
            if not self.poisoned:  # every rank knows (phase agreements), so every rank takes this branch or none
                def teardown():
                    self.wait_gpu(f"{name} teardown")
                    torch.cuda.empty_cache()
                try:
                    self.phase(f"{name}/teardown", teardown)
                except PhaseError as e:
                    rec["teardown_error"] = str(e)
        return rec

    # ---------------------------------------------------------------- driver
    def run(self) -> None:
        torch, a = self.torch, self.args
        dtype = getattr(torch, a.dtype)
        self.discover()
        methods = self.report["methods"]
        fell_back = False
        for name in a.methods:
            if self.poisoned:
                methods[name] = {"ok": False, "error": "skipped: an earlier GPU hang or lost agreement stopped the run"}
                continue
            rec = self.run_method(name, dtype)
            if (not rec["ok"] and name != "nccl" and dtype == torch.float16 and not a.no_bf16_fallback
                    and not self.poisoned and rec["error"] and "Half" in rec["error"]):
                fp16_error = rec["error"]
                rec = self.run_method(name, torch.bfloat16)
                rec["fp16_error"] = fp16_error
                rec["note"] = "fp16 rejected by the op; timed in bf16 (same bytes)"
                fell_back = True
            methods[name] = rec
            self.save()
        if fell_back and not self.poisoned:
            methods["nccl_bf16"] = self.run_method("nccl", torch.bfloat16)
        self.save("done" if not self.poisoned else "aborted: GPU hang or ranks out of step")

    def table(self) -> str:
        lines = [f"allreduce_probe: world {self.world}, [1, 1, {self.args.hidden}], {self.args.layers} calls per "
                 f"graph, {self.report['gpu']}, torch {self.report['torch']}, NCCL {self.report['nccl']}"]
        def num(v, spec: str) -> str:
            return format(v, spec) if isinstance(v, (int, float)) else "  n/a"

        for name, r in self.report["methods"].items():
            if r.get("ok"):
                lines.append(f"  {name:<23} {r['dtype']:<8} graph {num(r['graph_us_per_layer'], '7.2f')} us/layer  "
                             f"base {num(r['baseline_us_per_layer'], '5.2f')}  "
                             f"allreduce {num(r['allreduce_us'], '6.2f')} us  "
                             f"(err {num(r['graph_max_abs_err'], '.1g')})")
            else:
                lines.append(f"  {name:<23} {r.get('dtype', '-'):<8} FAILED {str(r.get('error'))[:150]}")
        lines.append(f"JSON: {os.path.abspath(self.out_path)}")
        return "\n".join(lines)

    def close(self) -> None:
        if self.poisoned:
            return  # a kernel may never end or a rank is gone: tearing down could hang; the caller exits
        faulthandler.dump_traceback_later(self.hard_timeout, exit=True)
        try:
            self.wait_gpu("final")
            self.dist.barrier(group=self.cpu_group)
            self.dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001
            print(f"rank {self.rank}: teardown: {short(e)}", file=sys.stderr)
        finally:
            faulthandler.cancel_dump_traceback_later()


def main(argv=None) -> int:
    args = parse_args(argv)
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        print("allreduce_probe: run under torchrun, e.g. torchrun --nproc-per-node 2 bench/allreduce_probe.py",
              file=sys.stderr)
        return 2
    for k, v in ENV_DEFAULTS.items():  # before torch / NCCL / symmetric memory read them
        os.environ.setdefault(k, v)
    import torch

    if not torch.cuda.is_available():
        print("allreduce_probe: no CUDA device", file=sys.stderr)
        return 2
    probe = Probe(args)
    try:
        probe.run()
    except Exception as e:  # noqa: BLE001 - keep what was measured
        probe.report["fatal"] = short(e, 2000)
        probe.save("failed")
        traceback.print_exc()
    if probe.rank == 0:
        print(probe.table(), flush=True)
    if probe.poisoned:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
    probe.close()
    return 0 if probe.report.get("status") == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
