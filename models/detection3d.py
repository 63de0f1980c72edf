"""3D object detection on LiDAR voxels, in plain PyTorch: a sparse 3D convolution (no spconv), its
spatially pruned variants (SPS-Conv), and a SECOND-style detector with a CenterPoint head.

    second_det     SECOND's sparse middle encoder (Yan et al. 2018) at toy scale -> BEV map ->
                   CenterPoint-style heatmap + box head (Yin et al. 2021)
    sps_det        the same with SPSS-Conv / SPRS-Conv in the backbone (Liu et al. 2022), keep ratio 0.5
    sps_det_slim   half the widths, pruned: the student SPS-Conv distils into

Loss terms (models.distill's registry): `centerpoint` (focal heatmap + L1 box regression at the
centres) and `heatmap_kd` (the teacher's heatmap as a soft target, its boxes where it is confident).
The BEV feature map, output of `bev_net`, is the feature tap a `hint` reads.

The sections: sparse convolution (below), the detector, targets and decoding, loss terms.

Sparse convolution. A sparse conv is fixed by its *rulebook*: for each kernel offset k, the (input
site, output site) pairs it connects (as in SparseConvNet and spconv). Given the rulebook, the conv is, per offset, a gather
of the pairs' inputs, one GEMM with W[k] (Cin, Cout) and a scatter-add into the pairs' outputs
(gather-GEMM-scatter). index_select, matmul and index_add_ are all differentiable, so autograd gives the
backward pass; the only Python loop is over the K offsets, and offsets without pairs are skipped.

Rulebooks are built with no per-site Python. A site (b, z, y, x) hashes to the int64 key
((b·Z + z)·Y + y)·X + x, exact and ordered like the coordinates; the input keys are sorted once and the
neighbours of all (site, offset) pairs are found in one `searchsorted`. A regular conv's candidate outputs
are (i + p - k) / s where that is integral and inside the output grid; `torch.unique` on their keys gives
the output sites, sorted by (b, z, y, x). A rulebook depends only on the sites, so it is cached on the
SparseTensor and shared through `replace`: a stack of SubM layers on the same sites builds one.

Pruning (SPS-Conv). A site's importance is the mean |x| over its channels (nothing learned); each sample
keeps its ceil(keep_ratio · n_b) most important sites, ties going to the earlier site.
- SPSSConv3d (submanifold): kept sites get the full SubM output, gathering from all active neighbours,
  kept or not; pruned sites pass through unchanged, so Cin == Cout.
- SPRSConv3d (regular): kept inputs dilate as in SparseConv3d; a pruned input i contributes only to the
  output cell that contains it, floor(i / s), when that pair is in the regular rulebook. The output sites
  are those reached.
Pruning only removes pairs: at keep_ratio=1 both modules compute the unpruned conv bit for bit (same
pairs in the same order). Every module records `pairs` and `macs` (= pairs · Cin · Cout) of its last call,
and `last_keep`, the keep mask over its input sites (None when nothing is pruned), for `count_macs` and
for figures.

Conventions: weights are (K, Cin, Cout) with offsets in z-major order, so F.conv3d's weight is
`W.permute(2, 1, 0).reshape(Cout, Cin, kz, ky, kx)`; a regular conv equals F.conv3d(x.dense(), ...) at
every cell of its output grid, and a SubM conv equals F.conv3d with padding k // 2 at the active sites
(tests/test_sparse_conv.py).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distill import Outputs, register_loss
from .registry import register_model

# ---------------------------------------------------------------------------------------------------
# sparse convolution

Triple = tuple[int, int, int]


def _triple(v: int | tuple[int, ...], name: str = "value") -> Triple:
    t = (int(v),) * 3 if isinstance(v, int) else tuple(int(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"{name} needs 1 or 3 values, got {v}")
    return t  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# sparse tensor

@dataclass
class SparseTensor:
    """Features at the active sites of a batch of (Z, Y, X) grids; `coords` rows are (b, z, y, x), unique."""
    features: torch.Tensor          # (N, C) float
    coords: torch.Tensor            # (N, 4) int64
    shape: tuple[int, int, int]     # spatial shape (Z, Y, X)
    batch_size: int
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.shape = _triple(self.shape, "shape")
        self.batch_size = int(self.batch_size)
        self.coords = self.coords.long()   # voxelizers hand out int32; keys need int64
        n = self.coords.shape[0]
        if self.features.dim() != 2 or self.coords.shape != (n, 4) or self.features.shape[0] != n:
            raise ValueError(f"features must be (N, C) and coords (N, 4), got {tuple(self.features.shape)} "
                             f"and {tuple(self.coords.shape)}")

    def replace(self, features: torch.Tensor) -> "SparseTensor":
        """The same sites with new features; shares the rulebook cache, as the sites are the same."""
        if features.shape[0] != self.coords.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows for {self.coords.shape[0]} sites")
        out = SparseTensor(features, self.coords, self.shape, self.batch_size)
        out._cache = self.cache()
        return out

    def cache(self) -> dict:
        """Per-sites memo of rulebooks; dropped if `coords` was reassigned since it was filled."""
        if self._cache.get("coords") is not self.coords:
            self._cache = {"coords": self.coords}
        return self._cache

    def dense(self) -> torch.Tensor:
        """(B, C, Z, Y, X), zeros at inactive sites; differentiable in the features."""
        c = self.features.shape[1]
        out = self.features.new_zeros(self.batch_size, *self.shape, c)
        out = out.index_put(tuple(self.coords.unbind(1)), self.features)
        return out.permute(0, 4, 1, 2, 3).contiguous()

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> "SparseTensor":
        """The sites of a (B, C, Z, Y, X) tensor where any channel is nonzero, in (b, z, y, x) order."""
        if x.dim() != 5:
            raise ValueError(f"expected (B, C, Z, Y, X), got {tuple(x.shape)}")
        active = (x != 0).any(1)
        return cls(x.permute(0, 2, 3, 4, 1)[active], active.nonzero(), tuple(x.shape[2:]), x.shape[0])


def _encode(b: torch.Tensor, z: torch.Tensor, y: torch.Tensor, x: torch.Tensor, shape: Triple) -> torch.Tensor:
    _, ny, nx = shape
    return ((b * shape[0] + z) * ny + y) * nx + x


def _decode(keys: torch.Tensor, shape: Triple) -> torch.Tensor:
    nz, ny, nx = shape
    x, keys = keys % nx, keys // nx
    y, keys = keys % ny, keys // ny
    z, b = keys % nz, keys // nz
    return torch.stack([b, z, y, x], 1)


def _offsets(kernel_size: Triple, device: torch.device) -> torch.Tensor:
    """(K, 3) kernel offsets (kz, ky, kx), z-major: the row order of the weight."""
    axes = [torch.arange(k, device=device) for k in kernel_size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


# ---------------------------------------------------------------------------------------------------
# rulebooks

@dataclass
class Rulebook:
    """The pairs of a sparse conv, grouped by kernel offset (offset-major, as `counts` says)."""
    in_idx: torch.Tensor       # (P,) input row of each pair
    out_idx: torch.Tensor      # (P,) output row of each pair
    kernel_idx: torch.Tensor   # (P,) offset of each pair, non-decreasing
    counts: list[int]          # pairs per offset, K entries

    @classmethod
    def from_mask(cls, mask: torch.Tensor, in_of: torch.Tensor | None, out_of: torch.Tensor | None) -> "Rulebook":
        """Pairs from a (K, N) mask over (offset, site); `in_of`/`out_of` map the (K, N) entries to rows,
        None meaning the site itself. nonzero walks the mask row by row, which groups pairs by offset."""
        k, n = mask.nonzero(as_tuple=True)
        in_idx = n if in_of is None else in_of[k, n]
        out_idx = n if out_of is None else out_of[k, n]
        return cls(in_idx, out_idx, k, torch.bincount(k, minlength=mask.shape[0]).tolist())

    @property
    def pairs(self) -> int:
        return self.in_idx.numel()

    def select(self, keep: torch.Tensor) -> "Rulebook":
        """The pairs where `keep` (P,) is true, still grouped by offset."""
        k = self.kernel_idx[keep]
        counts = torch.bincount(k, minlength=len(self.counts)).tolist()
        return Rulebook(self.in_idx[keep], self.out_idx[keep], k, counts)


def _inside(v: torch.Tensor, size: int) -> torch.Tensor:
    return (v >= 0) & (v < size)


def subm_rulebook(x: SparseTensor, kernel_size: Triple) -> Rulebook:
    """Pairs (i, o) with i = o + k - center over x's own sites; cached on x."""
    key = ("subm", kernel_size)
    cache = x.cache()
    if key not in cache:
        cache[key] = _subm_rulebook(x.coords, x.shape, kernel_size)
    return cache[key]


