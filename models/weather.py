"""Pangu-Weather (Bi et al. 2023, "Accurate medium-range global weather forecasting with 3D neural
networks") in one readable file: the 3D Earth-Specific Transformer at configurable size.

Fields come in normalised on a regular lat/lon grid: upper-air (B, n_upper, n_levels, n_lat, n_lon)
and surface (B, n_surface, n_lat, n_lon); the model predicts the same fields one lead time later.
The pipeline, top to bottom:

    patch embedding (3D conv upper-air, 2D conv surface = one extra level)   -> (B, Z, H, W, C)
    encoder1: depths[0] Earth-specific blocks at C
    downsample 2x2 in lat/lon, C -> 2C                                       -> (B, Z, H/2, W/2, 2C)
    encoder2, decoder2: depths[1] blocks each at 2C
    upsample, 2C -> C                                                        -> (B, Z, H, W, C)
    decoder1: depths[0] blocks at C; concat encoder1's output (skip)         -> (B, Z, H, W, 2C)
    patch recovery (transposed convs)                                        -> upper, surface

Differences from the paper, kept small on purpose: pre-norm blocks (the paper's pseudocode
post-normalises), a final LayerNorm before patch recovery, no constant land-sea/soil/topography masks,
and padded tokens are masked out of attention. `HierarchicalForecaster` chains per-lead models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .registry import register_model

__all__ = ["PanguConfig", "Pangu", "HierarchicalForecaster", "earth_position_index"]

# Additive attention mask for forbidden pairs. Finite rather than -inf so that a padded query whose
# keys are all forbidden gets a harmless uniform softmax instead of NaN (it is cropped away anyway).
MASK_VALUE = -1e4


@dataclass
class PanguConfig:
    n_upper: int = 4          # upper-air variables (e.g. z, t, u, v)
    n_levels: int = 3         # pressure levels
    n_surface: int = 4        # surface variables (e.g. t2m, msl, u10, v10)
    n_lat: int = 16
    n_lon: int = 32
    patch: tuple[int, int, int] = (1, 2, 2)   # (level, lat, lon) patch size; surface uses (lat, lon)
    embed_dim: int = 32
    depths: tuple[int, int] = (2, 2)          # blocks per stage: stage 1 at full token resolution, stage 2 after 2x down-sampling in lat/lon
    heads: tuple[int, int] = (2, 4)
    window: tuple[int, int, int] = (2, 4, 8)  # attention window in tokens (level, lat, lon)
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    # predict the increment over the input state (as GraphCast does) instead of the state itself as
    # Pangu does: a small CPU budget cannot afford to learn the identity map first
    residual: bool = True
    # the globe is a circle in longitude; a regional grid (e.g. the UK samples) is not, so its shifted
    # windows are masked at the east/west edges like latitude's
    wrap_lon: bool = True

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """Stage-1 token cube (Z, H, W): upper-air levels in patches plus one surface level (either
        part may be absent: a 2 m temperature model, or upper air only like the EDA sample)."""
        pz, ph, pw = self.patch
        levels = math.ceil(self.n_levels / pz) if self.n_upper else 0
        return (levels + (1 if self.n_surface else 0), math.ceil(self.n_lat / ph), math.ceil(self.n_lon / pw))

    @property
    def token_grid2(self) -> tuple[int, int, int]:
        """Stage-2 token cube after the 2x2 lat/lon merge (odd sizes are padded first)."""
        z, h, w = self.token_grid
        return (z, math.ceil(h / 2), math.ceil(w / 2))


# ---------------------------------------------------------------------------------------------------
# windows

def window_partition(x: Tensor, window: tuple[int, int, int]) -> Tensor:
    """(B, Z, H, W, C) -> (B, nWz*nWh, nWw, N, C). Windows are grouped by their (level, lat) row first
    because that row selects the Earth-specific bias, while windows along longitude share it."""
    B, Z, H, W, C = x.shape
    wz, wh, ww = window
    x = x.view(B, Z // wz, wz, H // wh, wh, W // ww, ww, C)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)                  # (B, nWz, nWh, nWw, wz, wh, ww, C)
    return x.reshape(B, (Z // wz) * (H // wh), W // ww, wz * wh * ww, C)


def window_reverse(x: Tensor, window: tuple[int, int, int], grid: tuple[int, int, int]) -> Tensor:
    """Inverse of `window_partition`: (B, nWz*nWh, nWw, N, C) -> (B, Z, H, W, C)."""
    B, C = x.shape[0], x.shape[-1]
    (wz, wh, ww), (Z, H, W) = window, grid
    x = x.view(B, Z // wz, H // wh, W // ww, wz, wh, ww, C)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)                  # (B, nWz, wz, nWh, wh, nWw, ww, C)
    return x.reshape(B, Z, H, W, C)


def earth_position_index(window: tuple[int, int, int]) -> Tensor:
    """(N, N) index into the bias table's pair axis for every token pair (i, j) of one window.

    Level and latitude enter with *absolute* positions of both tokens (the atmosphere is not
    translation-invariant vertically or from equator to pole); longitude enters as the *relative*
    offset (the physics is the same all around a latitude circle). Hence wz*wz*wh*wh*(2*ww-1) entries.
    """
    wz, wh, ww = window
    z, h, w = torch.meshgrid(torch.arange(wz), torch.arange(wh), torch.arange(ww), indexing="ij")
    z, h, w = z.flatten(), h.flatten(), w.flatten()        # (N,) each
    dw = w[:, None] - w[None, :] + ww - 1                  # (N, N) relative lon in [0, 2ww-2]
    return (((z[:, None] * wz + z[None, :]) * wh + h[:, None]) * wh + h[None, :]) * (2 * ww - 1) + dw


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the survivors."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


# ---------------------------------------------------------------------------------------------------
# blocks

class EarthAttention3D(nn.Module):
    """Multi-head self-attention inside 3D windows plus the Earth-specific positional bias.

    The bias table has one slice per window *type* = the window's (level, lat) row, so a window over the
    tropics and one over the poles learn different biases; windows along longitude share a type.
    """

    def __init__(self, dim: int, heads: int, window: tuple[int, int, int], n_types: int) -> None:
        super().__init__()
        wz, wh, ww = window
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros(n_types, wz * wz * wh * wh * (2 * ww - 1), heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        # derived from the window alone, so not saved in the state dict
        self.register_buffer("bias_index", earth_position_index(window), persistent=False)  # (N, N)

    def earth_bias(self) -> Tensor:
        """(n_types, heads, N, N) bias for every window type and token pair."""
        return self.bias_table[:, self.bias_index].permute(0, 3, 1, 2)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        # x: (B, T, nWw, N, C) with T = window types; mask: (T, nWw, N, N) additive, or None
        B, T, nWw, N, C = x.shape
        qkv = self.qkv(x).view(B, T, nWw, N, 3, self.heads, C // self.heads)
        # windows and heads share SDPA's head axis, so one bias tensor serves the whole batch (4D inputs
        # with a batch-broadcast mask let fused attention kernels run on GPU)
        q, k, v = (t.flatten(1, 3) for t in qkv.permute(4, 0, 1, 2, 5, 3, 6))  # (B, T*nWw*heads, N, hd)
        bias = self.earth_bias()[:, None]                  # (T, 1, heads, N, N), shared along lon
        bias = bias + mask[:, :, None] if mask is not None else bias.expand(T, nWw, -1, N, N)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(1, -1, N, N).to(q.dtype))
        y = y.view(B, T, nWw, self.heads, N, -1).transpose(3, 4).reshape(B, T, nWw, N, C)
        return self.proj(y)


class EarthSpecificBlock(nn.Module):
    """Pre-norm transformer block on (B, Z, H, W, C) with (shifted) 3D window attention.

    `grid` is the stage's token cube. Where it is no larger than the window in a dimension, the window
    shrinks to the grid and that dimension is not shifted (one window already sees everything).
    """

    def __init__(self, dim: int, heads: int, grid: tuple[int, int, int], window: tuple[int, int, int],
                 shifted: bool, mlp_ratio: float = 4.0, drop_path: float = 0.0, wrap_lon: bool = True) -> None:
        super().__init__()
        self.grid, self.wrap_lon = grid, wrap_lon
        self.window = tuple(min(w, g) for w, g in zip(window, grid))
        self.shift = tuple(w // 2 if shifted and g > w else 0 for w, g in zip(self.window, grid))
        self.padded = tuple(math.ceil(g / w) * w for g, w in zip(grid, self.window))
        n_types = (self.padded[0] // self.window[0]) * (self.padded[1] // self.window[1])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EarthAttention3D(dim, heads, self.window, n_types)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_prob = drop_path
        region = self._region_ids()                        # (T, nWw, N)
        self.masked = bool((region != 0).any())            # plain windows on an unpadded grid: no mask
        self.register_buffer("region_ids", region, persistent=False)

    def _region_ids(self) -> Tensor:
        """Per token of each window, an id such that two tokens may attend iff their ids are equal and
        the key's id is not -1 (padding). Ids are in the rolled frame the attention sees."""
        (Z, H, W), (Zp, Hp, Wp) = self.grid, self.padded
        # coordinate in the padded grid before the roll, not yet wrapped: >= size means "came round"
        z, h, w = torch.meshgrid(*(torch.arange(p) + s for p, s in zip(self.padded, self.shift)),
                                 indexing="ij")           # (Zp, Hp, Wp) each
        # Level and latitude have ends: tokens that wrapped there were not neighbours, so they get a
        # region of their own. Longitude is a circle on the globe, so its wrap-around stays unmasked
        # unless the grid is regional.
        region = (z >= Zp).long() * 4 + (h >= Hp).long() * 2
        if not self.wrap_lon:
            region = region + (w >= Wp).long()
        pad = (z % Zp >= Z) | (h % Hp >= H) | (w % Wp >= W)
        ids = region.masked_fill(pad, -1)                  # (Zp, Hp, Wp)
        return window_partition(ids[None, ..., None], self.window)[0, ..., 0]

    def attn_mask(self) -> Tensor:
        """(T, nWw, N, N) additive mask: 0 where query i may attend key j, MASK_VALUE otherwise."""
        ids = self.region_ids
        forbidden = (ids[..., :, None] != ids[..., None, :]) | (ids[..., None, :] < 0)
        return torch.zeros_like(forbidden, dtype=torch.float).masked_fill(forbidden, MASK_VALUE)

    def forward(self, x: Tensor) -> Tensor:
        B, Z, H, W, C = x.shape                            # (B, Z, H, W, C)
        shortcut = x
        x = self.norm1(x)
        (Zp, Hp, Wp), (sz, sh, sw) = self.padded, self.shift
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H, 0, Zp - Z))   # (B, Zp, Hp, Wp, C)
        x = torch.roll(x, shifts=(-sz, -sh, -sw), dims=(1, 2, 3))
        mask = self.attn_mask().to(x.dtype) if self.masked else None
        x = self.attn(window_partition(x, self.window), mask)     # (B, T, nWw, N, C)
        x = window_reverse(x, self.window, self.padded)            # (B, Zp, Hp, Wp, C)
        x = torch.roll(x, shifts=(sz, sh, sw), dims=(1, 2, 3))[:, :Z, :H, :W]
        x = shortcut + drop_path(x, self.drop_prob, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_prob, self.training)


