"""A torchrun rank for tests/test_ddp.py's resume test: the one loop on a fixed toy set, DDP over
gloo with the TernGrad hook (stochastic rounding: its draws must resume too), a checkpoint every 3
steps; `crash_at` kills rank 1 (os._exit, like a SIGKILL: no cleanup) when it fetches that many
batches. Rank 0 writes the final weights to `out`.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_resume_worker.py CKPT OUT [CRASH_AT]
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
import models.vision  # noqa: E402,F401
from models.distill import DistillationLoss  # noqa: E402
from tasks.kinds.base import BatchedDataset  # noqa: E402
from tasks.platform.params import ParallelParams, TrainParams  # noqa: E402
from tasks.train.checkpoint import Checkpointer  # noqa: E402
from tasks.train.distributed import close, init_from_env  # noqa: E402
from tasks.train.loop import fit  # noqa: E402


class Toy(BatchedDataset):
    def __init__(self, crash_at: int | None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.rand(200, 64, generator=g), torch.randint(0, 10, (200,), generator=g)
        self.crash_at, self.fetched = crash_at, 0

    def __len__(self):
        return len(self.y)

    def __getitems__(self, index):
        self.fetched += 1
        if self.crash_at and self.fetched == self.crash_at:
            os._exit(9)
        index = torch.as_tensor(index)
        return self.x[index], self.y[index], index


def main(ckpt: str, out: str, crash_at: str | None = None) -> None:
    parallel, _ = init_from_env(ParallelParams(nproc=2, comm_hook="terngrad"), torch.device("cpu"), seed=0)
    try:
        torch.manual_seed(0)
        model = models.create_model("digits_cnn")  # has dropout: each rank's RNG must resume too
        if not parallel.is_main:
            torch.manual_seed(1009 + parallel.rank)
        crash = int(crash_at) if crash_at and parallel.rank == 1 else None
        cfg = TrainParams(epochs=2, batch_size=32, lr=0.01, checkpoint_every=3)
        fit(model, DistillationLoss({"ce": {}}), Toy(crash), cfg, seed=0, forward=lambda m, x: {"logits": m(x)},
            validate=lambda m: {}, parallel=parallel, checkpoint=Checkpointer(ckpt or None, 3))
        if parallel.is_main:
            torch.save(model.state_dict(), out)
    finally:
        close()


if __name__ == "__main__":
    main(*sys.argv[1:])
