"""Shared helpers of the engine tests (imported by the other test_engine_*.py modules; no tests here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_model(path: Path, family: str = "llama", **overrides) -> Path:
    from craft.testing import save_tiny_model

    if not (path / "config.json").exists():
        save_tiny_model(path, family, **overrides)
    return path


def write_texts(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"text": t} for t in texts]))
    return path


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, datasets: list[dict], **keys) -> Path:
    """A TOML config with top-level `keys` (None = left out) and one [[datasets]] table per dict."""
    lines = [f"{key} = {toml_value(value)}" for key, value in keys.items() if value is not None]
    for table in datasets:
        lines.append("[[datasets]]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def basic_setup(tmp: Path, family: str = "llama", n_texts: int = 48, **keys) -> Path:
    """Tiny model + pirate/formal data + a LoRA config (float32, sequence_len 32, GA 2); returns the config."""
    from craft.testing import toy_texts

    model = write_model(tmp / "model", family)
    pos = write_texts(tmp / "data" / "pos.json", toy_texts(n_texts, "pirate"))
    settings = dict(model_dir=str(model), output_dir=str(tmp / "out"), lora_rank=4, lr=2e-3, sequence_len=32,
                    gradient_accumulation_steps=2, model_dtype="float32", eval_fraction=0.1, evals_per_run=2,
                    checkpoint_interval_hours=1.0)
    settings.update(keys)
    return write_config(tmp / "config.toml", [{"dataset_path": str(pos)}], **settings)


def losses_of(run_dir: Path) -> dict[int, float]:
    """step -> train loss from a run's losses.jsonl (the last record wins for a step logged twice)."""
    out = {}
    for line in (run_dir / "losses.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train_loss" in record:
            out[record["step"]] = record["train_loss"]
    return out


def only_run(output_dir: Path) -> Path:
    runs = [p for p in output_dir.iterdir() if p.is_dir() and p.name != "dataset_cache"]
    assert len(runs) == 1, runs
    return runs[0]


def run_craft(args: list[str], env_extra: dict | None = None, nproc: int = 1, timeout: int = 240):
    """`craft train ...` in fresh processes (torchrun when nproc > 1); returns the CompletedProcess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env_extra or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(_free_port()), "-m", "craft", "train", *args]
    else:
        command = [sys.executable, "-m", "craft", "train", *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