def _subm_rulebook(coords: torch.Tensor, shape: Triple, kernel_size: Triple) -> Rulebook:
    n, device = coords.shape[0], coords.device
    b, z, y, x = coords.unbind(1)
    keys = _encode(b, z, y, x, shape)
    sorted_keys, order = keys.sort()
    d = _offsets(kernel_size, device) - torch.tensor([k // 2 for k in kernel_size], device=device)
    dz, dy, dx = (d[:, a, None] for a in range(3))      # (K, 1) each, against (N,) sites
    # a neighbour outside the grid would alias a real key (x = -1 is the previous row's last x)
    inside = _inside(z + dz, shape[0]) & _inside(y + dy, shape[1]) & _inside(x + dx, shape[2])
    nkeys = keys + (dz * shape[1] + dy) * shape[2] + dx  # (K, N)
    pos = torch.searchsorted(sorted_keys, nkeys).clamp_(max=max(n - 1, 0))
    found = inside & (sorted_keys[pos] == nkeys)
    return Rulebook.from_mask(found, order[pos], None)


def output_shape(shape: Triple, kernel_size: Triple, stride: Triple, padding: Triple) -> Triple:
    """F.conv3d's output grid: floor((S + 2p - k) / s) + 1 per axis."""
    out = tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(shape, kernel_size, stride, padding))
    if min(out) <= 0:
        raise ValueError(f"kernel {kernel_size} with padding {padding} does not fit the grid {shape}")
    return out  # type: ignore[return-value]


def regular_rulebook(x: SparseTensor, kernel_size: Triple, stride: Triple, padding: Triple,
                     keep: torch.Tensor | None = None) -> tuple[torch.Tensor, Triple, Rulebook]:
    """(output coords, output shape, rulebook) of a regular sparse conv over x; cached on x when unpruned.

    With `keep` (N,) bool, a pruned input keeps only its pair into the output cell floor(i / s)."""
    key = ("conv", kernel_size, stride, padding)
    cache = x.cache()
    if keep is None and key in cache:
        return cache[key]
    out_shape = output_shape(x.shape, kernel_size, stride, padding)
    offsets = _offsets(kernel_size, x.coords.device)
    b, *site = x.coords.unbind(1)
    cells, valid, home = [], True, True   # masks narrowed axis by axis (True & mask is mask)
    for a in range(3):  # axes z, y, x: o·s = i + p - k, kept where integral and inside the output grid
        q = site[a] + padding[a] - offsets[:, a, None]          # (K, N)
        o = q.div(stride[a], rounding_mode="floor")
        valid = valid & (q >= 0) & (q % stride[a] == 0) & (o < out_shape[a])
        cells.append(o)
        if keep is not None:
            home = home & (o == site[a].div(stride[a], rounding_mode="floor"))
    if keep is not None:
        valid = valid & (keep | home)
    okeys = _encode(b, *cells, out_shape)
    k, i = valid.nonzero(as_tuple=True)
    uniq, out_idx = torch.unique(okeys[k, i], return_inverse=True)
    rb = Rulebook(i, out_idx, k, torch.bincount(k, minlength=offsets.shape[0]).tolist())
    result = (_decode(uniq, out_shape), out_shape, rb)
    if keep is None:
        cache[key] = result
    return result


def gather_gemm_scatter(features: torch.Tensor, weight: torch.Tensor, rb: Rulebook, n_out: int) -> torch.Tensor:
    """out[o] = sum over pairs (i, o, k) of features[i] @ weight[k]; (n_out, Cout)."""
    out = features.new_zeros(n_out, weight.shape[2], dtype=torch.promote_types(features.dtype, weight.dtype))
    start = 0
    for k, n in enumerate(rb.counts):
        if n:
            i, o = rb.in_idx[start:start + n], rb.out_idx[start:start + n]
            # index_select, not x[i]: its backward is an index_add, where advanced indexing's is a slower
            # accumulating index_put; .to() because autocast may run the matmul in half precision
            out.index_add_(0, o, (features.index_select(0, i) @ weight[k]).to(out.dtype))
        start += n
    return out


# ---------------------------------------------------------------------------------------------------
# importance and pruning

def importance(x: SparseTensor) -> torch.Tensor:
    """(N,) mean |feature| over channels: SPS-Conv's magnitude criterion (a selection, so no gradient)."""
    return x.features.detach().abs().mean(1)


def keep_mask(x: SparseTensor, keep_ratio: float) -> torch.Tensor:
    """(N,) bool: per sample b, its ceil(keep_ratio · n_b) most important sites; ties go to the earlier site."""
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    n, device = x.coords.shape[0], x.coords.device
    batch = x.coords[:, 0]
    # two stable sorts: by importance (high first, ties in site order), then by sample
    order = torch.sort(importance(x), descending=True, stable=True).indices
    order = order[torch.sort(batch[order], stable=True).indices]
    counts = torch.bincount(batch, minlength=x.batch_size)
    # the epsilon stops float round-off adding a site: 0.3 * 10 is 3.0000000000000004
    quota = torch.ceil(counts.double() * keep_ratio - 1e-9).long()
    sample = batch[order]
    rank = torch.arange(n, device=device) - (torch.cumsum(counts, 0) - counts)[sample]
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    keep[order] = rank < quota[sample]
    return keep


# ---------------------------------------------------------------------------------------------------
# modules

class _SparseConvBase(nn.Module):
    """Weight (K, Cin, Cout), optional bias, and the cost record of the last forward call."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Triple, bias: bool) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _triple(kernel_size, "kernel_size")
        self.weight = nn.Parameter(torch.empty(math.prod(self.kernel_size), in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.pairs: int = 0
        self.macs: int = 0
        self.last_keep: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv3d's default (kaiming_uniform with a=√5) written out, as fan_in = K·Cin is not what
        # nn.init would read off a (K, Cin, Cout) tensor
        bound = 1 / math.sqrt(self.weight.shape[0] * self.in_channels)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def _conv(self, features: torch.Tensor, rb: Rulebook, n_out: int) -> torch.Tensor:
        self.pairs = rb.pairs
        self.macs = rb.pairs * self.in_channels * self.out_channels
        out = gather_gemm_scatter(features, self.weight, rb, n_out)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        for name in ("stride", "padding", "keep_ratio"):
            if hasattr(self, name):
                s += f", {name}={getattr(self, name)}"
        return s + ("" if self.bias is not None else ", bias=False")


class SubMConv3d(_SparseConvBase):
    """Submanifold conv: outputs at the input's sites only, out[o] = Σ_k W[k]ᵀ x[o + k - center]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Triple = 3,
                 bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias)
        if any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"a submanifold conv needs odd kernel sizes (a center), got {self.kernel_size}")

    def forward(self, x: SparseTensor) -> SparseTensor:
        self.last_keep = None
        rb = subm_rulebook(x, self.kernel_size)
        return x.replace(self._conv(x.features, rb, x.coords.shape[0]))


