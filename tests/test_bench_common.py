"""bench/common.py's result writer (CPU): the environment block every bench JSON carries, and the round trip."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
common = pytest.importorskip("common")

FIELDS = {"gpu", "gpus", "driver", "cuda", "torch", "triton", "python", "commit", "commit_source", "time_utc"}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def cpu_only(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("NEOX_RT_COMMIT", raising=False)


def test_environment_fields_on_cpu(cpu_only):
    import torch

    env = common.environment()
    assert set(env) == FIELDS
    assert env["gpu"] is None and env["gpus"] is None and env["driver"] is None
    assert env["torch"] == torch.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert datetime.fromisoformat(env["time_utc"]).utcoffset().total_seconds() == 0
    assert "host" not in json.dumps(env).lower()


def test_commit_is_the_short_head(cpu_only):
    env = common.environment()
    head = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    assert env["commit"] == head + ("-dirty" if dirty else "")
    assert env["commit_source"] == "git"


def test_commit_from_the_device_variable(cpu_only, monkeypatch):
    monkeypatch.setenv("NEOX_RT_COMMIT", "abc1234")
    env = common.environment()
    assert env["commit"] == "abc1234" and env["commit_source"] == "NEOX_RT_COMMIT"


def test_write_result_round_trip(cpu_only, tmp_path):
    torch = pytest.importorskip("torch")
    payload = {"bench": "x", "per_token_ms": {"p50": 1.25}, "rows": [1, 2, 3], "env": {"NEOX_RT_PDL": "0"}}
    path = tmp_path / "new" / "folder" / "result.json"
    written = common.write_result(str(path), payload)
    assert "environment" not in payload  # the caller's dict is left as it was
    back = json.loads(path.read_text())
    assert back == written
    env = back.pop("environment")
    assert back == payload
    assert set(env) == FIELDS and env["gpu"] is None
    assert path.read_text().startswith('{\n "bench"')  # indent 1
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary file left

    fixed = dict(env, time_utc="2000-01-01T00:00:00+00:00")
    common.write_result(str(path), {"t": torch.tensor([1.5, 2.5])}, env=fixed)  # tolist() for tensors
    assert json.loads(path.read_text()) == {"t": [1.5, 2.5], "environment": fixed}


def test_write_result_refuses_to_overwrite_the_key(tmp_path):
    with pytest.raises(ValueError):
        common.write_result(str(tmp_path / "r.json"), {"environment": {}}, env={})
