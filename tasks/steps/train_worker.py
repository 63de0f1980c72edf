"""One torchrun rank of a data-parallel training (started by `train_role.fit_distributed`).

    python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.steps.train_worker JOB RUN_ID OUT

Every rank builds the same model from the job's seed (DDP also broadcasts rank 0's weights) and
trains its shard of each global batch; rank 0 alone validates, writes checkpoints, logs the epochs
to the MLflow run RUN_ID and writes the final weights and history to OUT (atomically). The parent
logs the model and registers it: no other rank touches MLflow.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..kinds import get_kind
from ..platform import tracking
from ..platform.common import atomic_path
from ..train.distributed import close, init_from_env
from .train_role import UnitJob, fit_job, resolve_device


def main(argv: list[str]) -> None:
    job_file, run_id, out = argv
    job = UnitJob.from_json(Path(job_file).read_text())
    parallel, device = init_from_env(job.tp.parallel, resolve_device(job.device), job.seed)
    try:
        kind = get_kind(job.spec.kind)
        data = kind.load(job.data_dir)
        torch.manual_seed(job.seed)
        model = kind.build(job.spec, "teacher" if job.role == "teacher" else "student", data, job.tp)
        if not parallel.is_main:  # dropout draws its own masks on each rank
            torch.manual_seed(job.seed * 1009 + parallel.rank)
        logger = tracking.EpochLogger(run_id, job.ctx) if parallel.is_main else None
        history = fit_job(job, model, data, device, parallel, on_epoch=logger)
        if parallel.is_main:
            logger.close()
            with atomic_path(out) as tmp:
                torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "history": history}, tmp)
    finally:
        close()


if __name__ == "__main__":
    main(sys.argv[1:])
