"""What every benchmark records about where it ran: the commit (NEOX_RT_COMMIT on the device, whose copy of
the tree has no git history, else git) and the GPU driver."""
from __future__ import annotations

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str], timeout: float = 20) -> str | None:
    """stdout of a command, stripped; None if it cannot run."""
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except Exception:  # noqa: BLE001 - missing tool, timeout: the report just lacks the field
        return None


def git_commit() -> str | None:
    return os.environ.get("NEOX_RT_COMMIT") or run(["git", "rev-parse", "HEAD"]) or None


def gpu_driver() -> str | None:
    return run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])


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
