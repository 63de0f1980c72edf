"""Weakly supervised temporal action localization (WTAL) on precomputed snippet features.

A video is a sequence of snippet features from two frozen extractors: `cbp`, a classification-
pretrained video CNN, and `vlp`, a vision-language image encoder whose space the class prompts share
(tasks/kinds/localization/schema.py). Training sees video-level labels only; a localizer emits, per
snippet, a class activation sequence (CAS) and a class-agnostic foreground attention, from which the
kind's metrics cut scored segments.

    wtal_mil_cbp   MIL localizer on CBP features: temporal-conv embedding -> CAS + attention
                   (BaS-Net, Lee et al. 2020; CO2-Net, Hong et al. 2021), top-k pooling to video scores
    wtal_mil_vlp   the same on VLP features with a text-prompt classifier: snippet embeddings projected
                   into the prompt space, cosine logits against the fixed class text embeddings with a
                   learned scale and bias (CLIP, Radford et al. 2021; the bias as SigLIP, Zhai et al. 2023)
    wtal_dual      both branches side by side, fused at inference by averaging their probabilities

Outputs are a dict, per branch b present: `b_cas` (B, T, C) logits, `b_attn` (B, T) foreground
probability, `b_video` (B, C) video-level logits; and the model's own localization under `cas`,
`attn`, `video` (the fused one for `wtal_dual`, the branch itself for a single-branch model).

Loss terms (models.distill's registry): `mil`, the video-level multi-label loss on every branch
present, and `wtal_bf`, the dual-branch background/foreground distillation of Zhou et al. 2023
("Distilling Vision-Language Pre-training to Collaborate with Weakly-Supervised Temporal Action
Localization", CVPR), adapted to a frozen teacher (see `AlternatingBFDistillation`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distill import Outputs, register_loss
from .registry import register_model

__all__ = ["WTALConfig", "MILBranch", "PromptMILBranch", "WTALLocalizer"]

BRANCHES = ("cbp", "vlp")  # the feature keys a localizer may read, in a fixed order
EPS = 1e-6


@dataclass
class WTALConfig:
    num_classes: int = 6
    cbp_dim: int = 64
    vlp_dim: int = 384             # all-MiniLM-L6-v2's width: the prompt space (schema.py)
    branches: tuple[str, ...] = BRANCHES
    hidden: int = 64
    kernel: int = 3                # temporal extent of the embedding and attention convs, in snippets
    dropout: float = 0.3
    k_ratio: int = 8               # top-k pooling takes k = max(1, valid snippets // k_ratio)
    init_scale: float = 10.0       # prompt classifier: cosine logits times a learned scale ...
    init_bias: float = -5.0        # ... plus a learned bias, so absent classes start below p = 0.5


def topk_mean(x: torch.Tensor, mask: torch.Tensor, k_ratio: int) -> torch.Tensor:
    """Mean of the k largest valid values over time: (B, T, C) -> (B, C), k per video."""
    k = (mask.sum(1) // k_ratio).clamp_min(1)                              # (B,)
    top = x.masked_fill(~mask[..., None], float("-inf")).sort(dim=1, descending=True).values
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < k[:, None]  # (B, T)
    return top.masked_fill(~keep[..., None], 0.0).sum(1) / k[:, None].to(x.dtype)


class MILBranch(nn.Module):
    """Temporal conv embedding, then a 1×1 conv classifier (the CAS) and a small attention head."""

    def __init__(self, in_dim: int, config: WTALConfig) -> None:
        super().__init__()
        h = config.hidden
        # per-snippet normalisation: extractors differ in scale by orders of magnitude (a 3D CNN's
        # post-ReLU features ~1-10, a CLIP embedding of unit norm), and raw large inputs saturate
        # the attention at 0 before anything is learned
        self.norm = nn.LayerNorm(in_dim)
        self.embed = nn.Sequential(nn.Conv1d(in_dim, h, config.kernel, padding=config.kernel // 2), nn.ReLU(),
                                   nn.Dropout(config.dropout))
        self.attention = nn.Sequential(nn.Conv1d(h, h, config.kernel, padding=config.kernel // 2), nn.ReLU(),
                                       nn.Conv1d(h, 1, 1))
        self.classifier = nn.Conv1d(h, config.num_classes, 1)

    def classify(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(h).transpose(1, 2)                         # (B, T, C)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # zero past the end, as the convs' own padding: a video's outputs ignore its padding
        z = self.norm(x) * mask[..., None]
        h = self.embed(z.transpose(1, 2)) * mask[:, None, :]              # (B, H, T)
        attn = torch.sigmoid(self.attention(h)).squeeze(1) * mask         # (B, T)
        return self.classify(h, x), attn


class PromptMILBranch(MILBranch):
    """A MIL branch whose classifier weights are the class prompts' text embeddings (a fixed buffer):
    snippets are projected into the prompt space, residually on top of the raw feature when the
    feature already lives there (a CLIP image embedding), and scored by scaled cosine similarity."""

    def __init__(self, in_dim: int, config: WTALConfig, text_embeddings: torch.Tensor) -> None:
        super().__init__(in_dim, config)
        del self.classifier
        text_dim = text_embeddings.shape[1]
        self.residual = in_dim == text_dim
        self.project = nn.Conv1d(config.hidden, text_dim, 1)
        if self.residual:  # start from the zero-shot classifier
            nn.init.zeros_(self.project.weight)
            nn.init.zeros_(self.project.bias)
        self.register_buffer("text", F.normalize(text_embeddings.float(), dim=-1))  # (C, E)
        self.log_scale = nn.Parameter(torch.tensor(math.log(config.init_scale)))
        self.bias = nn.Parameter(torch.tensor(config.init_bias))

    def classify(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z = self.project(h).transpose(1, 2)                                # (B, T, E)
        if self.residual:
            z = z + x
        cos = F.normalize(z, dim=-1) @ self.text.T                         # (B, T, C)
        return self.log_scale.clamp(max=math.log(100.0)).exp() * cos + self.bias


class WTALLocalizer(nn.Module):
    """One MIL branch per feature key in `config.branches`; with two, the model's own localization is
    the mean of their probabilities (CAS and attention), returned as logits like a branch's."""

    def __init__(self, config: WTALConfig, text_embeddings: torch.Tensor | None = None) -> None:
        super().__init__()
        unknown = set(config.branches) - set(BRANCHES)
        if unknown or not config.branches:
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {config.branches}")
        self.config = config
        self.branches = nn.ModuleDict()
        for b in BRANCHES:
            if b not in config.branches:
                continue
            if b == "cbp":
                self.branches[b] = MILBranch(config.cbp_dim, config)
            else:
                if text_embeddings is None:  # a bare build (registry checks): fixed random prompts
                    g = torch.Generator().manual_seed(0)
                    text_embeddings = torch.randn(config.num_classes, config.vlp_dim, generator=g)
                text = torch.as_tensor(text_embeddings, dtype=torch.float32)
                assert text.shape[0] == config.num_classes, \
                    f"{text.shape[0]} prompts for {config.num_classes} classes"
                self.branches[b] = PromptMILBranch(config.vlp_dim, config, text)

    def forward(self, inputs: dict[str, torch.Tensor]) -> Outputs:
        """`inputs`: the feature keys of the branches, (B, T, D) each, and an optional `mask` (B, T)."""
        first = inputs[next(iter(self.branches))]
        mask = inputs.get("mask")
        if mask is None:
            mask = torch.ones(first.shape[:2], dtype=torch.bool, device=first.device)
        mask = mask.bool()
        out: Outputs = {}
        for b, branch in self.branches.items():
            cas, attn = branch(inputs[b], mask)
            out.update({f"{b}_cas": cas, f"{b}_attn": attn,
                        f"{b}_video": topk_mean(cas, mask, self.config.k_ratio)})
        names = list(self.branches)
        if len(names) == 1:
            for key in ("cas", "attn", "video"):
                out[key] = out[f"{names[0]}_{key}"]
            return out
        prob = lambda key: torch.stack([torch.sigmoid(out[f"{b}_{key}"]) for b in names]).mean(0)
        out["cas"] = torch.logit(prob("cas"), eps=EPS)
        out["video"] = torch.logit(prob("video"), eps=EPS)
        out["attn"] = torch.stack([out[f"{b}_attn"] for b in names]).mean(0)
        return out


