"""Point-cloud voxelization in plain PyTorch (CPU and CUDA), exact to spconv's CPU `PointToVoxel`.

    grid = VoxelGrid(voxel_size=(0.05, 0.05, 0.1), point_range=(0, -40, -3, 70.4, 40, 1))
    hard = HardVoxelizer(grid, max_points=5, max_voxels=16000)(points)     # points (N, C), xyz first
    hard.voxels (M, 5, C) zero-padded, hard.coords (M, 3) int32 z, y, x, hard.num_points (M,) int32
    dyn = dynamic_voxelize(points, grid)      # every in-range point → a voxel, no caps

The rules are spconv 2.3's CPU `Point2VoxelCPU::point_to_voxel_static`, read from its source:
- a point's cell is `floor((p - lo) / size)` per axis, in float32; the grid has
  `round((hi - lo) / size)` cells per axis (float32, halves away from zero); a cell outside
  `[0, grid)` on any axis (NaN and ±inf included) drops the point, so `p == hi` is out of range;
- voxels are numbered in the order their first point appears; each keeps its first `max_points`
  points in input order (the rest are counted nowhere, but still belong to the voxel:
  `point_voxel`); once `max_voxels` voxels exist, points of new voxels are dropped
  (`point_voxel` -1) while points of existing voxels are still added.

No per-point Python. A point's first cell-mate comes from `CellTable`, a dense int32 table over the
grid (kept between calls, as spconv keeps its own) filled by one `scatter_reduce(amax)` and read back
by one gather; without a table (`hard_voxelize`), from a stable sort of the cell keys. Voxel ids are a
running count of first points. The later points of each voxel go to slots 1.. after a stable sort by
voxel id; on CPU every stable sort is a radix sort on 16-bit digits (numpy's, for uint16), since
torch's comparison sort is ~20× slower here; likewise compactions (nonzero) and bool comparisons
run on numpy views of CPU tensors (5-10× faster than torch's kernels on these machines); CUDA stays
in torch. Points move as single 16-byte elements where C = 4. benchmarks/voxelize.py has the speeds (about 0.5-0.9× spconv's C++ loop on one core, 70-130× the
Python loop): what is left is ~20 passes over the points, where spconv makes one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["VoxelGrid", "CellTable", "HardVoxels", "DynamicVoxels", "HardVoxelizer", "hard_voxelize",
           "dynamic_voxelize", "point_coords", "voxel_features", "scatter_features"]

_INT32_MAX = 2**31 - 1


def _mask(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """The bool tensor `fn` makes of `tensors` (written for numpy arrays and torch tensors alike). On CPU
    it runs on numpy views: comparisons that write bools are ~5× faster there than in torch here."""
    if tensors[0].device.type == "cpu":
        return torch.from_numpy(np.asarray(fn(*(t.numpy() for t in tensors))))
    return fn(*tensors)


def _round_half_away(x: float) -> int:
    """C's std::round (spconv's grid size), not Python's round-half-to-even."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


