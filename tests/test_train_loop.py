"""The one train loop: against a hand-written reference loop, DataLoader batches, optimizer/scheduler
from params, clipping, teacher caching only when asked, bf16, checkpoint + resume after SIGKILL, and
the data-parallel seam (a real one-process gloo DDP with a communication hook)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import models
import models.vision  # noqa: F401  (registers the digits models)
from conftest import REPO
from models.distill import DistillationLoss
from tasks.kinds.base import BatchedDataset
from tasks.platform.params import TrainParams
from tasks.train.checkpoint import Checkpointer
from tasks.train.loop import fit
from tasks.train.parallel import Parallel


class Toy(BatchedDataset):
    """A linearly separable 10-class problem on 64 inputs; records the batch sizes it serves."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 64, generator=g)
        w = torch.randn(64, 10, generator=torch.Generator().manual_seed(99))
        self.y = (self.x @ w).argmax(-1)
        self.fetched = []

    def __len__(self):
        return len(self.y)

    def __getitems__(self, index):
        index = torch.as_tensor(index)
        self.fetched.append(len(index))
        return self.x[index], self.y[index], index


def forward(model, x):
    return {"logits": model(x)}


def accuracy(model, data):
    model.eval()
    with torch.no_grad():
        return {"val_accuracy": float((model(data.x).argmax(-1) == data.y).float().mean())}


def run(model, cfg, seed=0, n=200, criterion=None, **kw):
    train, val = Toy(n, 0), Toy(64, 1)
    criterion = criterion or DistillationLoss({"ce": {}})
    hist = fit(model, criterion, train, cfg, seed=seed, forward=forward, validate=lambda m: accuracy(m, val), **kw)
    return hist, train


CFG = TrainParams(epochs=6, batch_size=32, lr=0.01)


def test_fit_learns_and_reports_one_row_per_epoch_from_batches_only():
    model = models.create_model("digits_mlp_tiny", hidden=32)
    seen = []
    hist, train = run(model, CFG, on_epoch=seen.append, n=512)
    assert [h["epoch"] for h in hist] == list(range(1, 7)) and seen == hist
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] and hist[-1]["val_accuracy"] > 0.3  # chance 0.1
    assert {"train_loss_ce", "epoch_seconds"} <= set(hist[0])
    # the warm-up batch of 2, then batches of at most 32: never the whole split at once
    assert train.fetched[0] == 2 and max(train.fetched[1:]) == 32 and len(train.fetched) == 1 + 6 * 16


def reference_loop(model, x, y, cfg, seed):
    """The pre-v2 loop, written out plainly: AdamW, cosine over all steps, a seeded permutation per
    epoch split into batches, one no-grad warm-up forward before the optimizer exists."""
    crit = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        model(x[torch.arange(2)])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            loss = crit(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


def test_the_loop_reaches_the_reference_loops_weights_exactly():
    cfg = TrainParams(epochs=3, batch_size=24, lr=0.003, weight_decay=1e-4)
    torch.manual_seed(7)
    ours = models.create_model("digits_cnn")  # batch norm and dropout: RNG and running stats must line up
    run(ours, cfg, seed=7, n=100)
    torch.manual_seed(7)
    ref = models.create_model("digits_cnn")
    data = Toy(100, 0)
    reference_loop(ref, data.x, data.y, cfg, seed=7)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name


def test_optimizer_scheduler_and_clipping_come_from_params(monkeypatch):
    lrs = []
    cfg = TrainParams(epochs=2, batch_size=50, lr=0.1, optimizer="sgd", momentum=0.5, warmup_steps=4,
                      scheduler="constant", grad_clip=0.25)
    clipped = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m: clipped.append(m) or real_clip(p, m))
    real_step = torch.optim.SGD.step

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        assert self.param_groups[0]["momentum"] == 0.5
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    run(models.create_model("digits_mlp_tiny"), cfg, n=200)
    assert clipped == [0.25] * 8
    # linear warm-up over 4 steps (1/4 .. 4/4 of lr), then constant
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1])


def test_the_default_schedule_is_cosine_to_zero_over_all_steps(monkeypatch):
    import math
    lrs = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: lrs.append(self.param_groups[0]["lr"]) or real_step(self, *a, **k))
    run(models.create_model("digits_mlp_tiny"), TrainParams(epochs=2, batch_size=50, lr=0.1), n=200)
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 8)) for t in range(8)])