class SPSSConv3d(SubMConv3d):
    """Spatially pruned SubM conv: the keep_ratio most important sites per sample get the SubM output
    (from all their active neighbours); the others pass through unchanged."""

    def __init__(self, channels: int, kernel_size: int | Triple = 3, keep_ratio: float = 0.5,
                 bias: bool = False) -> None:
        super().__init__(channels, channels, kernel_size, bias)
        self.keep_ratio = keep_ratio

    def forward(self, x: SparseTensor) -> SparseTensor:
        keep = keep_mask(x, self.keep_ratio)
        rb = subm_rulebook(x, self.kernel_size)
        if self.keep_ratio < 1:
            rb = rb.select(keep[rb.out_idx])
        out = self._conv(x.features, rb, x.coords.shape[0])
        self.last_keep = keep
        return x.replace(torch.where(keep[:, None], out, x.features))


class SparseConv3d(_SparseConvBase):
    """Regular sparse conv: outputs at every cell of the strided grid that an active input reaches;
    equals F.conv3d(x.dense(), ...) on that grid."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Triple = 3,
                 stride: int | Triple = 2, padding: int | Triple = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias)
        self.stride = _triple(stride, "stride")
        self.padding = _triple(padding, "padding")

    def _forward(self, x: SparseTensor, keep: torch.Tensor | None) -> SparseTensor:
        coords, shape, rb = regular_rulebook(x, self.kernel_size, self.stride, self.padding, keep)
        features = self._conv(x.features, rb, coords.shape[0])
        return SparseTensor(features, coords, shape, x.batch_size)

    def forward(self, x: SparseTensor) -> SparseTensor:
        self.last_keep = None
        return self._forward(x, None)


class SPRSConv3d(SparseConv3d):
    """Spatially pruned regular conv: the keep_ratio most important inputs per sample dilate as in
    SparseConv3d; the others reach only the output cell that contains them, floor(i / stride)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Triple = 3,
                 stride: int | Triple = 2, padding: int | Triple = 1, keep_ratio: float = 0.5,
                 bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias)
        self.keep_ratio = keep_ratio

    def forward(self, x: SparseTensor) -> SparseTensor:
        keep = keep_mask(x, self.keep_ratio)
        self.last_keep = keep
        # unpruned, the rulebook is the regular one and may come from x's cache
        return self._forward(x, keep if self.keep_ratio < 1 else None)