def _create(branches: tuple[str, ...], text_embeddings: torch.Tensor | None, **kwargs) -> WTALLocalizer:
    return WTALLocalizer(WTALConfig(branches=branches, **kwargs), text_embeddings)


@register_model
def wtal_mil_cbp(text_embeddings: torch.Tensor | None = None, **kwargs) -> WTALLocalizer:
    """MIL localizer on CBP features (the prompts, when given, are not used)."""
    return _create(("cbp",), None, **kwargs)


@register_model
def wtal_mil_vlp(text_embeddings: torch.Tensor | None = None, **kwargs) -> WTALLocalizer:
    """MIL localizer on VLP features with the text-prompt classifier."""
    return _create(("vlp",), text_embeddings, **kwargs)


@register_model
def wtal_dual(text_embeddings: torch.Tensor | None = None, **kwargs) -> WTALLocalizer:
    """A CBP and a VLP branch, fused at inference."""
    return _create(BRANCHES, text_embeddings, **kwargs)


# ---------------------------------------------------------------------------------------------------
# loss terms

def present_branches(outputs: Outputs) -> list[str]:
    return [b for b in BRANCHES if f"{b}_cas" in outputs]


def attention_pool(cas: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted temporal mean of the CAS logits: (B, T, C), (B, T) -> (B, C)."""
    return (cas * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp_min(EPS)


def masked_bce(prob: torch.Tensor, target: float, where: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of probabilities against a constant target over `where`; 0 when
    `where` is empty. Computed in float32 from clamped logs: `F.binary_cross_entropy` refuses autocast."""
    p = prob.float().clamp(EPS, 1 - EPS)
    bce = -(target * torch.log(p) + (1 - target) * torch.log1p(-p))
    w = where.float()
    return (bce * w).sum() / w.sum().clamp_min(1.0)


@register_loss("mil")
class MILLoss(nn.Module):
    """Video-level multi-label loss, summed over the branches present (so each branch of a dual model
    trains exactly as the single-branch model would). Per branch, binary cross-entropy of

      top-k pooled CAS logits (`b_video`)                  against the labels   (MIL)
      attention-weighted foreground pooling of the CAS      against the labels
      (1 - attention)-weighted background pooling           against all zeros

    the last two as BaS-Net's foreground/background split, with a background that holds no class;
    plus `guide_weight` × the mean |attention - the CAS's foreground| (the guide loss of ACM-Net, Qu et
    al. 2021, with the most probable labelled class standing in for 1 - background): without it the
    weighted pooling lets the attention collapse onto the few most discriminative snippets; and
    `sparsity` × the mean attention (STPN's L1), off by default.
    """
    needs_teacher = False

    def __init__(self, topk_weight: float = 1.0, fg_weight: float = 1.0, bg_weight: float = 1.0,
                 guide_weight: float = 1.0, sparsity: float = 0.0) -> None:
        super().__init__()
        self.topk_weight, self.fg_weight, self.bg_weight = topk_weight, fg_weight, bg_weight
        self.guide_weight, self.sparsity = guide_weight, sparsity

    def forward(self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor) -> torch.Tensor:
        branches = present_branches(student)
        if not branches:
            wanted = ", ".join(f"{b}_cas" for b in BRANCHES)
            raise KeyError(f"mil: no branch outputs ({wanted}) in {sorted(student)}")
        mask = student["mask"].float()
        y = targets.float()
        bce = F.binary_cross_entropy_with_logits
        total = torch.zeros((), device=y.device)
        for b in branches:
            cas, attn = student[f"{b}_cas"].float(), student[f"{b}_attn"].float() * mask
            total = total + self.topk_weight * bce(student[f"{b}_video"].float(), y)
            total = total + self.fg_weight * bce(attention_pool(cas, attn), y)
            total = total + self.bg_weight * bce(attention_pool(cas, (1 - attn) * mask), torch.zeros_like(y))
            if self.guide_weight:
                labelled = torch.sigmoid(cas.detach()).masked_fill(y[:, None, :] == 0, 0.0).amax(-1)  # (B, T)
                guide = ((attn - labelled).abs() * mask).sum() / mask.sum().clamp_min(1.0)
                total = total + self.guide_weight * guide
            if self.sparsity:
                total = total + self.sparsity * attn.sum() / mask.sum().clamp_min(1.0)
        return total


@register_loss("wtal_bf")
class AlternatingBFDistillation(nn.Module):
    """The paper's dual-branch alternate training as pseudo-label distillation from a frozen teacher.

    B step: snippets where the teacher's CBP attention is below `bg_threshold` are confident
    background; the student's VLP attention is pushed to 0 there (VLP over-completes, CBP is trusted
    on background). F step: snippets where the teacher's VLP attention is above `fg_threshold` are
    confident foreground; the student's CBP attention is pushed to 1 there (CBP is incomplete, VLP is
    trusted on foreground). The steps alternate per optimizer step, B first. The step counter is a
    buffer, so a resumed checkpoint continues the alternation; it advances only under autograd (the
    train loop calls the criterion once under no_grad before it builds the optimizer).

    Deviation from the paper: there, the pseudo-labels of one branch come from the *other branch of
    the same model* while both train alternately (collaborative co-training); here they come from a
    separately trained, frozen teacher `wtal_dual` (its two branches trained on labels alone), which
    is what the platform's teacher -> student recipe provides. The student's own `mil` term keeps
    training both branches on the labels.
    """
    needs_teacher = True

    def __init__(self, bg_threshold: float = 0.2, fg_threshold: float = 0.8, b_weight: float = 1.0,
                 f_weight: float = 1.0) -> None:
        super().__init__()
        if not 0 < bg_threshold < 1 or not 0 < fg_threshold < 1:
            raise ValueError(f"thresholds must be in (0, 1), got bg {bg_threshold}, fg {fg_threshold}")
        self.bg_threshold, self.fg_threshold = bg_threshold, fg_threshold
        self.b_weight, self.f_weight = b_weight, f_weight
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> torch.Tensor:
        for side, outputs in (("student", student), ("teacher", teacher)):
            missing = [f"{b}_attn" for b in BRANCHES if f"{b}_attn" not in outputs]
            if missing:
                raise KeyError(f"wtal_bf needs a dual-branch {side}: {missing} missing")
        mask = student["mask"].bool()
        b_step = int(self.step) % 2 == 0
        if torch.is_grad_enabled():
            self.step += 1
        if b_step:
            background = (teacher["cbp_attn"].detach() < self.bg_threshold) & mask
            return self.b_weight * masked_bce(student["vlp_attn"], 0.0, background)
        foreground = (teacher["vlp_attn"].detach() > self.fg_threshold) & mask
        return self.f_weight * masked_bce(student["cbp_attn"], 1.0, foreground)
