"""Data parallelism by configuration (issue 14): TernGrad's pieces against loop and closed-form
references, the hooks inside a real gloo DDP, and a role trained by 2 torchrun processes against the
same role in one process with the same global batch."""
import math
import os
import subprocess
import sys

import pytest
import torch

import models
import models.vision  # noqa: F401  (registers the digits models)
from tasks.train.comm_hooks import CommState, clip_by_std, pack_ternary, terngrad_hook, ternarize, unpack_ternary


def test_pack_ternary_against_a_loop_and_back():
    t = torch.randint(-1, 2, (4 * 37 + 3,), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    packed = pack_ternary(t)
    codes = [int(v) + 1 for v in t] + [0] * (-len(t) % 4)
    expected = [sum(codes[4 * j + k] << (2 * k) for k in range(4)) for j in range(len(codes) // 4)]
    assert packed.dtype == torch.uint8 and packed.tolist() == expected
    assert torch.equal(unpack_ternary(packed, len(t)), t)


def test_ternarize_is_ternary_and_unbiased():
    g = torch.randn(200, generator=torch.Generator().manual_seed(1))
    scale = g.abs().max()
    gen = torch.Generator().manual_seed(2)
    draws = torch.stack([ternarize(g, scale, gen) for _ in range(4000)]).float()
    assert set(draws.unique().tolist()) <= {-1.0, 0.0, 1.0}
    # E[scale * t] = g; each element's draw is a Bernoulli(|g|/scale): 5 standard errors
    p = g.abs() / scale
    se = scale * torch.sqrt(p * (1 - p) / len(draws)) + 1e-6
    assert ((scale * draws.mean(0) - g).abs() <= 5 * se).all()
    top = g.abs().argmax()
    assert (draws[:, top] == torch.sign(g[top])).all()  # |g| = scale: always kept
    assert (ternarize(torch.zeros(5), torch.tensor(0.0), gen) == 0).all()


def test_clip_by_std_closed_form():
    g = torch.tensor([0.0, 0.0, 0.0, 10.0])  # std 4.330127
    bound = 1.0 * math.sqrt((3 * 2.5 ** 2 + 7.5 ** 2) / 4)
    assert torch.allclose(clip_by_std(g, 1.0), torch.tensor([0.0, 0.0, 0.0, bound]))


def test_terngrad_hook_sends_ternary_gradients_in_one_process_gloo(tmp_path):
    """World size 1: every parameter's averaged gradient is {-s, 0, +s} with s the max of its own
    clipped gradient, and the hook counts the packed bytes plus one float scale per layer."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = models.create_model("digits_mlp_tiny")
        x, y = torch.rand(32, 64), torch.randint(0, 10, (32,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        reference = {n: clip_by_std(p.grad, 2.5) for n, p in model.named_parameters()}
        model.zero_grad()
        state = CommState(seed=0, clip_sigmas=2.5)
        net = DDP(model)
        net.register_comm_hook(state, terngrad_hook)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        for name, p in model.named_parameters():
            s = reference[name].abs().max()
            assert torch.isclose(p.grad.abs(), s, rtol=1e-6).logical_or(p.grad == 0).all(), name
            assert (torch.sign(p.grad) * torch.sign(reference[name]) >= 0).all(), name  # never flips a sign
        n = sum(p.numel() for p in model.parameters())
        assert state.take() == {"comm_bytes_per_step": math.ceil(n / 4) + 4 * len(reference), "comm_steps": 1.0}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from tasks.stages import digits
    out = tmp_path_factory.mktemp("digits") / "digits"
    digits.prepare("sklearn", out, val=0.2, test=0.2, seed=0)
    return str(out)


def test_two_torchrun_processes_match_one_process_with_the_same_global_batch(tracking_ctx, digits_dir, tmp_path,
                                                                            monkeypatch):
    """The role trained by 2 gloo ranks (each half of every global batch of 64; the last batch, 54
    samples, splits 27/27) ends at the one-process weights to 1e-5: only the order of float sums
    differs. Rank 0 alone logs the epochs; the terngrad hook sends >= 8x fewer bytes per step."""
    from mlflow.tracking import MlflowClient

    from tasks.methods import get_method
    from tasks.platform.params import ParallelParams, TrainParams
    from tasks.steps.train_role import train_unit
    from tasks.platform import tracking

    monkeypatch.setenv("DISTILLERY_CHECKPOINTS", str(tmp_path / "ck"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    spec = get_method("hinton_kd")  # student_labels: digits_mlp_tiny on labels, no dropout

    def train(nproc, hook="allreduce"):
        tp = TrainParams(epochs=2, batch_size=64, lr=0.05, optimizer="sgd",
                         parallel=ParallelParams(nproc=nproc, comm_hook=hook))
        tm = train_unit(spec, "student_labels", None, 0, tp, "cpu", {}, digits_dir, tracking_ctx)
        return tm, tracking.load_model(tm.model_uri, tracking_ctx)

    one, one_model = train(1)
    two, two_model = train(2)
    for (name, a), b in zip(one_model.state_dict().items(), two_model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)
    client = MlflowClient(tracking_ctx.tracking_uri)
    run_one, run_two = client.get_run(one.run_id), client.get_run(two.run_id)
    assert run_two.data.tags["distillery.nproc"] == "2"
    assert run_two.data.metrics["train_loss"] == pytest.approx(run_one.data.metrics["train_loss"], rel=1e-5)
    assert [m.step for m in client.get_metric_history(two.run_id, "train_loss")] == [1, 2]  # rank 0 only
    n = sum(p.numel() for p in one_model.parameters())
    assert two.train_metrics["comm_bytes_per_step"] == 4 * n and one.train_metrics == {}

    tern, _ = train(2, "terngrad")
    layers = len(list(one_model.parameters()))
    assert tern.train_metrics["comm_bytes_per_step"] == math.ceil(n / 4) + 4 * layers
    assert two.train_metrics["comm_bytes_per_step"] / tern.train_metrics["comm_bytes_per_step"] >= 8
    assert not list(tmp_path.glob("distillery-ddp-*")) and not list((tmp_path / "ck").glob("*"))


def test_a_failing_rank_fails_the_training_with_its_traceback(tracking_ctx, digits_dir):
    """NCCL on a machine without CUDA: the ranks fail in init_process_group, the parent says why."""
    from tasks.methods import get_method
    from tasks.platform.params import ParallelParams, TrainParams
    from tasks.steps.train_role import train_unit

    if torch.cuda.is_available():
        pytest.skip("NCCL works here")
    tp = TrainParams(epochs=1, batch_size=64, lr=0.05, parallel=ParallelParams(nproc=2, backend="nccl"))
    with pytest.raises(RuntimeError, match=r"(?s)torchrun \(2 processes.*Traceback.*init_process_group.*Error"):
        train_unit(get_method("hinton_kd"), "student_labels", None, 0, tp, "cpu", {}, digits_dir, tracking_ctx)


@pytest.mark.parametrize("key,value,message", [
    ("comm_hook", "ternary", "must be one of 'allreduce' or 'terngrad', got 'ternary'"),
    ("nproc", 0, "must be >= 1, got 0"),
])
def test_a_bad_parallel_setting_names_its_key(tmp_path, key, value, message):
    import yaml

    from conftest import REPO
    from tasks.platform.common import StageError
    from tasks.platform.params import load_params

    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["methods"]["terngrad"]["student"]["parallel"][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(StageError) as e:
        load_params(tmp_path / "params.yaml")
    assert str(e.value).endswith(f"params.yaml: methods.terngrad.student.parallel.{key}: {message}")


def test_a_killed_ddp_run_resumes_from_rank_0s_checkpoint_to_the_same_weights(tmp_path):
    """Rank 1 dies mid-epoch (after the step-6 checkpoint); the rerun loads the checkpoint on both
    ranks, each its own RNG state (dropout's, and TernGrad's rounding) and running sums, and ends
    bit-identical to a run never killed."""
    from conftest import REPO

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(REPO / "tests" / "ddp_resume_worker.py"), *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    assert torchrun("", tmp_path / "plain.pt").returncode == 0
    ckpt = tmp_path / "ck.pt"
    # fetch 8 is the 7th batch (the first fetch is the loop's pre-optimizer forward): step 6's checkpoint is the last
    killed = torchrun(ckpt, tmp_path / "resumed.pt", 8)
    assert killed.returncode != 0 and ckpt.is_file() and not (tmp_path / "resumed.pt").exists()
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    assert torchrun(ckpt, tmp_path / "resumed.pt").returncode == 0
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for name, w in plain.items():
        assert torch.equal(w, resumed[name]), name