class EarthSpecificLayer(nn.Module):
    """A stage: `depth` blocks alternating plain and shifted windows. (B, Z, H, W, C) in and out."""

    def __init__(self, depth: int, dim: int, heads: int, grid: tuple[int, int, int],
                 window: tuple[int, int, int], mlp_ratio: float, drop_paths: list[float],
                 wrap_lon: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            EarthSpecificBlock(dim, heads, grid, window, shifted=i % 2 == 1, mlp_ratio=mlp_ratio,
                               drop_path=drop_paths[i], wrap_lon=wrap_lon) for i in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PatchEmbed(nn.Module):
    """Upper-air 3D conv and surface 2D conv to C channels; the surface becomes level 0 of the cube."""

    def __init__(self, c: PanguConfig) -> None:
        super().__init__()
        self.config = c
        # surface-only data (n_upper = 0, e.g. a 2 m temperature model) has a one-level token cube;
        # upper-air-only data (n_surface = 0) has no surface level
        self.upper = nn.Conv3d(c.n_upper, c.embed_dim, kernel_size=c.patch, stride=c.patch) if c.n_upper else None
        self.surface = (nn.Conv2d(c.n_surface, c.embed_dim, kernel_size=c.patch[1:], stride=c.patch[1:])
                        if c.n_surface else None)

    def forward(self, upper: Tensor, surface: Tensor) -> Tensor:
        c = self.config
        (Z, H, W), (pz, ph, pw) = c.token_grid, c.patch
        lat_lon_pad = (0, W * pw - c.n_lon, 0, H * ph - c.n_lat)       # pad at the end, with zeros
        levels = []
        if self.surface is not None:
            levels.append(self.surface(F.pad(surface, lat_lon_pad))[:, :, None])      # (B, C, 1, H, W)
        if self.upper is not None:
            n_upper_levels = Z - len(levels)
            levels.append(self.upper(F.pad(upper, lat_lon_pad + (0, n_upper_levels * pz - c.n_levels))))
        return torch.cat(levels, dim=2).permute(0, 2, 3, 4, 1)                        # (B, Z, H, W, C)


class PatchRecovery(nn.Module):
    """Transposed convs from the token cube back to the fields, cropping the padding."""

    def __init__(self, c: PanguConfig, dim: int) -> None:
        super().__init__()
        self.config = c
        self.upper = nn.ConvTranspose3d(dim, c.n_upper, kernel_size=c.patch, stride=c.patch) if c.n_upper else None
        self.surface = (nn.ConvTranspose2d(dim, c.n_surface, kernel_size=c.patch[1:], stride=c.patch[1:])
                        if c.n_surface else None)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        x = x.permute(0, 4, 1, 2, 3)                       # (B, 2C, Z, H, W)
        B = x.shape[0]
        if self.surface is None:
            surface, first_upper = x.new_zeros(B, 0, c.n_lat, c.n_lon), 0
        else:
            surface, first_upper = self.surface(x[:, :, 0])[:, :, :c.n_lat, :c.n_lon], 1   # (B, n_surface, H, W)
        if self.upper is None:
            return x.new_zeros(B, 0, 0, c.n_lat, c.n_lon), surface
        upper = self.upper(x[:, :, first_upper:])          # (B, n_upper, levels*pz, H*ph, W*pw)
        return upper[:, :, :c.n_levels, :c.n_lat, :c.n_lon], surface


class DownSample(nn.Module):
    """Merge 2x2 tokens in lat/lon (padding odd sizes): (B, Z, H, W, C) -> (B, Z, H/2, W/2, 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.linear = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, Z, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        H2, W2 = x.shape[2] // 2, x.shape[3] // 2
        x = x.view(B, Z, H2, 2, W2, 2, C).permute(0, 1, 2, 4, 3, 5, 6)   # (B, Z, H2, W2, 2, 2, C)
        return self.linear(self.norm(x.reshape(B, Z, H2, W2, 4 * C)))


class UpSample(nn.Module):
    """Split each token into 2x2 and crop back to the stage-1 grid: (B, Z, H2, W2, 2C) -> (B, Z, H, W, C)."""

    def __init__(self, dim_in: int, dim_out: int, out_hw: tuple[int, int]) -> None:
        super().__init__()
        self.out_hw = out_hw
        self.linear1 = nn.Linear(dim_in, 4 * dim_out, bias=False)
        self.norm = nn.LayerNorm(dim_out)
        self.linear2 = nn.Linear(dim_out, dim_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, Z, H2, W2, _ = x.shape
        x = self.linear1(x).view(B, Z, H2, W2, 2, 2, -1)
        x = x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, Z, 2 * H2, 2 * W2, -1)   # (B, Z, 2H2, 2W2, C)
        H, W = self.out_hw
        return self.linear2(self.norm(x[:, :, :H, :W]))


# ---------------------------------------------------------------------------------------------------
# the model

class Pangu(nn.Module):
    """Pangu-Weather's 3D Earth-Specific Transformer.

    Useful KD taps (module paths for forward hooks; every one outputs a single tensor):
      "patch_embed"  (B, Z, H, W, C)        token cube before any attention
      "encoder1"     (B, Z, H, W, C)        stage-1 encoder output (also the skip connection)
      "encoder2"     (B, Z, H/2, W/2, 2C)   bottleneck after the encoder
      "decoder2"     (B, Z, H/2, W/2, 2C)   bottleneck after the first decoder stage
      "decoder1"     (B, Z, H, W, C)        stage-1 decoder output, before the skip concat
    with (Z, H, W) = config.token_grid; H/2 and W/2 round up. C differs between teacher and student,
    so feature losses need an adapter.
    """

    def __init__(self, config: PanguConfig) -> None:
        super().__init__()
        self.config = c = config
        C, (d1, d2), (h1, h2) = c.embed_dim, c.depths, c.heads
        grid1, grid2 = c.token_grid, c.token_grid2
        dp = torch.linspace(0, c.drop_path, d1 + d2).tolist()   # deeper blocks drop more, as in Pangu
        self.patch_embed = PatchEmbed(c)
        self.encoder1 = EarthSpecificLayer(d1, C, h1, grid1, c.window, c.mlp_ratio, dp[:d1], c.wrap_lon)
        self.downsample = DownSample(C)
        self.encoder2 = EarthSpecificLayer(d2, 2 * C, h2, grid2, c.window, c.mlp_ratio, dp[d1:], c.wrap_lon)
        self.decoder2 = EarthSpecificLayer(d2, 2 * C, h2, grid2, c.window, c.mlp_ratio, dp[d1:], c.wrap_lon)
        self.upsample = UpSample(2 * C, C, grid1[1:])
        self.decoder1 = EarthSpecificLayer(d1, C, h1, grid1, c.window, c.mlp_ratio, dp[:d1], c.wrap_lon)
        # pre-norm blocks leave the residual stream un-normalised; normalise it once before the output
        self.norm = nn.LayerNorm(2 * C)
        self.patch_recovery = PatchRecovery(c, 2 * C)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def get_num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, upper: Tensor, surface: Tensor) -> tuple[Tensor, Tensor]:
        # upper: (B, n_upper, n_levels, n_lat, n_lon); surface: (B, n_surface, n_lat, n_lon)
        x = self.patch_embed(upper, surface)               # (B, Z, H, W, C)
        skip = x = self.encoder1(x)
        x = self.downsample(x)                             # (B, Z, H2, W2, 2C)
        x = self.decoder2(self.encoder2(x))
        x = self.upsample(x)                               # (B, Z, H, W, C)
        x = self.decoder1(x)
        x = self.norm(torch.cat([skip, x], dim=-1))        # (B, Z, H, W, 2C), Pangu's skip
        out_upper, out_surface = self.patch_recovery(x)
        if self.config.residual:
            return upper + out_upper, surface + out_surface
        return out_upper, out_surface


class HierarchicalForecaster(nn.Module):
    """Pangu's hierarchical temporal aggregation: models per lead time (hours), composed greedily
    with the fewest steps: always take the longest lead model that fits the remaining lead.

    Fewer autoregressive steps mean less accumulated error. Greedy is the fewest steps for lead sets
    like Pangu's {1, 3, 6, 24}, where each lead divides the next; a lead the greedy walk cannot reach
    exactly is an error.
    """

    def __init__(self, models: dict[int, nn.Module]) -> None:
        super().__init__()
        if not models or any(int(k) != k or k <= 0 for k in models):
            raise ValueError(f"lead times must be positive integers, got {sorted(models)}")
        self.leads = sorted((int(k) for k in models), reverse=True)
        self.models = nn.ModuleDict({str(k): models[k] for k in self.leads})

    def plan(self, lead: int) -> list[int]:
        if lead <= 0:
            raise ValueError(f"lead must be positive, got {lead}")
        steps, left = [], lead
        while left > 0:
            step = next((k for k in self.leads if k <= left), None)
            if step is None:
                raise ValueError(f"lead {lead} h is not reachable with models for {self.leads[::-1]} h "
                                 f"({left} h left after {steps})")
            steps.append(step)
            left -= step
        return steps

    def forward(self, upper: Tensor, surface: Tensor, lead: int) -> tuple[Tensor, Tensor]:
        for step in self.plan(lead):
            upper, surface = self.models[str(step)](upper, surface)
        return upper, surface


# ---------------------------------------------------------------------------------------------------
# entrypoints

PANGU_TINY = dict(embed_dim=16, depths=(2, 2), heads=(1, 2))  # same shape as the teacher, half the width
PANGU_FULL = dict(n_upper=5, n_levels=13, n_surface=4, n_lat=721, n_lon=1440, patch=(2, 4, 4),
                  embed_dim=192, depths=(2, 6), heads=(6, 12), window=(2, 6, 12))


@register_model
def pangu_lite(**kwargs) -> Pangu:
    """Teacher: 16x32 grid, 3 levels, C=32; trains in minutes on a CPU."""
    return Pangu(PanguConfig(**kwargs))


@register_model
def pangu_tiny(**kwargs) -> Pangu:
    """Student: C=16, the teacher's depths (so shifted windows too), a third of its parameters."""
    return Pangu(PanguConfig(**dict(PANGU_TINY, **kwargs)))


@register_model
def pangu_full(**kwargs) -> Pangu:
    """The paper's size on 0.25-degree ERA5 (721x1440, 13 levels); a GPU model."""
    return Pangu(PanguConfig(**dict(PANGU_FULL, **kwargs)))