@dataclass(frozen=True)
class VoxelGrid:
    """A regular grid over `point_range` = (x0, y0, z0, x1, y1, z1), cells of `voxel_size` = (dx, dy, dz).

    Both are held as float32, as spconv holds them; `grid_size` (x, y, z) is computed as spconv does.
    """
    voxel_size: tuple[float, float, float]
    point_range: tuple[float, float, float, float, float, float]
    grid_size: tuple[int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        size = tuple(float(np.float32(v)) for v in self.voxel_size)
        rng = tuple(float(np.float32(v)) for v in self.point_range)
        if len(size) != 3 or len(rng) != 6:
            raise ValueError(f"voxel_size needs 3 values and point_range 6, got {self.voxel_size}, "
                             f"{self.point_range}")
        if not all(math.isfinite(v) for v in size + rng) or min(size) <= 0:
            raise ValueError(f"voxel_size must be finite and > 0, point_range finite: {self.voxel_size}, "
                             f"{self.point_range}")
        # float32 arithmetic, as in Point2VoxelCommon::calc_meta_data
        grid = tuple(_round_half_away(float((np.float32(rng[3 + i]) - np.float32(rng[i]))
                                            / np.float32(size[i]))) for i in range(3))
        if min(grid) <= 0:
            raise ValueError(f"empty grid {grid}: point_range {self.point_range} must have hi > lo")
        object.__setattr__(self, "voxel_size", size)
        object.__setattr__(self, "point_range", rng)
        object.__setattr__(self, "grid_size", grid)

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, 1) float32 lower corner and voxel size on `device`, cached: made once per device."""
        cache = self.__dict__.setdefault("_tensors", {})
        if device not in cache:
            cache[device] = (torch.tensor(self.point_range[:3], device=device)[:, None],
                             torch.tensor(self.voxel_size, device=device)[:, None])
        return cache[device]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """The grid as spconv's `SparseConvTensor.spatial_shape` wants it."""
        gx, gy, gz = self.grid_size
        return gz, gy, gx

    @property
    def table_cells(self) -> int:
        """Cells of the dense table: the grid with a one-cell border on every side."""
        gx, gy, gz = self.grid_size
        return (gx + 2) * (gy + 2) * (gz + 2)


class HardVoxels(NamedTuple):
    voxels: torch.Tensor       # (M, max_points, C) the points of each voxel in input order, zero-padded
    coords: torch.Tensor       # (M, 3) int32 cell indices z, y, x
    num_points: torch.Tensor   # (M,) int32 points kept per voxel, 1..max_points
    point_voxel: torch.Tensor  # (N,) int64 each point's voxel, -1 when out of range or dropped


class DynamicVoxels(NamedTuple):
    coords: torch.Tensor       # (M, 3) int32 z, y, x of every occupied cell, in first-appearance order
    point_voxel: torch.Tensor  # (N,) int64 each point's voxel, -1 when out of range
    num_points: torch.Tensor   # (M,) int32 all points of each voxel


# ---------------------------------------------------------------------------------------------------
# cells and keys

def _check_points(points: torch.Tensor) -> None:
    if points.dim() != 2 or points.shape[1] < 3:
        raise ValueError(f"points must be (N, C>=3) with x, y, z first, got {tuple(points.shape)}")
    if points.dtype != torch.float32:
        raise ValueError(f"points must be float32 (the cell rule is float32 arithmetic), got {points.dtype}")


def _cells(points: torch.Tensor, grid: VoxelGrid) -> torch.Tensor:
    """(3, N) int32 cell index per axis (rows x, y, z), clamped to [-1, grid]: -1 or grid = out of range."""
    lo, size = grid.tensors(points.device)
    c = points[:, :3].t().contiguous()               # (3, N): rows are contiguous, so every op vectorises
    c.sub_(lo).div_(size).floor_()                   # float32, as spconv: floor((p - lo) / size)
    torch.nan_to_num_(c, nan=-1.0)                   # NaN has no int value; ±inf are clamped below
    for axis, g in enumerate(grid.grid_size):
        c[axis].clamp_(-1, g)
    return c.to(torch.int32)


def _keys(cells: torch.Tensor, grid: VoxelGrid) -> torch.Tensor:
    """(N,) int64 cell of the bordered grid, x fastest: border cells are exactly the out-of-range points."""
    gx, gy, _ = grid.grid_size
    sy, sz = gx + 2, (gx + 2) * (gy + 2)
    if grid.table_cells < 2**31:                     # int32 arithmetic is twice as fast
        key = cells[2] * sz
    else:
        key = cells[2].long().mul_(sz)
    key.add_(cells[1], alpha=sy).add_(cells[0]).add_(sz + sy + 1)   # +1 on each axis: -1 → border cell 0
    return key.long()


def _interior(cells: torch.Tensor, grid: VoxelGrid) -> torch.Tensor:
    g = torch.tensor(grid.grid_size, dtype=torch.int32, device=cells.device)[:, None]
    inside = (cells >= 0) & (cells < g)
    return inside[0] & inside[1] & inside[2]


