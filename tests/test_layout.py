"""The package's shape (issue 13): no module over ~500 lines, and data flows one way, so the contrastive pieces
import without the trainers."""

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 500


def test_no_module_over_500_lines():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert sizes, "no module found under src/"
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_contrastive_modules_do_not_import_the_trainers():
    modules = ("craft.gradcache", "craft.objective", "craft.losses", "craft.data", "craft.loader", "craft.collator")
    code = ("import sys; " + "; ".join(f"import {m}" for m in modules)
            + "; print(sorted(m for m in sys.modules if m in ('craft.trainers', 'craft.trl_wrappers', 'trl')))")
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split("\n")[-2] == "[]"
