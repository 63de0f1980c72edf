"""torchrun + DistributedDataParallel behind the loop's `Parallel` seam, chosen by configuration:

    methods:
      terngrad:
        teacher: {..., parallel: {nproc: 2}}                          # gloo on CPU, nccl on GPUs
        student: {..., parallel: {nproc: 2, comm_hook: terngrad}}

`launch` runs `python -m torch.distributed.run --standalone --nproc-per-node N -m MODULE ARGS` (a
free rendezvous port, so concurrent trainings do not collide) and raises with the failed rank's
output; `init_from_env` is what each of those processes calls first: the process group from
torchrun's environment, its device (cuda:LOCAL_RANK on a GPU worker), and the `Parallel` that
wraps the model in DDP with the configured communication hook.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

import torch

from ..platform.params import ParallelParams
from .comm_hooks import HOOKS, CommState
from .parallel import Parallel


def launch(module: str, args: Sequence[str], nproc: int, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *args]
    # one thread per rank unless the caller says otherwise (torchrun's own default, without its warning)
    env = {"OMP_NUM_THREADS": "1", **os.environ, **(env or {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"torchrun ({nproc} processes, {module}) exited {proc.returncode}:\n"
                           f"{first_traceback(proc.stderr) or proc.stderr[-3000:]}")


def first_traceback(text: str) -> str:
    """The traceback of the first rank that printed one (torchrun prefixes each line with `[rankN]: `;
    its own summary, which comes after, says only which rank failed)."""
    lines = text.splitlines()
    first = next((line for line in lines if "Traceback (most recent" in line), None)
    if first is None:
        return ""
    prefix = first[:first.index("Traceback")]
    return "\n".join(line[len(prefix):] for line in lines if line.startswith(prefix))


def backend_for(pp: ParallelParams, device: torch.device) -> str:
    return ("nccl" if device.type == "cuda" else "gloo") if pp.backend == "auto" else pp.backend


def init_from_env(pp: ParallelParams, device: torch.device, seed: int) -> tuple[Parallel, torch.device]:
    """Joins torchrun's process group; returns this rank's `Parallel` and device."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(pp, device))
    ids = [device.index] if device.type == "cuda" else None
    parallel = Parallel(world_size=dist.get_world_size(), rank=dist.get_rank(),
                        parallelize=lambda model: DDP(model, device_ids=ids),
                        comm_hook=(CommState(seed, pp.clip_sigmas), HOOKS[pp.comm_hook]))
    return parallel, device


def close() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