def point_coords(points: torch.Tensor, grid: VoxelGrid) -> torch.Tensor:
    """(N, 3) int32 cell of every point, z, y, x; a row of -1 for an out-of-range point (mmcv's
    `dynamic_voxelize` convention)."""
    _check_points(points)
    cells = _cells(points, grid)
    out = cells.flip(0).t().contiguous()
    out[~_interior(cells, grid)] = -1
    return out


# ---------------------------------------------------------------------------------------------------
# first appearance: for every point, the index of the first point in its cell (negative out of range)
# and whether it is that first point

class CellTable:
    """A dense int32 table over the grid plus a one-cell border, kept between calls (as spconv keeps
    its own): 4 × `grid.table_cells` bytes, 380 MB for the KITTI SECOND grid.

    A call writes `top - i` for point i with scatter(amax), so a cell ends up holding its first point;
    `top` grows by N every call, so what earlier calls left behind is smaller and loses: the table is
    never cleaned between calls (it is refilled once the values would pass int32), and an interrupted
    call leaves nothing that matters. Border cells hold the int32 maximum, which always wins, so a
    point outside the grid reads back a negative first index. Not thread-safe."""

    def __init__(self, grid: VoxelGrid, device: torch.device | str = "cpu") -> None:
        self.grid = grid
        self.values = torch.empty(grid.table_cells, dtype=torch.int32, device=device)
        self._refill()

    def _refill(self) -> None:
        gx, gy, gz = self.grid.grid_size
        cells = self.values.view(gz + 2, gy + 2, gx + 2)
        cells.fill_(_INT32_MAX)                      # border
        cells[1:-1, 1:-1, 1:-1] = -1                 # interior: below every value a call writes
        self.base = 0

    def first(self, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = key.numel()
        if self.base + n >= _INT32_MAX:
            self._refill()
        top = self.base + n - 1
        self.base += n                               # before the scatter: an interruption spoils nothing
        mark = torch.arange(top, top - n, -1, dtype=torch.int32, device=key.device)   # point i → top - i
        self.values.scatter_reduce_(0, key, mark, "amax")   # a reduction: deterministic on any device
        got = self.values.index_select(0, key)
        is_first = _mask(lambda g, k: g == k, got, mark)
        return got.neg_().add_(top), is_first        # top - got: the first point; border: negative


def _first_by_sort(key: torch.Tensor, cells: torch.Tensor,
                   grid: VoxelGrid) -> tuple[torch.Tensor, torch.Tensor]:
    n = key.numel()
    perm = _stable_argsort(key)                      # stable: a run's first element is its first point
    skey = key.index_select(0, perm)
    new = torch.ones(n, dtype=torch.bool, device=key.device)
    new[1:] = skey[1:] != skey[:-1]
    run = torch.cumsum(new, 0) - 1
    first = torch.empty(n, dtype=torch.int64, device=key.device)
    first[perm] = perm[new].index_select(0, run)
    is_first = first == torch.arange(n, device=key.device)
    outside = ~_interior(cells, grid)
    first[outside] = -1
    is_first[outside] = False
    return first.to(torch.int32), is_first


class _Assignment(NamedTuple):
    cells: torch.Tensor        # (3, N) int32, rows x, y, z
    kept: torch.Tensor         # (M,) int64 first point of each voxel, in first-appearance order
    point_voxel: torch.Tensor  # (N,) int64 voxel id: -1 when out of range or past max_voxels
    is_first: torch.Tensor     # (N,) bool


def _assign(points: torch.Tensor, grid: VoxelGrid, max_voxels: int | None,
            table: CellTable | None) -> _Assignment:
    n, dev = points.shape[0], points.device
    cells = _cells(points, grid)
    key = _keys(cells, grid)
    first, is_first = _first_by_sort(key, cells, grid) if table is None else table.first(key)
    # voxel ids in first-appearance order: a running count of first points, read at each point's first
    count = torch.full((n + 1,), -1, dtype=torch.int64, device=dev)    # count[0]: out of range
    torch.cumsum(is_first, 0, out=count[1:])
    num_all = int(count[-1]) + 1 if n else 0
    count[1:].sub_(1)
    point_voxel = count.index_select(0, first.clamp_min_(-1).add_(1))
    m = num_all if max_voxels is None else min(num_all, max_voxels)
    if m < num_all:
        point_voxel.masked_fill_(_mask(lambda v: v >= m, point_voxel), -1)
    # the first points of the kept voxels lie before the m-th first point: search only that prefix
    end = n if m == num_all else int(torch.searchsorted(count[1:], m))
    kept = _nonzero(is_first[:end])
    return _Assignment(cells, kept, point_voxel, is_first)


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    """(K,) int64 indices of the true entries, ascending. On CPU numpy's: 5-10× faster than torch's
    here (torch.nonzero branches on every element)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask).squeeze(1)


def _coords(cells: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return torch.stack([cells[2].index_select(0, kept), cells[1].index_select(0, kept),
                        cells[0].index_select(0, kept)], 1)   # (M, 3) z, y, x


# ---------------------------------------------------------------------------------------------------
# hard voxelization

def _stable_argsort(values: torch.Tensor) -> torch.Tensor:
    """Indices that sort non-negative integers, equal values kept in input order. On CPU an LSD radix
    sort on 16-bit digits (numpy's stable sort of uint16 is a radix sort: one linear pass a digit),
    where torch's comparison sort costs ~50 ns an element on these machines; elsewhere torch.sort."""
    if values.device.type != "cpu":
        return torch.sort(values, stable=True).indices
    a = values.numpy()
    if not a.size or int(a.max()) < 2**16:                  # voxel ids: one pass
        return torch.from_numpy(np.argsort(a.astype(np.uint16), kind="stable"))
    order = np.argsort((a & 0xFFFF).astype(np.uint16), kind="stable")
    high = a[order] >> 16
    high = high.astype(np.uint16) if int(high.max()) < 2**16 else high
    return torch.from_numpy(order[np.argsort(high, kind="stable")])


_RECORD = {4: torch.float32, 8: torch.float64, 16: torch.complex128}   # bytes of a point → one element


def _records(rows: torch.Tensor) -> torch.Tensor:
    """(K, C) as a 1-D view with one element per row when C × 4 bytes is 4, 8 or 16 (x, y, z, r), else
    as it is: gathering and scattering whole rows as single 16-byte elements is ~4× faster than as
    rows of 4 floats (which go element by element through the indexing kernels)."""
    dtype = _RECORD.get(rows.shape[1] * rows.element_size())
    if dtype is None or not rows.is_contiguous() or (rows.storage_offset() * rows.element_size()) % 16:
        return rows
    return rows.view(dtype).view(-1)


def _fill_slots(points: torch.Tensor, flat: torch.Tensor, later: torch.Tensor, voxel: torch.Tensor,
                counts: torch.Tensor, max_points: int) -> None:
    """Writes the later points of each voxel (`later` ascending, in voxels `voxel`, `counts` of them per
    voxel) into slots 1.. of `flat` (M * max_points + 1 rows; the last one takes the points past
    `max_points`, and is discarded): stably sorted by voxel, a point's slot is 1 + its place in its
    voxel's run."""
    order = _stable_argsort(voxel)
    sv = voxel.index_select(0, order)
    start = torch.cumsum(counts, 0).sub_(counts)                        # where each voxel's run begins
    slot = torch.arange(1, sv.numel() + 1, device=sv.device).sub_(start.index_select(0, sv))
    dest = torch.where(slot < max_points, sv.mul_(max_points).add_(slot), flat.shape[0] - 1)
    flat.index_copy_(0, dest, points.index_select(0, later.index_select(0, order)))


def _hard(points: torch.Tensor, grid: VoxelGrid, max_points: int, max_voxels: int,
          table: CellTable | None) -> HardVoxels:
    _check_points(points)
    if max_points < 1 or max_voxels < 0:
        raise ValueError(f"max_points must be >= 1 and max_voxels >= 0, got {max_points}, {max_voxels}")
    c = points.shape[1]
    a = _assign(points, grid, max_voxels, table)
    m = a.kept.numel()
    storage = points.new_zeros((m * max_points + 1, c))     # + a row for the points past max_points
    voxels = storage[:-1].view(m, max_points, c)
    rec, flat = _records(points), _records(storage)
    flat[:-1].view(m, max_points, *flat.shape[1:])[:, 0] = rec.index_select(0, a.kept)   # slot 0
    point_voxel = a.point_voxel
    if max_points == 1:
        num = torch.ones(m, dtype=torch.int32, device=points.device)
    else:
        later = _nonzero(_mask(lambda v, f: (v >= 0) & ~f, point_voxel, a.is_first))   # rest of kept voxels
        voxel = point_voxel.index_select(0, later)
        counts = torch.bincount(voxel, minlength=m)
        num = (counts + 1).clamp_max_(max_points).to(torch.int32)
        _fill_slots(rec, flat, later, voxel, counts, max_points)
    return HardVoxels(voxels, _coords(a.cells, a.kept), num, point_voxel)


def hard_voxelize(points: torch.Tensor, grid: VoxelGrid, max_points: int, max_voxels: int) -> HardVoxels:
    """Hard voxelization without a table (a stable sort of the cell keys finds first appearances):
    no memory held between calls. `HardVoxelizer` is the fast path for repeated calls."""
    with torch.no_grad():
        return _hard(points, grid, max_points, max_voxels, None)


class HardVoxelizer:
    """Hard voxelization with a `CellTable` per device, made on first use and kept. Not thread-safe."""

    def __init__(self, grid: VoxelGrid, max_points: int, max_voxels: int) -> None:
        self.grid, self.max_points, self.max_voxels = grid, max_points, max_voxels
        self._tables: dict[torch.device, CellTable] = {}

    def table(self, device: torch.device | str) -> CellTable:
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = CellTable(self.grid, device)
        return self._tables[device]

    @torch.no_grad()
    def __call__(self, points: torch.Tensor) -> HardVoxels:
        return _hard(points, self.grid, self.max_points, self.max_voxels, self.table(points.device))


# ---------------------------------------------------------------------------------------------------
# dynamic voxelization and features

@torch.no_grad()
def dynamic_voxelize(points: torch.Tensor, grid: VoxelGrid, table: CellTable | None = None) -> DynamicVoxels:
    """Every in-range point to a voxel, no caps: hard voxelization's voxels and `point_voxel` with
    unlimited `max_points` and `max_voxels`. Without `table`, a stable sort finds first appearances."""
    _check_points(points)
    a = _assign(points, grid, None, table)
    num = torch.bincount(a.point_voxel + 1, minlength=a.kept.numel() + 1)[1:].to(torch.int32)
    return DynamicVoxels(_coords(a.cells, a.kept), a.point_voxel, num)


def voxel_features(hard: HardVoxels, mode: str = "mean") -> torch.Tensor:
    """(M, C) one feature row per hard voxel: the mean of its kept points (OpenPCDet's MeanVFE) or its
    first point."""
    if mode == "first":
        return hard.voxels[:, 0]
    if mode == "mean":
        return hard.voxels.sum(1) / hard.num_points.clamp_min(1).to(hard.voxels.dtype)[:, None]
    raise ValueError(f"mode must be 'mean' or 'first', got {mode!r}")


def scatter_features(points: torch.Tensor, dyn: DynamicVoxels, mode: str = "mean") -> torch.Tensor:
    """(M, C) per dynamic voxel: the mean of all its points, or its first point."""
    m = dyn.coords.shape[0]
    inside = _nonzero(dyn.point_voxel >= 0)
    vid = dyn.point_voxel.index_select(0, inside)
    pts = points.index_select(0, inside)
    if mode == "mean":
        out = points.new_zeros((m, points.shape[1])).index_add_(0, vid, pts)
        return out / dyn.num_points.clamp_min(1).to(points.dtype)[:, None]
    if mode == "first":
        first = torch.full((m,), points.shape[0], dtype=torch.int64, device=points.device)
        first.scatter_reduce_(0, vid, inside, "amin")
        return points.index_select(0, first)
    raise ValueError(f"mode must be 'mean' or 'first', got {mode!r}")
