"""The sparse convolution of models/detection3d.py against independent references: F.conv3d on the dense grid (values, gradients,
output grid), and brute-force Python loops over sites and kernel offsets on tiny grids (output site
sets, pair counts, SPS-Conv's pruned convs and its top-k rule)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.detection3d import (SparseConv3d, SparseTensor, SPRSConv3d, SPSSConv3d, SubMConv3d, count_macs,
                                importance, keep_mask)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_grid(shape=(5, 7, 6), channels=4, batch=2, occupancy=0.2, seed=0, dtype=torch.float32, device="cpu"):
    """A dense (B, C, Z, Y, X) tensor, nonzero in every channel at ~occupancy of the sites, and its sparse form."""
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(batch, 1, *shape, generator=g) < occupancy
    # |features| in [0.5, 1.5), so that from_dense sees exactly the sites drawn
    magnitude = torch.rand(batch, channels, *shape, generator=g, dtype=torch.float64) + 0.5
    sign = torch.randint(0, 2, (batch, channels, *shape), generator=g) * 2 - 1
    d = (magnitude * sign * active).to(dtype=dtype, device=device)
    return d, SparseTensor.from_dense(d)


def dense_weight(w: torch.Tensor, kernel: int) -> torch.Tensor:
    """(K, Cin, Cout) with z-major offsets -> conv3d's (Cout, Cin, kz, ky, kx), index by index."""
    cin, cout = w.shape[1:]
    out = w.new_zeros(cout, cin, kernel, kernel, kernel)
    for k, (kz, ky, kx) in enumerate(itertools.product(range(kernel), repeat=3)):
        out[:, :, kz, ky, kx] = w[k].T
    return out


