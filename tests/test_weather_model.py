"""Pangu-Weather model (models/weather.py): shapes, the Earth-specific bias, longitude wrap-around,
the shifted-window mask and the hierarchical forecaster, each against a brute-force reference."""
import itertools

import pytest
import torch
import torch.nn as nn

import models
import models.weather as weather
from models.registry import create_model
from models.weather import EarthSpecificBlock, HierarchicalForecaster, PanguConfig


def fields(c: PanguConfig, batch: int = 2, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    upper = torch.randn(batch, c.n_upper, c.n_levels, c.n_lat, c.n_lon, generator=g, dtype=dtype)
    surface = torch.randn(batch, c.n_surface, c.n_lat, c.n_lon, generator=g, dtype=dtype)
    return upper, surface


# ---------------------------------------------------------------------------------------------------
# shapes, gradients, sizes

@pytest.mark.parametrize("name", ["pangu_lite", "pangu_tiny"])
def test_forward_backward_with_padding(name):
    torch.manual_seed(0)
    model = create_model(name, n_lat=15, n_lon=30, n_levels=3, drop_path=0.1)
    upper, surface = fields(model.config)
    out_upper, out_surface = model(upper, surface)
    assert out_upper.shape == upper.shape and out_surface.shape == surface.shape
    (out_upper.square().mean() + out_surface.square().mean()).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.encoder1.blocks[0].attn.bias_table.grad.abs().sum() > 0


def test_student_is_several_times_smaller():
    teacher, student = weather.pangu_lite(), weather.pangu_tiny()
    assert teacher.get_num_params() == sum(p.numel() for p in teacher.parameters())
    assert teacher.get_num_params() > 3 * student.get_num_params()  # the bias tables do not shrink with the width


def test_kd_taps_output_tensors():
    model = weather.pangu_lite()
    c = model.config
    Z, H, W = c.token_grid
    C = c.embed_dim
    expected = {"patch_embed": (2, Z, H, W, C), "encoder1": (2, Z, H, W, C),
                "encoder2": (2, Z, H // 2, W // 2, 2 * C), "decoder2": (2, Z, H // 2, W // 2, 2 * C),
                "decoder1": (2, Z, H, W, C)}
    seen = {}
    for path in expected:
        model.get_submodule(path).register_forward_hook(
            lambda m, i, o, path=path: seen.__setitem__(path, o))
    model(*fields(c))
    assert {k: tuple(v.shape) for k, v in seen.items()} == expected


def test_full_profile_config():
    c = PanguConfig(**weather.PANGU_FULL)
    assert c.token_grid == (8, 181, 360) and c.token_grid2 == (8, 91, 180)
    # longitude needs no padding at either stage, so the wrap-around is exact on the real grid
    assert c.token_grid[2] % c.window[2] == 0 and c.token_grid2[2] % c.window[2] == 0
    # the same architecture on a small grid builds and runs
    model = weather.pangu_full(n_lat=24, n_lon=48)
    assert model.config.embed_dim == 192 and model.config.depths == (2, 6)
    with torch.no_grad():
        upper, surface = fields(model.config, batch=1)
        out_upper, out_surface = model(upper, surface)
    assert out_upper.shape == upper.shape and out_surface.shape == surface.shape


# ---------------------------------------------------------------------------------------------------
# Earth-specific positional bias

def test_position_index_against_brute_force():
    wz, wh, ww = window = (2, 3, 4)
    index = weather.earth_position_index(window)
    tokens = list(itertools.product(range(wz), range(wh), range(ww)))   # row-major, as in the window
    n_pairs = wz * wz * wh * wh * (2 * ww - 1)
    key_of_index = {}
    for i, (zi, hi, wi) in enumerate(tokens):
        for j, (zj, hj, wj) in enumerate(tokens):
            key = (zi, zj, hi, hj, wi - wj)      # absolute level/lat of both, relative lon
            # the expected index enumerates the key lexicographically
            expected = (((zi * wz + zj) * wh + hi) * wh + hj) * (2 * ww - 1) + (wi - wj + ww - 1)
            assert index[i, j] == expected
            assert key_of_index.setdefault(int(index[i, j]), key) == key   # one key per table entry
    assert sorted(key_of_index) == list(range(n_pairs))                   # every entry used once

    block = EarthSpecificBlock(8, 2, grid=(4, 8, 16), window=(2, 4, 8), shifted=False)
    assert torch.equal(block.attn.bias_index, weather.earth_position_index((2, 4, 8)))
    # one table slice per (level, lat) window row: 2 x 2 here
    assert block.attn.bias_table.shape == (4, 2 * 2 * 4 * 4 * 15, 2)


def test_bias_shared_along_lon_distinct_across_rows():
    torch.manual_seed(0)
    block = EarthSpecificBlock(8, 2, grid=(4, 8, 16), window=(2, 4, 8), shifted=False)
    bias = block.attn.earth_bias()                                     # (T, heads, N, N)
    tok = lambda z, h, w: (z * 4 + h) * 8 + w                          # noqa: E731
    # same lon offset (+3) at different longitudes in a window -> same entry
    assert torch.equal(bias[:, :, tok(0, 1, 0), tok(1, 2, 3)], bias[:, :, tok(0, 1, 4), tok(1, 2, 7)])
    # different lon offset -> different entry
    assert not torch.equal(bias[:, :, tok(0, 1, 0), tok(1, 2, 3)], bias[:, :, tok(0, 1, 0), tok(1, 2, 2)])
    # window rows 0 and 1 in latitude (same level row) use different slices
    assert not torch.allclose(bias[0], bias[1])

    # functionally: identical content in every window -> identical outputs along lon, not across rows
    x = torch.randn(1, 1, 1, 64, 8).expand(1, 4, 2, 64, 8)             # (B, T, nWw, N, C)
    with torch.no_grad():
        y = block.attn(x, None)
    assert torch.allclose(y[:, :, 0], y[:, :, 1])
    assert not torch.allclose(y[:, 0], y[:, 1])


# ---------------------------------------------------------------------------------------------------
# longitude wrap-around

def test_equivariant_to_longitude_rolls_by_window_multiples():
    torch.manual_seed(0)
    # stage 1: 16 lon tokens in 4 windows of 4; stage 2: 8 tokens in 2 windows of 4. A roll by one
    # stage-2 window = 4 * 2 * 2 = 16 grid points keeps every partition and every window row.
    model = weather.pangu_lite(n_lat=15, n_lon=32, window=(2, 4, 4)).double().eval()
    upper, surface = fields(model.config, dtype=torch.float64)
    with torch.no_grad():
        out = model(upper, surface)
        rolled = model(upper.roll(16, dims=-1), surface.roll(16, dims=-1))
        off_grid = model(upper.roll(2, dims=-1), surface.roll(2, dims=-1))
    for a, b in zip(out, rolled):
        torch.testing.assert_close(a.roll(16, dims=-1), b, rtol=1e-10, atol=1e-10)
    # sanity: a roll by one patch moves the windows, so the test above is not vacuous
    assert not torch.allclose(out[0].roll(2, dims=-1), off_grid[0], atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# shifted-window mask

def expected_allowed(block, q, k):
    """Brute force in original (unrolled) token coordinates: q may attend k iff they share a shifted
    window, were neighbours before the roll in level and latitude (longitude is a circle) and k is
    not padding."""
    for d in range(3):
        w, s, p = block.window[d], block.shift[d], block.padded[d]
        if ((q[d] - s) % p) // w != ((k[d] - s) % p) // w:
            return False
        if d < 2 and abs(q[d] - k[d]) >= w:
            return False
    return all(k[d] < block.grid[d] for d in range(3))


def test_shifted_mask_against_region_brute_force():
    block = EarthSpecificBlock(8, 2, grid=(3, 7, 15), window=(2, 4, 8), shifted=True)
    assert block.shift == (1, 2, 4) and block.padded == (4, 8, 16)
    mask = block.attn_mask()                                           # (T, nWw, N, N)
    (wz, wh, ww), (sz, sh, sw), (Zp, Hp, Wp) = block.window, block.shift, block.padded
    offsets = list(itertools.product(range(wz), range(wh), range(ww)))
    n_forbidden_lat = 0
    for tz, th, tw in itertools.product(range(Zp // wz), range(Hp // wh), range(Wp // ww)):
        # rolled coordinate r -> original (r + shift) mod padded size
        orig = [((tz * wz + a + sz) % Zp, (th * wh + b + sh) % Hp, (tw * ww + c + sw) % Wp)
                for a, b, c in offsets]
        for i, q in enumerate(orig):
            if any(q[d] >= block.grid[d] for d in range(3)):
                continue                         # padded queries are cropped; their rows don't matter
            for j, k in enumerate(orig):
                allowed = expected_allowed(block, q, k)
                assert (mask[tz * (Hp // wh) + th, tw, i, j] == 0) == allowed, (q, k)
                n_forbidden_lat += abs(q[1] - k[1]) >= wh
    assert n_forbidden_lat > 0


def test_shifted_block_mixes_only_allowed_tokens():
    """End to end through pad / roll / partition / reverse: perturbing one token changes exactly the
    outputs of the tokens allowed to attend to it."""
    torch.manual_seed(0)
    block = EarthSpecificBlock(8, 2, grid=(3, 7, 15), window=(2, 4, 8), shifted=True).double().eval()
    x = torch.randn(1, 3, 7, 15, 8, dtype=torch.float64)
    grid = list(itertools.product(range(3), range(7), range(15)))
    with torch.no_grad():
        y = block(x)
        for p in [(0, 0, 0), (2, 6, 14), (1, 3, 3), (0, 5, 12)]:      # corners, middle, near ends
            x2 = x.clone()
            x2[0, p[0], p[1], p[2]] += torch.randn(8, dtype=torch.float64)  # not constant: LayerNorm
            changed = (block(x2) - y).abs().amax(-1)[0] > 1e-12        # (Z, H, W)
            expected = torch.zeros_like(changed)
            for q in grid:
                expected[q] = q == p or expected_allowed(block, q, p)
            assert torch.equal(changed, expected), p
    # the lon wrap-around is used: (0, 0, 0) reaches lon 13 across the date line
    assert expected_allowed(block, (0, 0, 13), (0, 0, 0))
    # but lat does not wrap: the top row cannot reach the bottom row
    assert not expected_allowed(block, (0, 6, 0), (0, 0, 0))


def test_unshifted_block_masks_only_padding():
    block = EarthSpecificBlock(8, 2, grid=(4, 8, 16), window=(2, 4, 8), shifted=False)
    assert not block.masked                                            # no pad, no shift, no mask
    padded = EarthSpecificBlock(8, 2, grid=(3, 8, 16), window=(2, 4, 8), shifted=False)
    real = padded.region_ids >= 0                                      # (T, nWw, N)
    forbidden = padded.attn_mask() != 0                                # (T, nWw, N, N)
    # for real queries, exactly the keys on the padded level (z = 3, in the last level row) are masked
    assert torch.equal(forbidden[real], (~real)[..., None, :].expand_as(forbidden)[real])
    assert (~real).sum() == 8 * 16 and not real[:2].logical_not().any()


# ---------------------------------------------------------------------------------------------------
# hierarchical forecaster

class AddLead(nn.Module):
    def __init__(self, lead, calls):
        super().__init__()
        self.lead, self.calls = lead, calls

    def forward(self, upper, surface):
        self.calls.append(self.lead)
        return upper + self.lead, surface + self.lead


def test_plan_is_greedy():
    f = HierarchicalForecaster({1: nn.Identity(), 3: nn.Identity(), 6: nn.Identity(), 24: nn.Identity()})
    assert f.plan(31) == [24, 6, 1]
    assert f.plan(24) == [24]
    assert f.plan(1) == [1]
    assert f.plan(5) == [3, 1, 1]
    assert f.plan(72) == [24, 24, 24]
    assert f.plan(53) == [24, 24, 3, 1, 1]
    assert sorted(f.models.keys()) == ["1", "24", "3", "6"]


@pytest.mark.parametrize("lead", [0, -6, 7])
def test_plan_errors(lead):
    f = HierarchicalForecaster({6: nn.Identity(), 24: nn.Identity()})
    with pytest.raises(ValueError):
        f.plan(lead)


def test_forward_applies_plan_in_order():
    calls = []
    f = HierarchicalForecaster({k: AddLead(k, calls) for k in (1, 3, 6, 24)})
    upper, surface = torch.zeros(1, 2, 3, 4, 5), torch.zeros(1, 2, 4, 5)
    out_upper, out_surface = f(upper, surface, lead=31)
    assert calls == [24, 6, 1]
    assert torch.all(out_upper == 31) and torch.all(out_surface == 31)


def test_regional_grid_masks_the_longitude_wrap_of_shifted_windows():
    from models.weather import EarthSpecificBlock
    torch.manual_seed(0)
    x = torch.randn(1, 1, 4, 16, 8)
    bumped = x.clone()
    bumped[0, 0, :, 0] += torch.randn(8)   # the westmost column (a constant shift would vanish in LayerNorm)
    for wrap, east_changes in ((True, True), (False, False)):
        block = EarthSpecificBlock(8, 2, (1, 4, 16), (1, 2, 8), shifted=True, wrap_lon=wrap).eval()
        with torch.no_grad():
            delta = (block(bumped) - block(x))[0, 0, :, -1].abs().max()   # the eastmost column
        assert bool(delta > 1e-6) is east_changes


def test_surface_only_pangu_has_a_one_level_token_cube():
    m = models.create_model("pangu_lite", n_upper=0, n_levels=0, n_surface=1, n_lat=15, n_lon=22,
                            wrap_lon=False)
    assert m.config.token_grid[0] == 1
    u, s = m(torch.zeros(2, 0, 0, 15, 22), torch.randn(2, 1, 15, 22))
    assert u.shape == (2, 0, 0, 15, 22) and s.shape == (2, 1, 15, 22)
    s.abs().mean().backward()


def test_upper_air_only_pangu_has_no_surface_level():
    m = models.create_model("pangu_lite", n_upper=2, n_levels=2, n_surface=0, n_lat=30, n_lon=60)
    assert m.config.token_grid == (2, 15, 30)  # two levels at patch depth 1, no surface level
    assert m.patch_embed.surface is None and m.patch_recovery.surface is None
    upper = torch.randn(2, 2, 2, 30, 60)
    u, s = m(upper, torch.zeros(2, 0, 30, 60))
    assert u.shape == upper.shape and s.shape == (2, 0, 30, 60)
    u.abs().mean().backward()
