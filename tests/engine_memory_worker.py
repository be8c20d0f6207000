"""Worker of tests/test_engine_memory_stages.py: `torchrun --nproc_per_node 2 tests/engine_memory_worker.py CONFIG`.

Trains CONFIG (2 pipeline stages, one per process) once per memory mode, one run after the other in this one
launch, each into its own `output_dir` (`<config dir>/<name>`): no checkpointing with the plain loss, checkpointing
with the chunked loss, and offload with the chunked loss. One process group serves all runs (`train` uses an existing
group as it is).
"""

from __future__ import annotations

import sys

from craft.engine.config import load_config
from craft.engine.train import train

MODES = {"plain": ("false", 0), "checkpointed": ("true", 8), "offloaded": ('"offload"', 5)}

if __name__ == "__main__":
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    config_path = sys.argv[1]
    root = config_path.rsplit("/", 1)[0]
    for name, (checkpointing, chunk_size) in MODES.items():
        config = load_config(config_path, [f'output_dir="{root}/{name}"', "pipeline_stages=2",
                                           f"activation_checkpointing={checkpointing}", f"chunk_size={chunk_size}"])
        train(config, show_progress=False)
    from craft.shutdown import end_launched_process

    end_launched_process(0)  # barrier, destroy, and no Python finalization racing DeepSpeed's gloo threads