def at_sites(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """(N, C) rows of a (B, C, Z, Y, X) tensor at coords (b, z, y, x)."""
    b, z, y, x = coords.unbind(1)
    return dense.permute(0, 2, 3, 4, 1)[b, z, y, x]


def sites(x: SparseTensor) -> dict[tuple[int, ...], int]:
    return {tuple(c): i for i, c in enumerate(x.coords.tolist())}


def ref_keep(x: SparseTensor, ratio: float) -> list[bool]:
    """SPS-Conv's rule by hand: per sample, ceil(ratio·n_b) sites of largest mean |x|, earlier site on ties."""
    imp = [sum(abs(v) for v in row) / len(row) for row in x.features.tolist()]
    keep = [False] * len(imp)
    for b in range(x.batch_size):
        rows = [i for i, c in enumerate(x.coords.tolist()) if c[0] == b]
        quota = round(ratio * len(rows) * 1e6) / 1e6   # the exact product, free of float round-off
        for i in sorted(rows, key=lambda i: (-imp[i], i))[:math.ceil(quota)]:
            keep[i] = True
    return keep


def ref_subm(x: SparseTensor, w: torch.Tensor, kernel: int, out_rows) -> dict[int, torch.Tensor]:
    """SubM output at the rows `out_rows`, summing over active neighbours one (site, offset) at a time."""
    where, c = sites(x), kernel // 2
    out = {}
    for o in out_rows:
        b, z, y, xx = x.coords[o].tolist()
        acc = torch.zeros(w.shape[2], dtype=w.dtype)
        for k, (kz, ky, kx) in enumerate(itertools.product(range(kernel), repeat=3)):
            i = where.get((b, z + kz - c, y + ky - c, xx + kx - c))
            if i is not None:
                acc += x.features[i] @ w[k]
        out[o] = acc
    return out


def ref_regular(x: SparseTensor, w: torch.Tensor, kernel: int, stride: int, padding: int,
                keep: list[bool] | None = None) -> dict[tuple[int, ...], torch.Tensor]:
    """Regular conv output by input site and offset: i reaches o = (i + p - k) / s where integral and in
    the grid; with `keep`, a pruned i only reaches the cell containing it, i // s."""
    out_shape = [(n + 2 * padding - kernel) // stride + 1 for n in x.shape]
    out: dict[tuple[int, ...], torch.Tensor] = {}
    for i, (b, *site) in enumerate(x.coords.tolist()):
        for k, offset in enumerate(itertools.product(range(kernel), repeat=3)):
            q = [s + padding - o for s, o in zip(site, offset)]
            if any(v < 0 or v % stride for v in q):
                continue
            cell = [v // stride for v in q]
            if any(c >= n for c, n in zip(cell, out_shape)):
                continue
            if keep is not None and not keep[i] and cell != [s // stride for s in site]:
                continue
            key = (b, *cell)
            out[key] = out.get(key, 0) + x.features[i] @ w[k]
    return out


# ---------------------------------------------------------------------------------------------------
# SparseTensor

def test_sparse_tensor_round_trips_through_dense():
    d, x = random_grid()
    assert torch.equal(x.dense(), d)
    assert x.shape == (5, 7, 6) and x.batch_size == 2 and x.coords.dtype == torch.int64
    assert torch.equal(at_sites(d, x.coords), x.features)
    assert (x.coords.diff(dim=0) != 0).any(1).all()   # unique rows
    y = x.replace(x.features * 2)
    assert torch.equal(y.dense(), 2 * d) and y.coords is x.coords
    z = SparseTensor(x.features, x.coords.int(), x.shape, 2)   # a voxelizer's int32 coords
    assert z.coords.dtype == torch.int64 and torch.equal(z.dense(), d)
    with pytest.raises(ValueError):
        x.replace(x.features[:-1])
    with pytest.raises(ValueError):
        SparseTensor(x.features, x.coords[:, :3], x.shape, 2)


# ---------------------------------------------------------------------------------------------------
# against dense conv3d

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cin,cout,kernel,shape", [(1, 1, 3, (5, 7, 6)), (4, 8, 3, (5, 7, 6)),
                                                   (16, 5, 3, (7, 4, 9)), (3, 7, 1, (5, 7, 6))])
def test_subm_matches_dense_conv_at_active_sites(device, cin, cout, kernel, shape):
    d, x = random_grid(shape, cin, seed=cin + kernel, device=device)
    conv = SubMConv3d(cin, cout, kernel).to(device)
    y = conv(x)
    ref = F.conv3d(d, dense_weight(conv.weight, kernel), padding=kernel // 2)
    assert torch.equal(y.coords, x.coords) and y.shape == x.shape and y.features.shape == (len(x.coords), cout)
    torch.testing.assert_close(y.features, at_sites(ref, x.coords), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel,stride,padding,shape", [(3, 2, 1, (5, 7, 6)), (3, 1, 1, (5, 7, 6)),
                                                         (3, 2, 1, (7, 5, 9)), (3, 1, 0, (4, 6, 5)),
                                                         (2, 2, 0, (5, 7, 6)), (3, 3, 2, (5, 8, 7))])
def test_sparse_conv_matches_dense_conv_on_the_whole_grid(device, kernel, stride, padding, shape):
    d, x = random_grid(shape, 3, seed=kernel * stride + padding, device=device)
    conv = SparseConv3d(3, 5, kernel, stride, padding).to(device)
    y = conv(x)
    ref = F.conv3d(d, dense_weight(conv.weight, kernel), stride=stride, padding=padding)
    assert y.shape == tuple(ref.shape[2:])
    torch.testing.assert_close(y.dense(), ref, rtol=1e-5, atol=1e-5)   # zero wherever no site is output
    # the output sites are exactly the cells whose receptive field holds an active input, by brute force
    active = set(sites(x))
    reached = set()
    for b in range(2):
        for o in itertools.product(*(range(n) for n in y.shape)):
            for k in itertools.product(range(kernel), repeat=3):
                if (b, *(c * stride - padding + kk for c, kk in zip(o, k))) in active:
                    reached.add((b, *o))
                    break
    assert set(sites(y)) == reached and len(sites(y)) == len(y.coords)
    assert torch.equal(y.coords, torch.tensor(sorted(reached), device=device).view(-1, 4))   # (b, z, y, x) order


@pytest.mark.parametrize("module", ["subm", "conv"])
def test_gradients_match_dense_conv(module):
    d, x = random_grid((4, 5, 4), 3, seed=7, dtype=torch.float64)
    conv = (SubMConv3d(3, 4) if module == "subm" else SparseConv3d(3, 4, 3, 2, 1)).double()
    feats = x.features.clone().requires_grad_()
    y = conv(x.replace(feats))
    dd = d.clone().requires_grad_()
    w = dense_weight(conv.weight.detach(), 3).requires_grad_()
    if module == "subm":
        g = torch.randn_like(y.features)
        (y.features * g).sum().backward()
        (at_sites(F.conv3d(dd, w, padding=1), x.coords) * g).sum().backward()
    else:
        g = torch.randn(2, 4, *y.shape, dtype=torch.float64)
        (y.dense() * g).sum().backward()
        (F.conv3d(dd, w, stride=2, padding=1) * g).sum().backward()
    torch.testing.assert_close(feats.grad, at_sites(dd.grad, x.coords))
    torch.testing.assert_close(dense_weight(conv.weight.grad, 3), w.grad)


def test_gradcheck_with_bias():
    _, x = random_grid((3, 4, 3), 2, batch=1, seed=3, dtype=torch.float64, occupancy=0.4)
    for conv in (SubMConv3d(2, 3, bias=True).double(), SparseConv3d(2, 3, bias=True).double()):
        def f(feats, weight, bias):
            params = {"weight": weight, "bias": bias}
            return torch.func.functional_call(conv, params, (x.replace(feats),)).features
        inputs = (x.features, conv.weight.detach(), conv.bias.detach())
        assert torch.autograd.gradcheck(f, tuple(t.clone().requires_grad_() for t in inputs))


# ---------------------------------------------------------------------------------------------------
# importance and the keep mask

def test_importance_is_mean_abs_and_keep_mask_is_per_sample_top_k():
    _, x = random_grid((6, 7, 6), 5, seed=11, occupancy=0.3)
    expected = [sum(abs(v) for v in row) / 5 for row in x.features.tolist()]
    torch.testing.assert_close(importance(x), torch.tensor(expected))
    for ratio in (0.0, 0.1, 0.25, 0.5, 0.77, 1.0):
        keep = keep_mask(x, ratio)
        assert keep.tolist() == ref_keep(x, ratio)
        for b in range(2):
            n_b = int((x.coords[:, 0] == b).sum())
            assert int(keep[x.coords[:, 0] == b].sum()) == math.ceil(ratio * n_b - 1e-9)
    with pytest.raises(ValueError):
        keep_mask(x, 1.5)


def test_keep_mask_breaks_ties_by_site_order_and_ignores_round_off():
    # sample 0 has 10 sites, sample 1 has 7, sample 2 none; every |x| ties
    coords = torch.tensor([[0, 0, 0, i] for i in range(10)] + [[1, 0, 1, i] for i in range(7)])
    x = SparseTensor(torch.ones(17, 3) * torch.where(torch.arange(17) % 2 == 0, 1.0, -1.0)[:, None], coords,
                     (1, 2, 10), 3)
    keep = keep_mask(x, 0.3)   # 0.3 * 10 is 3.0000000000000004 in floats: still 3 sites
    assert keep.nonzero().flatten().tolist() == [0, 1, 2, 10, 11, 12]
    assert keep_mask(x, 1.0).all() and not keep_mask(x, 0.0).any()


# ---------------------------------------------------------------------------------------------------
# SPS-Conv: pruned submanifold and regular convs

def test_spss_keep_all_is_subm_exactly():
    _, x = random_grid((5, 7, 6), 6, seed=5)
    for bias in (False, True):
        spss = SPSSConv3d(6, keep_ratio=1.0, bias=bias)
        subm = SubMConv3d(6, 6, bias=bias)
        subm.load_state_dict(spss.state_dict())
        y, ref = spss(x), subm(x)
        assert torch.equal(y.features, ref.features) and torch.equal(y.coords, x.coords)
        assert spss.macs == subm.macs and spss.last_keep.all()


@pytest.mark.parametrize("ratio", [0.5, 0.2])
def test_spss_matches_loop_reference(ratio):
    _, x = random_grid((4, 5, 4), 3, seed=9, occupancy=0.35)
    spss = SPSSConv3d(3, keep_ratio=ratio)
    y = spss(x)
    keep = ref_keep(x, ratio)
    assert spss.last_keep.tolist() == keep and torch.equal(y.coords, x.coords)
    pruned = [i for i, k in enumerate(keep) if not k]
    kept = [i for i, k in enumerate(keep) if k]
    assert pruned and kept
    assert torch.equal(y.features[pruned], x.features[pruned])   # carried through untouched
    ref = ref_subm(x, spss.weight.detach(), 3, kept)             # from all neighbours, pruned ones too
    torch.testing.assert_close(y.features[kept], torch.stack([ref[o] for o in kept]), rtol=1e-5, atol=1e-5)


def test_sprs_keep_all_is_sparse_conv_exactly():
    _, x = random_grid((5, 7, 6), 4, seed=6)
    sprs = SPRSConv3d(4, 8, keep_ratio=1.0)
    conv = SparseConv3d(4, 8)
    conv.load_state_dict(sprs.state_dict())
    y, ref = sprs(x), conv(x)
    assert torch.equal(y.coords, ref.coords) and torch.equal(y.features, ref.features) and y.shape == ref.shape
    assert sprs.macs == conv.macs


@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (3, 1, 1), (2, 2, 0)])
@pytest.mark.parametrize("ratio", [0.5, 0.0])
def test_sprs_matches_loop_reference(kernel, stride, padding, ratio):
    _, x = random_grid((4, 6, 5), 3, seed=kernel + stride, occupancy=0.3)
    sprs = SPRSConv3d(3, 4, kernel, stride, padding, keep_ratio=ratio)
    y = sprs(x)
    keep = ref_keep(x, ratio)
    assert sprs.last_keep.tolist() == keep
    ref = ref_regular(x, sprs.weight.detach(), kernel, stride, padding, keep)
    assert set(sites(y)) == set(ref)
    torch.testing.assert_close(y.features, torch.stack([ref[c] for c in sites(y)]), rtol=1e-5, atol=1e-5)
    full = SparseConv3d(3, 4, kernel, stride, padding)
    assert len(y.coords) <= len(full(x).coords) and sprs.macs <= full.macs