def count_calls(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_teacher_outputs_are_cached_only_when_asked():
    kd = {"kd": {"weight": 1.0}, "hint": {"student_key": "features", "teacher_key": "features"}}
    taps = {"student": ("features",), "teacher": ("features",)}
    teacher = models.create_model("digits_cnn")
    calls = count_calls(teacher)
    run(models.create_model("digits_mlp_tiny"), CFG, criterion=DistillationLoss(kd), teacher=teacher, taps=taps)
    assert len(calls) == 1 + 6 * 7  # warm-up, then every batch of every epoch (200 / 32 -> 7 batches)

    calls.clear()
    crit = DistillationLoss(kd)
    cached = TrainParams(epochs=6, batch_size=32, lr=0.01, cache_teacher=True)
    run(models.create_model("digits_mlp_tiny"), cached, criterion=crit, teacher=teacher, taps=taps)
    assert len(calls) == 1  # once over the whole training set
    assert crit.terms["hint"].adapter.weight.shape == (128, 16)


def test_cached_and_uncached_teachers_give_the_same_loss_terms_without_augmentation():
    kd = {"kd": {"weight": 1.0, "temperature": 2.0}}
    teacher = models.create_model("digits_mlp_tiny", hidden=64)  # no batch norm: batch-independent outputs
    rows = []
    for cache in (False, True):
        torch.manual_seed(0)
        cfg = TrainParams(epochs=2, batch_size=32, lr=0.01, cache_teacher=cache)
        hist, _ = run(models.create_model("digits_mlp_tiny"), cfg, criterion=DistillationLoss(kd), teacher=teacher)
        rows.append(hist[-1]["train_loss_kd"])
    assert rows[0] == pytest.approx(rows[1], rel=1e-6)


def test_kd_without_teacher_is_an_error():
    with pytest.raises(ValueError, match="needs a teacher"):
        run(models.create_model("digits_mlp_tiny"), CFG, criterion=DistillationLoss({"kd": {}}))


def test_bf16_trains_forward_passes_in_bfloat16_and_keeps_fp32_weights():
    model = models.create_model("digits_mlp_tiny", hidden=32)
    dtypes = []
    layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    layer.register_forward_hook(lambda mod, inp, out: dtypes.append((out.dtype, torch.is_grad_enabled())))
    hist, _ = run(model, TrainParams(epochs=3, batch_size=32, lr=0.01, precision="bf16"), n=256)
    assert {d for d, training in dtypes[1:] if training} == {torch.bfloat16}  # every training forward
    assert {d for d, training in dtypes if not training} == {torch.float32}  # warm-up and validation: fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


# ---------------------------------------------------------------------------------------------------
# checkpoint and resume

JOB = textwrap.dedent('''
    """Trains the digits CNN on a toy set with checkpoints; SIGKILLs itself after step KILL_AT."""
    import os, signal, sys
    import torch
    sys.path.insert(0, sys.argv[4])
    import models, models.vision
    from models.distill import DistillationLoss
    from tasks.platform.params import TrainParams
    from tasks.train.checkpoint import Checkpointer
    from tasks.train.loop import fit
    from test_train_loop import Toy, accuracy, forward

    out, ckpt, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(3)
    model = models.create_model("digits_cnn")
    crit = DistillationLoss({"ce": {}})
    steps = [0]
    real = crit.forward
    def counting(*a):
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a hard crash mid-epoch
        steps[0] += 1
        return real(*a)
    crit.forward = counting
    cfg = TrainParams(epochs=3, batch_size=16, lr=0.003, checkpoint_every=5)
    val = Toy(32, 1)
    hist = fit(model, crit, Toy(100, 0), cfg, seed=3, forward=forward, validate=lambda m: accuracy(m, val),
               checkpoint=Checkpointer(ckpt if ckpt != "-" else None, cfg.checkpoint_every))
    torch.save({"weights": model.state_dict(), "history": [h["train_loss"] for h in hist]}, out)
''')


def test_a_run_killed_mid_epoch_resumes_to_the_same_final_weights(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    job = lambda out, ckpt, kill: subprocess.run([sys.executable, str(script), str(out), str(ckpt), str(kill), str(REPO)],
                                                 env=env, capture_output=True, text=True, timeout=300)
    straight = job(tmp_path / "straight.pt", "-", -1)
    assert straight.returncode == 0, straight.stderr
    ckpt = tmp_path / "ckpt" / "job.pt"
    killed = job(tmp_path / "killed.pt", ckpt, 13)  # steps 0..12 ran; the checkpoint is from step 10
    assert killed.returncode == -9 and not (tmp_path / "killed.pt").exists()
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 10 and state["epoch"] == 2 and state["done"] == 3  # 7 batches an epoch
    resumed = job(tmp_path / "resumed.pt", ckpt, -1)
    assert resumed.returncode == 0, resumed.stderr
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("straight.pt", "resumed.pt"))
    assert a["history"] == b["history"]
    for name, w in a["weights"].items():
        assert torch.equal(w, b["weights"][name]), name


def test_checkpoints_are_written_atomically(tmp_path):
    ck = Checkpointer(tmp_path / "c.pt", every=2)
    assert not ck.due(1) and ck.due(2) and ck.load() is None
    ck.save({"a": torch.ones(2)})
    assert torch.equal(ck.load()["a"], torch.ones(2)) and [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    ck.clear()
    assert not (tmp_path / "c.pt").exists()


# ---------------------------------------------------------------------------------------------------
# the data-parallel seam

def test_ddp_and_a_communication_hook_plug_in_through_the_seam(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        buckets = []

        def counting_allreduce(state, bucket):
            buckets.append(bucket.buffer().numel())
            fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        wrapped = []
        par = Parallel(parallelize=lambda m: wrapped.append(m) or DDP(m), comm_hook=(None, counting_allreduce))
        torch.manual_seed(0)
        model = models.create_model("digits_mlp_tiny")
        hist, _ = run(model, TrainParams(epochs=2, batch_size=50, lr=0.01), n=200, parallel=par)
        assert wrapped == [model] and len(buckets) == 8  # one bucket per step: 2 epochs x 4 batches
        assert buckets[0] == sum(p.numel() for p in model.parameters())
        # one process with the whole batch is plain training: same weights as without the seam
        torch.manual_seed(0)
        plain = models.create_model("digits_mlp_tiny")
        run(plain, TrainParams(epochs=2, batch_size=50, lr=0.01), n=200)
        for a, b in zip(model.state_dict().values(), plain.state_dict().values()):
            torch.testing.assert_close(a, b)
    finally:
        dist.destroy_process_group()


def test_shard_gives_each_rank_an_equal_part_of_the_global_batch():
    batch = torch.arange(12)
    parts = [Parallel(world_size=3, rank=r).shard(batch) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(12)) and {len(p) for p in parts} == {4}
    assert Parallel().shard(batch) is batch and Parallel().is_main and not Parallel(rank=1).is_main
