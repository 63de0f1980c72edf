"""The localization kind: weakly supervised temporal action localization on snippet features.

Data: a features directory of the `video_features` stage (schema.py), padded per split. A role
trains one model (unit None) on video-level labels and is evaluated as it is: its snippet outputs on
the test split are cut into scored segments and scored by THUMOS-protocol detection mAP at tIoU
0.1:0.1:0.7 (metrics.py). A dual-branch model is scored on its fused output and on each branch alone
(`cbp_*`, `vlp_*`), with the segment-length observation (`mean_pred_len`, `mean_gt_len`, `len_ratio`)
for each: how incomplete (CBP) or over-complete (VLP) a branch localizes. No non-learned baselines.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

import models.localization  # noqa: F401  (registers its models and the `mil` / `wtal_bf` loss terms)
from models import create_model
from models.localization import BRANCHES

from .. import Unit, register_kind
from ..base import BatchedDataset
from .metrics import Detections, detection_metrics, ground_truth, localize, metric_names
from .schema import LocalizationData, Videos, load_localization

Predict = Callable[[Videos], dict[str, np.ndarray]]
OUTPUT_KEYS = ("cas", "attn", "video")


class VideoSet(BatchedDataset):
    """({"cbp", "vlp", "mask"}[index], labels[index], index) for a batch of indices."""

    def __init__(self, videos: Videos) -> None:
        self.inputs = {k: torch.from_numpy(v) for k, v in videos.features.items()}
        self.inputs["mask"] = torch.from_numpy(videos.mask)
        self.labels = torch.from_numpy(videos.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(index)
        return {k: v[index] for k, v in self.inputs.items()}, self.labels[index], index


@torch.no_grad()
def snippet_outputs(model: nn.Module, videos: Videos, device: torch.device,
                    batch_size: int = 256) -> dict[str, np.ndarray]:
    """Probabilities per output of the model on a split: `<o>cas` (N, T, C), `<o>attn` (N, T),
    `<o>video` (N, C) for the model's own output (o = "") and each branch (o = "cbp_", "vlp_")."""
    model.eval()
    data = VideoSet(videos)
    parts: list[dict[str, np.ndarray]] = []
    for index in torch.arange(len(data)).split(batch_size):
        inputs, _, _ = data.__getitems__(index)
        out = model({k: v.to(device) for k, v in inputs.items()})
        prob = {k: v if k.endswith("attn") else torch.sigmoid(v) for k, v in out.items()}
        parts.append({k: v.float().cpu().numpy() for k, v in prob.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def output_prefixes(outputs: dict[str, np.ndarray]) -> list[str]:
    """The model's own output, and each branch when there are several."""
    branches = [f"{b}_" for b in BRANCHES if f"{b}_cas" in outputs]
    return [""] + (branches if len(branches) > 1 else [])


def detections(outputs: dict[str, np.ndarray], videos: Videos, prefix: str = "") -> Detections:
    return localize(outputs[f"{prefix}cas"], outputs[f"{prefix}attn"], outputs[f"{prefix}video"], videos.mask,
                    videos.times)


def ap_table_figure(plt: Any, evaluations: list[dict[str, Any]], roles: list[str],
                    shown: list[tuple[str, str]]) -> Any:
    """Roles × classes: AP (mean over tIoU 0.1:0.7 and seeds)."""
    table = np.array([[np.mean([e["metrics"][k] for e in evaluations if e["role"] == r and k in e["metrics"]]
                               or [np.nan]) for k, _ in shown] for r in roles])
    fig, ax = plt.subplots(figsize=(1.2 * len(shown) + 2.5, 0.5 * len(roles) + 1.6))
    ax.imshow(table, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(shown)), [n for _, n in shown], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(roles)), roles, fontsize=8)
    for (i, j), v in np.ndenumerate(table):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k")
    ax.set_title("AP per class (mean over seeds and tIoU 0.1:0.7)", fontsize=9)
    fig.tight_layout()
    return fig


def timelines_figure(plt: Any, data: LocalizationData, teacher: nn.Module, shown_videos: list[int]) -> Any:
    """Per video, its first class: the ground truth and each output's class probability × attention."""
    test = data.splits["test"]
    outputs = snippet_outputs(teacher, test, torch.device("cpu"))
    prefixes = output_prefixes(outputs)
    fig, axes = plt.subplots(len(shown_videos), 1, figsize=(9, 1.9 * len(shown_videos)), squeeze=False)
    for ax, i in zip(axes[:, 0], shown_videos):
        valid, c = test.mask[i], int(test.labels[i].argmax())
        t = test.times[i, valid].mean(1)
        for _, row in test.segments[(test.segments["video_id"] == test.video_ids[i])
                                    & (test.segments["class_id"] == c)].iterrows():
            ax.axvspan(row.t_start, row.t_end, color="0.85")
        for prefix in prefixes:
            score = outputs[f"{prefix}cas"][i, valid, c] * outputs[f"{prefix}attn"][i, valid]
            ax.plot(t, score, label=(prefix.rstrip("_") or "fused") if len(prefixes) > 1 else "teacher")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{test.video_ids[i]}: {data.class_names[c]} (grey: ground truth)", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("time (s); class probability × foreground attention")
    fig.tight_layout()
    return fig


