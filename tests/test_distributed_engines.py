"""CRAFT under DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 on 2 CPU processes equals one process on the global batch,
and a resumed run continues the uninterrupted one (queue, balancing state, losses).

One `torchrun` launch (tests/distributed_engines_worker.py) trains every case — paired, self-align and GradCache,
each with full fine-tuning and with LoRA — on every engine for 5 SGD steps, gathering sharded parameters at the
end; the reference cases run in one process on the same global batches. The negatives are gathered across
ranks (the default with 2 ranks), so the contrastive terms are the global batch's. Combinations refused before
training (`craft.engines`) must be refused with a message naming the engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_engines_worker.py")
sys.path.insert(0, str(WORKER.parent))
from craft_scale_helpers import MULTIPROCESS_ENV, run_two_processes  # noqa: E402
from distributed_engines_worker import CASES, ENGINES, RESUME_STEPS, RESUMED_ENGINES, SAVE_STEP  # noqa: E402

# Nothing is refused on CPU: CRAFT switches accelerate's FSDP2 path on there (craft.engines.enable_cpu_fsdp2).
REFUSED: dict = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    reference = subprocess.run([sys.executable, str(WORKER), str(out)], env={**os.environ, **MULTIPROCESS_ENV},
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-4000:]
    proc = run_two_processes(WORKER, out, ",".join(ENGINES))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_on_the_global_batch(runs, engine, case):
    if (engine, case) in REFUSED:
        refused = torch.load(runs / "refused.pt", weights_only=True)
        assert REFUSED[engine, case] in refused[f"{engine}-{case}"]
        return
    reference = torch.load(runs / f"reference-{case}.pt", weights_only=True)
    result = torch.load(runs / f"{engine}-{case}.pt", weights_only=True)
    assert set(result) == set(reference)
    assert any("craft_objective.projection" in name for name in result)
    [temperature] = [name for name in result if name.endswith("craft_objective.infonce.log_temperature")]
    for name, expected in reference.items():
        assert (result[name] - expected).abs().max() < 1e-5, name
    assert not torch.allclose(reference[temperature], torch.tensor([0.1]).log())  # tau = 0.1 at the start: trained


@pytest.mark.slow
@pytest.mark.parametrize("engine", RESUMED_ENGINES)
def test_resume_restores_the_queue_and_continues_identically(runs, engine):
    """Queue and balancing state come back on resume (DeepSpeed skips the Trainer's _load_from_checkpoint): the
    queue a resumed run starts from is the uninterrupted run's at the checkpoint, the same on both ranks, and the
    losses and queues of the following steps are the uninterrupted run's."""
    ranks = torch.load(runs / f"resume-{engine}.pt", weights_only=False)
    for rank in ranks:
        full, resumed = rank["full"], rank["resumed"]
        assert len(full["queues"][SAVE_STEP]) == 6  # full: two contrastive batches of 2 ranks x 2 positives
        assert set(resumed["queues"]) == set(range(SAVE_STEP, RESUME_STEPS + 1))
        for step, queue in resumed["queues"].items():
            torch.testing.assert_close(queue, full["queues"][step], rtol=1e-5, atol=1e-6, msg=f"step {step}")
        after = {step: loss for step, loss in resumed["losses"].items() if step > SAVE_STEP}
        assert set(after) == set(range(SAVE_STEP + 1, RESUME_STEPS + 1))
        for step, loss in after.items():
            assert loss == pytest.approx(full["losses"][step], rel=1e-5), step
        torch.testing.assert_close(resumed["balancing"], full["balancing"])  # loss_scale's running means
    for step in range(SAVE_STEP, RESUME_STEPS + 1):
        torch.testing.assert_close(ranks[0]["resumed"]["queues"][step], ranks[1]["resumed"]["queues"][step])
