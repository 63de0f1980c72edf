"""How DDP exchanges gradient buckets, with the bytes each rank hands to the network counted.

    allreduce   full precision: one all-reduce of the float32 bucket, then / world_size (what DDP
                does by default; here so both variants are counted the same way)
    terngrad    Wen et al. 2017, "TernGrad: Ternary Gradients to Reduce Communication in Distributed
                Deep Learning": per layer, clip at c * std, share the scale max|g| over ranks (one
                all-reduce of a float32 per layer), round each element stochastically to
                {-1, 0, +1} x scale (unbiased: E = g), pack 4 ternary digits a byte, all-gather
                the packed bytes and average the decoded gradients

`CommState.take()` gives the loop `comm_bytes_per_step` (bytes this rank handed to collectives per
optimizer step) and `comm_steps`. With 2 ranks a ring all-reduce sends each rank's whole buffer once
and a ring all-gather each rank's packed part once, so these are the bytes on the wire per rank; at
more ranks an all-gather grows with world_size where an all-reduce does not (the paper uses a
parameter server, whose bytes per worker stay flat).
"""
# no `from __future__ import annotations`: DDP checks the hooks' annotations as objects
import torch
import torch.distributed as dist

_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """{-1, 0, +1} (any shape) -> uint8, 4 digits a byte, the first in the lowest 2 bits."""
    codes = (t.reshape(-1) + 1).to(torch.uint8)
    c = torch.nn.functional.pad(codes, (0, -len(codes) % 4)).view(-1, 4)
    return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_ternary`: the first `n` digits as int8 in {-1, 0, +1}."""
    codes = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 3
    return codes.reshape(-1)[:n].to(torch.int8) - 1


def clip_by_std(g: torch.Tensor, sigmas: float) -> torch.Tensor:
    """The paper's gradient clipping: each element into [-c * std, c * std] of its layer."""
    bound = sigmas * g.float().std(correction=0)
    return g.clamp(-bound, bound)


def ternarize(g: torch.Tensor, scale: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """sign(g) * Bernoulli(|g| / scale) as int8: scale * result is an unbiased estimate of g when
    |g| <= scale (u * scale < |g| for u ~ U[0, 1) is that Bernoulli draw, without dividing)."""
    u = torch.rand(g.shape, generator=generator, device=g.device, dtype=g.dtype)
    return torch.where(u * scale < g.abs(), torch.sign(g), 0).to(torch.int8)


class CommState:
    """A hook's state: counts bytes and optimizer steps, and keys terngrad's stochastic rounding.

    The rounding of a layer's gradient at a step draws from a generator seeded by (seed, rank, step,
    the layer's number), not from one running stream: DDP reorders its buckets after the first step
    (and a resumed run has a first step of its own), which would reorder a stream's draws. So a
    checkpoint needs only the step count (`rng_state`) to resume the same rounding."""

    def __init__(self, seed: int = 0, clip_sigmas: float = 2.5) -> None:
        self.seed, self.clip_sigmas = seed, clip_sigmas
        self.bytes, self.steps = 0, 0   # since the last `take` (an epoch's comm_* metrics)
        self.step = 0                   # optimizer steps of the whole training
        self._layer_index: dict[int, int] = {}

    def rounding_generator(self, param: torch.Tensor, device: torch.device) -> torch.Generator:
        # a layer's number is the order it first reached the hook: DDP's first step always hands the
        # buckets over in the same order (reversed parameters), in a resumed run too
        layer = self._layer_index.setdefault(id(param), len(self._layer_index))
        rank = dist.get_rank() if dist.is_initialized() else 0
        key = hash((self.seed, rank, self.step, layer)) & (2**63 - 1)
        return torch.Generator(device).manual_seed(key)

    def rng_state(self) -> torch.Tensor:
        return torch.tensor([self.step])

    def set_rng_state(self, state: torch.Tensor | None) -> None:
        self.step = 0 if state is None else int(state[0])

    def record(self, n_bytes: int, bucket: dist.GradBucket) -> None:
        self.bytes += n_bytes
        self.steps += bucket.is_last()  # one call per bucket; the last bucket closes a step
        self.step += bucket.is_last()

    def take(self) -> dict[str, float]:
        out = {"comm_bytes_per_step": self.bytes / self.steps, "comm_steps": float(self.steps)} if self.steps else {}
        self.bytes, self.steps = 0, 0
        return out


def allreduce_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    state.record(buffer.numel() * buffer.element_size(), bucket)
    world = dist.get_world_size()
    fut = dist.all_reduce(buffer, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0].div_(world))


def terngrad_hook(state: CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer, world = bucket.buffer(), dist.get_world_size()
    # the bucket's flat buffer holds its parameters' gradients back to back, in this order
    sizes = [g.numel() for g in bucket.gradients()]
    layers = [clip_by_std(g, state.clip_sigmas) for g in buffer.split(sizes)]
    scales = torch.stack([g.abs().max() for g in layers]).float()
    dist.all_reduce(scales, op=dist.ReduceOp.MAX)  # scale sharing: every rank rounds to the same scale
    digits = torch.cat([ternarize(g, s.to(g.dtype), state.rounding_generator(p, buffer.device))
                        for g, s, p in zip(layers, scales, bucket.parameters())])
    packed = pack_ternary(digits)
    state.record(packed.numel() + scales.numel() * scales.element_size(), bucket)

    gathered = torch.empty(world * packed.numel(), dtype=torch.uint8, device=packed.device)
    work = dist.all_gather_into_tensor(gathered, packed, async_op=True)

    def decode(_: torch.futures.Future) -> torch.Tensor:
        total = sum(unpack_ternary(part, len(digits)).to(buffer.dtype) for part in gathered.view(world, -1))
        buffer.copy_(total)
        for layer, scale in zip(buffer.split(sizes), scales.tolist()):
            layer.mul_(scale / world)
        return buffer

    return work.get_future().then(decode)


HOOKS = {"allreduce": allreduce_hook, "terngrad": terngrad_hook}