def count_macs(module: nn.Module) -> int:
    """Multiply-accumulates of the last forward call of every sparse conv in `module` (itself included)."""
    return sum(m.macs for m in module.modules() if isinstance(m, _SparseConvBase))


# ---------------------------------------------------------------------------------------------------
# the detector: sparse 3D backbone -> BEV map -> CenterPoint-style head

CLASS_NAMES = ("Car", "Pedestrian", "Cyclist")
# per BEV cell: dx, dy of the centre within the cell, z, log dx, log dy, log dz, sin 2θ, cos 2θ. The
# doubled angle because a box's footprint is the same turned by π, and KITTI's AP ignores direction: a
# regressed (sin θ, cos θ) is torn between opposite answers on a symmetric object and averages to
# nonsense (SECOND resolves the direction with a separate classifier instead)
REG_CHANNELS = 8


STAGES = 2   # stride-2 stages: the BEV map is 4× coarser than the voxel grid


@dataclass
class DetectorConfig:
    shape_zyx: tuple[int, int, int] = (10, 176, 128)     # the voxel grid (tasks/stages/voxelize.py)
    in_channels: int = 4                                  # x, y, z, reflectance of the voxel's mean point
    widths: tuple[int, ...] = (16, 32, 32)                # stem, then one per stride-2 stage
    bev_channels: int = 32
    num_classes: int = len(CLASS_NAMES)
    keep_ratio: float | None = None   # SPS-Conv: the share of sites each pruned conv keeps (None: no pruning)


