"""What every benchmark records about where it ran: the commit (NEOX_RT_COMMIT on the device, whose copy of
the tree has no git history, else git), the GPU driver, and ``environment()`` / ``write_result()``: the one way a
bench script writes a JSON result, with the environment block (GPUs, driver, CUDA, torch, triton, commit, UTC time;
no host name) under the key "environment", so that every file in bench/results/ says where and on what it ran."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str], timeout: float = 20) -> str | None:
    """stdout of a command, stripped; None if it cannot run."""
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except Exception:  # noqa: BLE001 - missing tool, timeout: the report just lacks the field
        return None


def git_commit(short: bool = False) -> str | None:
    """NEOX_RT_COMMIT if set (the device's copy has no git history; taken as given), else git's HEAD (``short``:
    ``git rev-parse --short HEAD``)."""
    return (os.environ.get("NEOX_RT_COMMIT")
            or run(["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]) or None)


def git_dirty() -> bool | None:
    """Whether the work tree differs from HEAD in tracked files (as ``git describe --dirty``); None without git or
    when NEOX_RT_COMMIT names the commit (a copy without history: unknown)."""
    if os.environ.get("NEOX_RT_COMMIT"):
        return None
    out = run(["git", "status", "--porcelain", "--untracked-files=no"])
    return None if out is None else bool(out)


def gpu_driver() -> str | None:
    return run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])


def environment() -> dict:
    """Where a result was measured: GPU name(s), driver, CUDA, torch, triton, Python, the commit (short hash,
    "-dirty" when tracked files differ from it) and the UTC time. GPU fields are None without a CUDA device; no host
    name. Cheap enough to call once per result file (two git calls, one nvidia-smi)."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - torch missing: the block just lacks its fields
        torch = None
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    gpus = None
    if torch is not None and torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    driver = None
    if gpus:  # nvidia-smi prints one line per GPU: the distinct versions, comma-separated
        lines = (gpu_driver() or "").splitlines()
        driver = ",".join(dict.fromkeys(x.strip() for x in lines if x.strip())) or None
    commit, dirty = git_commit(short=True), git_dirty()
    return {
        "gpu": gpus[0] if gpus else None,
        "gpus": gpus,
        "driver": driver,
        "cuda": getattr(getattr(torch, "version", None), "cuda", None),
        "torch": getattr(torch, "__version__", None),
        "triton": triton_version,
        "python": ".".join(map(str, sys.version_info[:3])),
        "commit": None if commit is None else commit + ("-dirty" if dirty else ""),
        "commit_source": "NEOX_RT_COMMIT" if os.environ.get("NEOX_RT_COMMIT") else ("git" if commit else None),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _json_default(o):
    return o.tolist() if hasattr(o, "tolist") else str(o)


def write_result(path: str, payload: dict, env: dict | None = None, key: str = "environment") -> dict:
    """Write ``payload`` as JSON (indent 1) to ``path`` with ``environment()`` (or ``env``, computed once by a caller
    that writes the same result several times) under ``key``; folders are created, the file is replaced atomically
    (a temporary file beside it, then a rename). Values JSON cannot hold go through ``tolist()`` or ``str()``.
    ``payload`` is not changed; the dict written is returned."""
    if key in payload:
        raise ValueError(f"write_result: the payload already has a {key!r} field")
    out = dict(payload)
    out[key] = environment() if env is None else env
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)
    return out


def simulated_tp(size: int, allreduce_us: float = 0.0):
    """Rank 0's shard of a TP=``size`` model on ONE device, the collectives replaced by local stand-ins
    (all-reduce: identity, all-gather: the local shard repeated, broadcast: identity). Numerically meaningless,
    timing-exact for everything but the communication: the per-rank compute of a TP decode on a card of which
    only one is lent (add the all-reduce share measured on a pair).

    ``allreduce_us`` > 0: on a GPU each all-reduce is a one-thread kernel that spins that long (torch.cuda._sleep,
    calibrated once), standing in for the time an NVLink all-reduce keeps the next layer waiting while moving next
    to no memory (what an overlap with that wait can win; bench/NOTES.md, session 8)."""
    import torch

    from neox_rt.parallel import TensorParallel

    spin_cycles = 0
    if allreduce_us > 0 and torch.cuda.is_available():  # calibrated here, never inside a graph capture
        torch.cuda._sleep(1000)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(4_000_000)
        b.record()
        b.synchronize()
        spin_cycles = int(allreduce_us * 4_000_000 / (a.elapsed_time(b) * 1000))

    class SimulatedTP(TensorParallel):
        def all_reduce(self, x):
            self.all_reduce_calls += 1
            if spin_cycles and x.is_cuda:
                torch.cuda._sleep(spin_cycles)
            return x

        def all_gather_last_dim(self, x):
            return torch.cat([x] * self.size, dim=-1)

        def broadcast(self, x, src=0):
            return x

    return SimulatedTP(rank=0, size=size)
