"""Training steps of the one loop under torchrun, timed inside the ranks: what ddp_scaling.py and
terngrad.py measure. Not a benchmark itself.

    measure(nproc=2, threads=1, hook="terngrad", model="digits_cnn", ...) -> dict

Each rank runs `tasks.train.loop.fit` (the pipeline's loop, through the same `Parallel` seam as a
method's training: tasks/train/distributed.py) on a fixed random data set, without validation. An
epoch is timed from its first to its last step; the first epoch (warm-up: allocation, gloo's first
collectives) is dropped. `nproc=0` is the plain single-process loop, no DDP at all.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(nproc: int, threads: int, hook: str = "allreduce", model: str = "digits_cnn",
            model_kwargs: dict | None = None, n: int = 2048, batch: int = 64, epochs: int = 4) -> dict:
    spec = {"nproc": nproc, "hook": hook, "model": model, "model_kwargs": model_kwargs or {}, "n": n,
            "batch": batch, "epochs": epochs}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [str(Path(__file__).resolve()), json.dumps(spec), str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if nproc == 0:
            cmd = [sys.executable, *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        return json.loads(out.read_text())


def _worker(spec: dict, out: str) -> None:
    import torch

    import models
    import models.vision  # noqa: F401
    from models.distill import DistillationLoss
    from tasks.kinds.base import BatchedDataset
    from tasks.platform.params import ParallelParams, TrainParams
    from tasks.train.distributed import close, init_from_env
    from tasks.train.loop import fit
    from tasks.train.parallel import SINGLE

    class Random(BatchedDataset):
        def __init__(self, n: int) -> None:
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.rand(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)

        def __len__(self) -> int:
            return len(self.y)

        def __getitems__(self, index):
            index = torch.as_tensor(index)
            return self.x[index], self.y[index], index

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    parallel = SINGLE
    if spec["nproc"]:
        parallel, _ = init_from_env(ParallelParams(nproc=spec["nproc"], comm_hook=spec["hook"]),
                                    torch.device("cpu"), seed=0)
    try:
        torch.manual_seed(0)
        model = models.create_model(spec["model"], **spec["model_kwargs"])
        cfg = TrainParams(epochs=spec["epochs"], batch_size=spec["batch"], lr=0.003)
        history = fit(model, DistillationLoss({"ce": {}}), Random(spec["n"]), cfg, seed=0,
                      forward=lambda m, x: {"logits": m(x)}, validate=lambda m: {}, parallel=parallel)
        if parallel.is_main:
            seconds = statistics.median(row["epoch_seconds"] for row in history[1:])
            steps = -(-spec["n"] // spec["batch"])
            result = {**spec, "threads": torch.get_num_threads(),
                      "n_params": sum(p.numel() for p in model.parameters()),
                      "epoch_seconds": [row["epoch_seconds"] for row in history],
                      "samples_per_s": spec["n"] / seconds, "step_ms": 1000 * seconds / steps,
                      "comm_bytes_per_step": history[-1].get("comm_bytes_per_step"),
                      "final_train_loss": history[-1]["train_loss"]}
            Path(out).write_text(json.dumps(result))
    finally:
        close()


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]), sys.argv[2])