def _norm_act(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(channels), nn.ReLU(inplace=True))


class SparseBlock(nn.Module):
    """A sparse conv, then BatchNorm + ReLU on the active sites' features."""

    def __init__(self, conv: nn.Module, channels: int) -> None:
        super().__init__()
        self.conv, self.norm = conv, _norm_act(channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        x = self.conv(x)
        return x.replace(self.norm(x.features))


class SparseBackbone(nn.Module):
    """SECOND's middle encoder at toy scale (Yan et al. 2018): a submanifold stem at full resolution,
    then STAGES stages of a stride-2 regular sparse conv and a submanifold conv. With `keep_ratio`, the
    stages' convs are SPS-Conv's drop-in replacements (Liu et al. 2022): SPRS-Conv for the strided
    ones, SPSS-Conv for the submanifold ones; the stem, on raw point features, is never pruned."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        if len(cfg.widths) != STAGES + 1:
            raise ValueError(f"widths: the stem's and {STAGES} stages', {STAGES + 1} values, got {cfg.widths}")
        c0, *stages = cfg.widths
        keep = cfg.keep_ratio
        self.stem = SparseBlock(SubMConv3d(cfg.in_channels, c0), c0)
        blocks, cin = [], c0
        for cout in stages:
            down = SparseConv3d(cin, cout, 3, 2, 1) if keep is None else SPRSConv3d(cin, cout, 3, 2, 1, keep)
            same = SubMConv3d(cout, cout) if keep is None else SPSSConv3d(cout, 3, keep)
            blocks += [SparseBlock(down, cout), SparseBlock(same, cout)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.blocks(self.stem(x))


def bev_shape(shape_zyx: tuple[int, int, int], stages: int = STAGES) -> tuple[int, int, int]:
    """The grid after `stages` stride-2 convs (kernel 3, padding 1): each axis n -> (n - 1) // 2 + 1."""
    for _ in range(stages):
        shape_zyx = tuple((n - 1) // 2 + 1 for n in shape_zyx)
    return shape_zyx


class VoxelDetector(nn.Module):
    """SECOND-style single-stage detector with a CenterPoint head (Yin et al. 2021).

    inputs: {"features": (N, C) voxel features, "coords": (N, 4) batch z y x, "batch_size": B}
    outputs: {"heatmap": (B, classes, H, W) logits, "reg": (B, 8, H, W)}; the BEV feature map is the
    output of `bev_net` (a feature tap for distillation)."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = SparseBackbone(cfg)
        z, _, _ = bev_shape(cfg.shape_zyx)
        c, b = cfg.widths[-1] * z, cfg.bev_channels
        # a 1×1 conv first: the folded height makes the input wide (widths[-1] × Z), and a 3×3 conv on
        # it would cost more than the whole sparse backbone
        self.bev_net = nn.Sequential(nn.Conv2d(c, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                                     nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                                     nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True))
        self.heatmap = nn.Conv2d(b, cfg.num_classes, 1)
        self.reg = nn.Conv2d(b, REG_CHANNELS, 1)
        # CenterNet's prior: every cell starts at p = 0.1 of holding a centre, so the focal loss of
        # the (overwhelmingly empty) map does not swamp the first steps
        nn.init.constant_(self.heatmap.bias, -math.log((1 - 0.1) / 0.1))

    def voxels(self, inputs: dict[str, torch.Tensor]) -> SparseTensor:
        return SparseTensor(inputs["features"], inputs["coords"].long(), self.cfg.shape_zyx, int(inputs["batch_size"]))

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.backbone(self.voxels(inputs)).dense()     # (B, C, Z, Y, X)
        bev = self.bev_net(x.flatten(1, 2))                 # height folded into channels, as SECOND does
        return {"heatmap": self.heatmap(bev), "reg": self.reg(bev)}


def _detector(**kwargs) -> VoxelDetector:
    fields = {f.name for f in dataclasses.fields(DetectorConfig)}
    unknown = set(kwargs) - fields
    if unknown:
        raise TypeError(f"unknown detector options {sorted(unknown)}; options: {sorted(fields)}")
    for key in ("shape_zyx", "widths"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return VoxelDetector(DetectorConfig(**kwargs))


@register_model
def second_det(**kwargs) -> VoxelDetector:
    """The unpruned detector (SECOND backbone + CenterPoint head)."""
    return _detector(**kwargs)


@register_model
def sps_det(**kwargs) -> VoxelDetector:
    """The same detector with SPS-Conv in its backbone, keeping half the sites of each pruned conv."""
    return _detector(**{"keep_ratio": 0.5, **kwargs})


@register_model
def sps_det_slim(**kwargs) -> VoxelDetector:
    """A slimmer pruned detector (half the widths): the student SPS distils into."""
    return _detector(**{"keep_ratio": 0.5, "widths": (8, 16, 16), "bev_channels": 16, **kwargs})


def backbone_flops(model: VoxelDetector) -> int:
    """Counted FLOPs (2 per multiply-add) of the sparse backbone's last forward pass."""
    return 2 * count_macs(model.backbone)


def dense_backbone(model: VoxelDetector, x: SparseTensor) -> torch.Tensor:
    """The backbone's layers run as dense conv3d on the whole grid (VoxelNet's middle layers), with
    the same weights: what SECOND's sparse convolution is measured against."""
    y = x.dense()
    for block in [model.backbone.stem, *model.backbone.blocks]:
        conv = block.conv
        w = conv.weight                                    # (K, Cin, Cout)
        k = round(w.shape[0] ** (1 / 3))
        w = w.permute(2, 1, 0).reshape(w.shape[2], w.shape[1], k, k, k)
        stride = getattr(conv, "stride", 1)
        y = F.conv3d(y, w, stride=stride, padding=k // 2)
        bn = block.norm[0]
        y = F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False))
    return y


# ---------------------------------------------------------------------------------------------------
# targets and decoding (CenterPoint): a Gaussian per object on its class's heatmap, the box regressed
# at the object's centre cell

@dataclass(frozen=True)
class BEVGrid:
    """The head's map: `cells` (H, W) over y and x, each `cell` metres, from (x0, y0)."""
    x0: float
    y0: float
    cell: float
    cells: tuple[int, int]

    @classmethod
    def of(cls, point_range: list[float], voxel_size: list[float], shape_zyx: tuple[int, int, int],
           stages: int = STAGES) -> "BEVGrid":
        _, h, w = bev_shape(shape_zyx, stages)
        return cls(point_range[0], point_range[1], voxel_size[0] * 2 ** stages, (h, w))


def gaussian_radius(dx: torch.Tensor, dy: torch.Tensor, cell: float) -> torch.Tensor:
    """In cells, at least 1: a quarter of the box's footprint diagonal (a simpler stand-in for
    CenterNet's overlap-derived radius, which gives about this for boxes a few cells long)."""
    return (torch.sqrt(dx ** 2 + dy ** 2) / (4 * cell)).clamp_min(1.0)


def encode_targets(boxes: torch.Tensor, labels: torch.Tensor, grid: BEVGrid, num_classes: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One frame's boxes (K, 7) with class indices (K,) -> heatmap (classes, H, W), reg (8, H, W),
    mask (H, W). Boxes whose centre is off the map are left out."""
    h, w = grid.cells
    heat = torch.zeros(num_classes, h, w)
    reg = torch.zeros(REG_CHANNELS, h, w)
    mask = torch.zeros(h, w)
    u = (boxes[:, 0] - grid.x0) / grid.cell
    v = (boxes[:, 1] - grid.y0) / grid.cell
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    ys, xs = torch.arange(h, dtype=torch.float32)[:, None], torch.arange(w, dtype=torch.float32)[None, :]
    for i in torch.nonzero(inside).flatten().tolist():   # a few objects a frame
        iu, iv = int(u[i]), int(v[i])
        sigma = float(gaussian_radius(boxes[i, 3], boxes[i, 4], grid.cell)) / 3
        g = torch.exp(-((xs - iu) ** 2 + (ys - iv) ** 2) / (2 * sigma ** 2))
        heat[labels[i]] = torch.maximum(heat[labels[i]], g)
        b = boxes[i]
        reg[:, iv, iu] = torch.stack([u[i] - iu, v[i] - iv, b[2], b[3].log(), b[4].log(), b[5].log(),
                                      torch.sin(2 * b[6]), torch.cos(2 * b[6])]).float()
        mask[iv, iu] = 1.0
    return heat, reg, mask


@torch.no_grad()
def decode(heatmap: torch.Tensor, reg: torch.Tensor, grid: BEVGrid, top_k: int = 50, min_score: float = 0.05
           ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per frame: boxes (D, 7), scores (D,), class indices (D,), from the local maxima (3×3) of the
    class heatmaps; the caller applies rotated NMS."""
    prob = torch.sigmoid(heatmap)
    peaks = prob * (F.max_pool2d(prob, 3, stride=1, padding=1) == prob)
    b, c, h, w = prob.shape
    scores, flat = peaks.flatten(1).topk(min(top_k, c * h * w), dim=1)
    out = []
    for i in range(b):
        keep = scores[i] > min_score
        s, idx = scores[i][keep], flat[i][keep]
        cls, cell = idx // (h * w), idx % (h * w)
        iv, iu = cell // w, cell % w
        r = reg[i].flatten(1)[:, cell]                    # (8, D)
        x = grid.x0 + (iu + r[0]) * grid.cell
        y = grid.y0 + (iv + r[1]) * grid.cell
        size = r[3:6].clamp(-5, 5).exp()
        heading = torch.atan2(r[6], r[7]) / 2
        out.append((torch.stack([x, y, r[2], size[0], size[1], size[2], heading], 1), s, cls))
    return out


# ---------------------------------------------------------------------------------------------------
# loss terms (models.distill's registry)

def focal_heatmap_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CornerNet's penalty-reduced focal loss (alpha 2, beta 4), summed and divided by the number of
    object centres (cells where the target is 1), as CenterPoint trains its heatmaps."""
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(torch.log(1 - p) * p ** 2 * (1 - target) ** 4 * (1 - pos)).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp_min(1.0)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 of the regression maps at the object centres, per object."""
    m = mask.unsqueeze(1)
    return (F.l1_loss(pred.float() * m, target * m, reduction="sum")) / mask.sum().clamp_min(1.0)


@register_loss("centerpoint")
class CenterPointLoss(nn.Module):
    """Heatmap focal loss + `reg_weight` × box regression L1, against the encoded targets."""
    needs_teacher = False

    def __init__(self, reg_weight: float = 0.25) -> None:
        super().__init__()
        self.reg_weight = reg_weight

    def forward(self, student: Outputs, teacher: Outputs | None, targets: Outputs) -> torch.Tensor:
        return (focal_heatmap_loss(student["heatmap"], targets["heatmap"])
                + self.reg_weight * masked_l1(student["reg"], targets["reg"], targets["mask"]))


@register_loss("heatmap_kd")
class HeatmapKD(nn.Module):
    """Response distillation for a centre-heatmap detector: the focal loss with the teacher's
    probabilities as the soft target, and the regression maps matched where the teacher is confident
    (its probability above `threshold`), so the student copies the teacher's boxes, not its noise."""
    needs_teacher = True

    def __init__(self, reg_weight: float = 0.25, threshold: float = 0.3) -> None:
        super().__init__()
        self.reg_weight, self.threshold = reg_weight, threshold

    def forward(self, student: Outputs, teacher: Outputs, targets: Outputs) -> torch.Tensor:
        soft = torch.sigmoid(teacher["heatmap"].detach().float())
        p = torch.sigmoid(student["heatmap"].float()).clamp(1e-4, 1 - 1e-4)
        # binary cross-entropy with soft targets, focal-weighted by the disagreement
        ce = -(soft * torch.log(p) + (1 - soft) * torch.log(1 - p)) * (p - soft).abs() ** 2
        heat = ce.sum() / soft.amax(1).gt(self.threshold).float().sum().clamp_min(1.0)
        confident = soft.amax(1).gt(self.threshold).float()
        return heat + self.reg_weight * masked_l1(student["reg"], teacher["reg"].detach().float(), confident)