# ---------------------------------------------------------------------------------------------------
# cost accounting, caching, edge cases

def test_macs_count_rulebook_pairs():
    _, x = random_grid((5, 7, 6), 4, seed=2, occupancy=0.3)
    where = sites(x)
    pairs = sum((b, z + dz, y + dy, xx + dx) in where for b, z, y, xx in where
                for dz, dy, dx in itertools.product((-1, 0, 1), repeat=3))
    subm = SubMConv3d(4, 6)
    subm(x)
    assert subm.pairs == pairs and subm.macs == pairs * 4 * 6
    conv = SparseConv3d(4, 8, 3, 2, 1)
    ref_pairs = sum(1 for _ in ref_regular_pairs(x, 3, 2, 1))
    conv(x)
    assert conv.pairs == ref_pairs and conv.macs == ref_pairs * 4 * 8
    spss, sprs = SPSSConv3d(4, keep_ratio=0.5), SPRSConv3d(4, 8, keep_ratio=0.5)
    spss(x), sprs(x)
    assert 0 < spss.pairs < subm.pairs and spss.macs == spss.pairs * 4 * 4   # only kept outputs' pairs
    assert 0 < sprs.pairs < conv.pairs and sprs.macs == sprs.pairs * 4 * 8
    net = nn.Sequential(SubMConv3d(4, 6), SparseConv3d(6, 8), SPSSConv3d(8, keep_ratio=0.5))
    net(x)
    assert count_macs(net) == sum(m.macs for m in net) > 0


