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