class Localization:
    cadence = "nightly"  # of its deployments' schedules (flows/deploy.py)
    name = "localization"
    labels_loss = {"mil": {"weight": 1.0}}
    cache_batch = None  # the whole training split in one teacher pass
    val_key = "val_mAP"
    val_higher_is_better = True
    composes = False  # a role's one trained model is the model it is evaluated as

    def load(self, data_dir: str, validate: bool = False) -> LocalizationData:
        return load_localization(data_dir, validate=validate)

    def units(self, spec: Any, role: str) -> list[Unit]:
        return [None]

    def compositions(self, spec: Any) -> list[tuple[str, str, tuple[Unit, ...]]]:
        return []

    def train_set(self, data: LocalizationData, unit: Unit) -> VideoSet:
        return VideoSet(data.splits["train"])

    def model_kwargs(self, data: LocalizationData, tp: Any) -> dict[str, Any]:
        """Shapes and prompts from the data, sizes from params (`methods.<m>.<teacher|student>.model`)."""
        dims = data.dims()
        return dict(num_classes=data.num_classes, cbp_dim=dims["cbp"], vlp_dim=dims["vlp"],
                    text_embeddings=torch.tensor(data.text_embeddings), **tp.model)

    def build(self, spec: Any, side: str, data: LocalizationData, tp: Any) -> nn.Module:
        name = spec.teacher if side == "teacher" else spec.student
        return create_model(name, **self.model_kwargs(data, tp))

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**model(inputs), "mask": inputs["mask"]}  # the loss terms pool over valid snippets only

    def validate(self, model: nn.Module, data: LocalizationData, unit: Unit,
                 device: torch.device) -> dict[str, float]:
        val = data.splits["val"]
        outputs = snippet_outputs(model, val, device)
        scores = detection_metrics(detections(outputs, val), ground_truth(val.video_ids, val.segments),
                                   data.class_names, per_class=False)
        return {"val_mAP": scores["mAP"]}

    def predictor(self, model: nn.Module, data: LocalizationData) -> Predict:
        return lambda videos: snippet_outputs(model, videos, torch.device("cpu"))

    def baselines(self, spec: Any, data: LocalizationData) -> dict[str, Predict]:
        return {}

    def test_metrics(self, predict: Predict, data: LocalizationData, mp: Any) -> dict[str, float]:
        test = data.splits["test"]
        outputs, gt = predict(test), ground_truth(test.video_ids, test.segments)
        metrics: dict[str, float] = {}
        for prefix in output_prefixes(outputs):
            metrics.update(detection_metrics(detections(outputs, test, prefix), gt, data.class_names, prefix,
                                             per_class=prefix == ""))
        return metrics

    def input_example(self, data: LocalizationData) -> None:
        return None  # a localizer takes a dict of feature sequences; MLflow's signature cannot say so

    def unit_name(self, unit: Unit) -> str:
        return ""

    def score_chart(self, metric: str) -> tuple[str, Any] | None:
        """The DVC plot a test score belongs on: mAP_05 -> ("mAP_by_tiou", 0.5); ap_<class> -> by class."""
        if m := re.fullmatch(r"(\w*mAP)_(\d\d)", metric):
            return f"{m[1]}_by_tiou", int(m[2]) / 10
        return ("ap_by_class", metric.removeprefix("ap_")) if metric.startswith("ap_") else None

    def known_roles(self) -> set[str]:
        return set()  # no non-learned baselines

    def report_figures(self, evaluations: list[dict[str, Any]], data: LocalizationData, teacher: nn.Module,
                       mp: Any, product: nn.Module | None = None) -> dict[str, Any]:
        """Per-class AP (mean over seeds and tIoU) of every role, and the teacher's activation
        sequences against the ground truth on a few test videos."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figures = {}
        roles = sorted({e["role"] for e in evaluations})
        keys = metric_names(data.class_names)
        shown = [(k, n) for k, n in zip(keys, data.class_names)
                 if any(k in e["metrics"] for e in evaluations)]  # classes with ground truth
        if shown:
            figures["ap_per_class.png"] = ap_table_figure(plt, evaluations, roles, shown)
        test = data.splits["test"]
        shown_videos = [i for i in range(len(test)) if test.labels[i].any()][:4]
        if shown_videos:
            figures["timelines.png"] = timelines_figure(plt, data, teacher, shown_videos)
        return figures


register_kind(Localization())