def ref_regular_pairs(x: SparseTensor, kernel: int, stride: int, padding: int):
    out_shape = [(n + 2 * padding - kernel) // stride + 1 for n in x.shape]
    for b, *site in x.coords.tolist():
        for offset in itertools.product(range(kernel), repeat=3):
            q = [s + padding - o for s, o in zip(site, offset)]
            if all(v >= 0 and v % stride == 0 and v // stride < n for v, n in zip(q, out_shape)):
                yield b, site, offset


def test_rulebook_cache_is_shared_by_replace_and_dropped_with_new_coords():
    d, x = random_grid((5, 7, 6), 4, seed=4)
    a, b = SubMConv3d(4, 4), SubMConv3d(4, 4)
    y = b(a(x))
    assert y._cache is x._cache and [k for k in x.cache() if k != "coords"] == [("subm", (3, 3, 3))]
    w_a, w_b = dense_weight(a.weight, 3), dense_weight(b.weight, 3)
    mask = (d != 0).any(1, keepdim=True)
    ref = F.conv3d(F.conv3d(d, w_a, padding=1) * mask, w_b, padding=1)
    torch.testing.assert_close(y.features, at_sites(ref, x.coords), rtol=1e-5, atol=1e-5)
    d2, x2 = random_grid((5, 7, 6), 4, seed=40)
    x.coords, x.features = x2.coords, x2.features   # same object, new sites: the cache must not leak
    ref = at_sites(F.conv3d(d2, w_a, padding=1), x2.coords)
    torch.testing.assert_close(a(x).features, ref, rtol=1e-5, atol=1e-5)


def test_empty_input():
    x = SparseTensor(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.long), (5, 7, 6), 2)
    for conv, cout in ((SubMConv3d(4, 6), 6), (SparseConv3d(4, 6), 6), (SPSSConv3d(4), 4), (SPRSConv3d(4, 6), 6)):
        y = conv(x)
        assert y.features.shape == (0, cout) and y.coords.shape == (0, 4) and conv.macs == 0
        assert y.dense().shape[:2] == (2, cout) and not y.dense().any()
