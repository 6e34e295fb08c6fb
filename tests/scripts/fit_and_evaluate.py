"""`mst-clipiqa fit ARGS`, then `validate` and `test` of the last checkpoint on the same trainer; rank 0 writes the
results as JSON. Meant for a launcher that starts one process per rank (torchrun, srun):

    PYTHONPATH=tests torchrun --standalone --nproc_per_node 2 tests/scripts/fit_and_evaluate.py OUT.json ARGS...

OUT.json holds the validation and test metrics of the last checkpoint, its path, the world size and the cluster
environment Lightning detected.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scripts.runs import in_process

if __name__ == "__main__":
    cli = in_process("fit", sys.argv[2:])
    trainer = cli.trainer
    checkpoint = trainer.checkpoint_callback.last_model_path
    (validated,) = trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint, verbose=False)
    (tested,) = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint, verbose=False)
    if trainer.is_global_zero:
        environment = type(trainer._accelerator_connector.cluster_environment).__name__
        out = {**validated, **tested, "checkpoint": checkpoint, "world_size": trainer.world_size}
        Path(sys.argv[1]).write_text(json.dumps({**out, "cluster_environment": environment}))
