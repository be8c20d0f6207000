"""The Makefile reuses an installed .venv by content, not by file times, and runs this checkout's src/.

A fresh clone gives every file a new mtime; with a time-based stamp `make demo` in a clone that shares an
existing .venv (or a checkout whose files were touched) reinstalled everything. `make -n` shows what would run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _make(*args: str) -> str:
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout


def test_matching_stamp_reuses_the_venv_and_runs_this_checkout(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    key = _make("--eval", "print-key: ; @echo $(INSTALL_KEY)", "print-key").strip()
    stamp = venv / ".installed"
    stamp.write_text(key + "\n")
    os.utime(stamp, (0, 0))  # as in a fresh clone: every file of the checkout newer than the stamp
    plan = _make("-n", "demo", f"VENV={venv}")
    assert "pip install" not in plan
    assert f"PYTHONPATH=src HF_HUB_OFFLINE=1 {venv}/bin/python -m craft.demo" in plan


def test_missing_or_stale_stamp_installs(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    assert "pip install" in _make("-n", "demo", f"VENV={venv}")
    (venv / ".installed").write_text("0\n")
    assert "pip install" in _make("-n", "test", f"VENV={venv}")
