"""The localization kind (issue 12): detection AP against hand-computed values and a plain-loop
reference of the THUMOS protocol, NMS against brute force, the WTAL models and loss terms, and the
kind through the one train loop, its evaluation and the method flow on a generated features dir."""
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

from localization_fixture import write_features
import models.localization  # noqa: F401  (registers its models and loss terms)
from models import create_model
from models.distill import DistillationLoss, create_loss
from tasks.kinds.localization.metrics import (TIOU_THRESHOLDS, Detections, detection_metrics,
                                              evaluate_detections, metric_names, nms, proposals, segment_iou)

METRIC_NAME = re.compile(r"^[A-Za-z_]\w*$")


def dets(rows):
    """Detections from (video, label, start, end, score) rows."""
    a = np.array(rows, float).reshape(-1, 5)
    return Detections(a[:, 0].astype(int), a[:, 1].astype(int), a[:, 2:4], a[:, 4])


def gts(rows):
    a = np.array(rows, float).reshape(-1, 4)
    return a[:, 0].astype(int), a[:, 1].astype(int), a[:, 2:4]


def ap_at(pred_rows, gt_rows, tiou, num_classes=1):
    ev = evaluate_detections(dets(pred_rows), *gts(gt_rows), num_classes=num_classes,
                             tiou_thresholds=np.array([tiou]))
    return ev.ap[0]


# ---------------------------------------------------------------------------------------------------
# a plain-loop reference of the protocol, written from its description, not from metrics.py

def reference_ap(preds, gt, tiou):
    """preds: [(video, start, end, score)], gt: [(video, start, end)] of one class."""
    if not gt:
        return math.nan
    order = sorted(range(len(preds)), key=lambda i: -preds[i][3])  # stable: ties keep input order
    used, hits = set(), []
    for i in order:
        v, s, e, _ = preds[i]
        best, best_iou = None, -1.0
        for j, (gv, gs, ge) in enumerate(gt):
            if gv != v or j in used:
                continue
            inter = max(0.0, min(e, ge) - max(s, gs))
            iou = inter / ((e - s) + (ge - gs) - inter)
            if iou >= tiou and iou > best_iou:
                best, best_iou = j, iou
        if best is not None:
            used.add(best)
        hits.append(best is not None)
    # each true positive raises recall by 1/|gt|, at the best precision reached from there on
    precision = [sum(hits[:k + 1]) / (k + 1) for k in range(len(hits))]
    return sum(max(precision[k:]) for k in range(len(hits)) if hits[k]) / len(gt)


def test_tiou_has_its_closed_form():
    a = np.array([[0, 10], [0, 10], [2, 4], [0, 10]], float)
    b = np.array([[5, 15], [20, 30], [0, 10], [0, 10]], float)
    assert np.diag(segment_iou(a, b)) == pytest.approx([5 / 15, 0.0, 0.2, 1.0])
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, 50, (40, 2)), axis=1)
    y = np.sort(rng.uniform(0, 50, (30, 2)), axis=1)
    inter = np.minimum(x[:, None, 1], y[None, :, 1]) - np.maximum(x[:, None, 0], y[None, :, 0])
    inter = inter.clip(0)
    union = np.maximum(x[:, None, 1], y[None, :, 1]) - np.minimum(x[:, None, 0], y[None, :, 0])
    overlapping = inter > 0  # then the union is the hull
    assert segment_iou(x, y)[overlapping] == pytest.approx((inter / union)[overlapping])
    assert (segment_iou(x, y)[~overlapping] == 0).all()


def test_ap_two_ground_truths_three_predictions():
    # TP (p=1, r=.5), FP, TP (p=2/3, r=1): 0.5 * 1 + 0.5 * 2/3
    gt = [(0, 0, 0, 10), (0, 0, 20, 30)]
    pred = [(0, 0, 0, 10, 0.9), (0, 0, 40, 50, 0.8), (0, 0, 20, 30, 0.7)]
    assert ap_at(pred, gt, 0.5)[0] == pytest.approx(5 / 6)
    # the same predictions listed in another order score the same: sorted by score first
    assert ap_at(pred[::-1], gt, 0.5)[0] == pytest.approx(5 / 6)


def test_ap_hand_cases():
    # a second detection of a matched ground truth is a false positive, after the recall is reached
    assert ap_at([(0, 0, 0, 10, 0.9), (0, 0, 1, 10, 0.8)], [(0, 0, 0, 10)], 0.5)[0] == pytest.approx(1.0)
    # ... and before it, it halves the precision: FP then TP
    assert ap_at([(0, 0, 0, 10, 0.7), (0, 0, 1, 10, 0.8)], [(0, 0, 0, 10)], 0.95)[0] == pytest.approx(0.5)
    # a prediction takes the highest-tIoU free ground truth: [4,14] takes [5,15] (0.82), not [0,10]
    # (0.43), leaving [0,10] to [0,9] (0.9); taking the first above 0.3 would leave [0,9] unmatched
    gt = [(0, 0, 0, 10), (0, 0, 5, 15)]
    assert ap_at([(0, 0, 4, 14, 0.9), (0, 0, 0, 9, 0.8)], gt, 0.3)[0] == pytest.approx(1.0)
    # a ground truth of another video does not count
    assert ap_at([(1, 0, 0, 10, 0.9)], [(0, 0, 0, 10)], 0.1)[0] == 0.0
    # a class with ground truth and no prediction scores 0; one without ground truth has no AP
    ap = ap_at([(0, 1, 0, 10, 0.9)], [(0, 0, 0, 10)], 0.1, num_classes=3)
    assert ap[0] == 0.0 and np.isnan(ap[1]) and np.isnan(ap[2])


def test_ap_matches_the_plain_loop_reference_on_random_cases():
    rng = np.random.default_rng(1)
    for case in range(30):
        n_gt, n_pred, n_vid = rng.integers(1, 12), rng.integers(0, 40), rng.integers(1, 4)
        gt_start = rng.uniform(0, 40, n_gt)
        gt = [(int(rng.integers(n_vid)), 0, s, s + rng.uniform(1, 10)) for s in gt_start]
        pred = []
        for _ in range(n_pred):
            if rng.random() < 0.6:  # near a ground truth
                v, _, s, e = gt[rng.integers(n_gt)]
                s, e = s + rng.normal(0, 1.5), e + rng.normal(0, 1.5)
            else:
                v, s = int(rng.integers(n_vid)), rng.uniform(0, 40)
                e = s + rng.uniform(1, 10)
            pred.append((v, 0, min(s, e - 0.1), e, round(float(rng.random()), 1)))  # rounded: ties happen
        ev = evaluate_detections(dets(pred), *gts(gt), num_classes=1)
        for t, ap in zip(TIOU_THRESHOLDS, ev.ap[:, 0]):
            expected = reference_ap([(p[0], p[2], p[3], p[4]) for p in pred],
                                    [(g[0], g[2], g[3]) for g in gt], t)
            assert ap == pytest.approx(expected, abs=1e-12), (case, t)


def test_nms_keeps_what_a_brute_force_loop_keeps():
    rng = np.random.default_rng(2)
    for _ in range(30):
        n = int(rng.integers(1, 25))
        s = rng.uniform(0, 30, n)
        seg = np.stack([s, s + rng.uniform(0.5, 10, n)], 1)
        score = rng.random(n).round(1)
        kept = []
        for i in sorted(range(n), key=lambda i: -score[i]):
            if all(segment_iou(seg[i], seg[j])[0, 0] <= 0.5 for j in kept):
                kept.append(i)
        assert nms(seg, score, 0.5).tolist() == kept


def test_proposals_are_runs_above_the_thresholds_scored_by_outer_inner_contrast():
    score = np.array([0, 0.2, 0.9, 1.0, 0.8, 0, 0.6, 0])
    times = np.stack([np.arange(8), np.arange(8) + 1.0], 1)
    seg, sc = proposals(score, times, video_prob=0.5, thresholds=np.array([0.5]))
    assert seg.tolist() == [[2, 5], [6, 7]]
    # [2,5): inside 0.9, one snippet each side (0.2, 0) -> 0.9 - 0.1; [6,7): 0.6 - (0 + 0) / 2
    assert sc == pytest.approx([0.8 + 0.2 * 0.5, 0.6 + 0.2 * 0.5])


def test_metric_names_are_valid_and_unique():
    names = metric_names(["Arm wrestling", "jump/rope", "jump rope", "über-fast", "3d"])
    assert names == ["ap_arm_wrestling", "ap_jump_rope", "ap_jump_rope_2", "ap_uber_fast", "ap_3d"]
    assert all(METRIC_NAME.match(n) and n.isascii() for n in names)
    gt = gts([(0, 0, 0, 10), (0, 1, 20, 30)])
    m = detection_metrics(dets([(0, 0, 1, 9, 0.9), (0, 1, 18, 34, 0.8)]), gt, ["a", "b"])
    assert all(METRIC_NAME.match(k) for k in m)
    assert m["mean_pred_len"] == pytest.approx(12.0) and m["mean_gt_len"] == pytest.approx(10.0)
    assert m["len_ratio"] == pytest.approx(1.2)
    # nothing found: no observation, a tie (0 against the ground truth's length would read "incomplete")
    missed = detection_metrics(dets([(0, 0, 40, 50, 0.9)]), gt, ["a", "b"])
    assert missed["mAP"] == 0 and missed["mean_pred_len"] == missed["mean_gt_len"] == missed["len_ratio"] == 0
    # class a found at tIoU 0.8, class b at 0.625: below 0.7 only
    assert m["ap_a"] == 1.0 and m["ap_b"] == pytest.approx(6 / 7) and m["mAP_07"] == 0.5
    assert m["mAP"] == pytest.approx((6 + 0.5) / 7)


# ---------------------------------------------------------------------------------------------------
# models and loss terms

@pytest.mark.parametrize("name,branches", [("wtal_mil_cbp", ["cbp"]), ("wtal_mil_vlp", ["vlp"]),
                                           ("wtal_dual", ["cbp", "vlp"])])
def test_models_build_bare_and_ignore_padding(name, branches):
    create_model(name)  # what register_method does
    torch.manual_seed(0)
    text = torch.randn(5, 24)
    model = create_model(name, num_classes=5, cbp_dim=16, vlp_dim=24, hidden=8, text_embeddings=text).eval()
    x = {"cbp": torch.randn(1, 12, 16), "vlp": torch.randn(1, 12, 24)}
    padded = {k: torch.cat([v, torch.zeros(1, 8, v.shape[-1])], 1) for k, v in x.items()}
    padded["mask"] = torch.arange(20)[None] < 12
    out, out_padded = model(x), model(padded)
    assert {k for k in out if k.endswith("_cas")} == {f"{b}_cas" for b in branches}
    assert out["cas"].shape == (1, 12, 5) and out["attn"].shape == (1, 12) and out["video"].shape == (1, 5)
    for key in ("cas", "attn"):  # a video's outputs do not depend on the padding after it
        assert torch.allclose(out[key], out_padded[key][:, :12], atol=1e-5)
    assert torch.allclose(out["video"], out_padded["video"], atol=1e-5)
    assert (out_padded["attn"][:, 12:] == 0).all()


def outputs(b, t=10, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"{b}_cas": torch.randn(2, t, c, generator=g), f"{b}_attn": torch.rand(2, t, generator=g),
            f"{b}_video": torch.randn(2, c, generator=g)}


def test_mil_sums_over_the_branches_present():
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    y = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    cbp, vlp = {**outputs("cbp"), "mask": mask}, {**outputs("vlp", seed=1), "mask": mask}
    mil = create_loss("mil")
    assert mil({**cbp, **vlp}, None, y) == pytest.approx(float(mil(cbp, None, y) + mil(vlp, None, y)))
    with pytest.raises(KeyError, match="no branch outputs"):
        mil({"mask": mask}, None, y)


def test_wtal_bf_alternates_per_optimizer_step_and_resumes():
    mask = torch.ones(2, 10, dtype=torch.bool)
    teacher = {"cbp_attn": torch.full((2, 10), 0.1), "vlp_attn": torch.full((2, 10), 0.9)}
    teacher["cbp_attn"][:, :3] = 0.5   # not confident background
    teacher["vlp_attn"][:, 5:] = 0.5   # not confident foreground
    term = create_loss("wtal_bf", bg_threshold=0.2, fg_threshold=0.8)

    def step():
        s = {"cbp_attn": torch.full((2, 10), 0.5, requires_grad=True),
             "vlp_attn": torch.full((2, 10), 0.5, requires_grad=True), "mask": mask}
        term(s, teacher, None).backward()
        return tuple(torch.zeros(2, 10, dtype=torch.bool) if s[k].grad is None else s[k].grad != 0
                     for k in ("cbp_attn", "vlp_attn"))

    with torch.no_grad():  # the loop's call before building the optimizer: no step
        term({"cbp_attn": torch.rand(2, 10), "vlp_attn": torch.rand(2, 10), "mask": mask}, teacher, None)
    assert int(term.step) == 0
    cbp_grad, vlp_grad = step()        # B: the student's VLP attention, on CBP's confident background
    assert not cbp_grad.any() and vlp_grad[:, 3:].all() and not vlp_grad[:, :3].any()
    cbp_grad, vlp_grad = step()        # F: the student's CBP attention, on VLP's confident foreground
    assert not vlp_grad.any() and cbp_grad[:, :5].all() and not cbp_grad[:, 5:].any()
    state = DistillationLoss({"wtal_bf": {}, "mil": {}}).state_dict()
    assert "terms.wtal_bf.step" in state
    resumed = create_loss("wtal_bf")
    resumed.load_state_dict(term.state_dict())
    term = resumed
    assert int(term.step) == 2 and not step()[0].any()  # B again


# ---------------------------------------------------------------------------------------------------
# the kind: the train loop, evaluation and figures, then the method flow

@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("video") / "features", {"train": 32, "val": 12, "test": 12},
                          snippets=(24, 40), length=(5, 10), dims=(16, 24), margin=2)


def test_the_kind_trains_through_fit_and_evaluates(features):
    from types import SimpleNamespace

    from tasks.kinds import get_kind
    from tasks.platform.params import TrainParams
    from tasks.train.loop import fit
    kind = get_kind("localization")
    data = kind.load(str(features), validate=True)
    tp = TrainParams(epochs=12, batch_size=8, lr=0.005, cache_teacher=True, model={"hidden": 16})
    spec = SimpleNamespace(teacher="wtal_dual", student="wtal_dual")
    cpu = torch.device("cpu")

    def train(loss, teacher=None, seed=0):
        torch.manual_seed(seed)
        model, criterion = kind.build(spec, "student", data, tp), DistillationLoss(loss)
        history = fit(model, criterion, kind.train_set(data, None), tp, seed=seed, forward=kind.forward,
                      validate=lambda m: kind.validate(m, data, None, cpu), teacher=teacher)
        return model, criterion, history

    teacher, _, history = train(kind.labels_loss)
    assert len(history) == 12 and 0 <= history[-1]["val_mAP"] <= 1
    student, criterion, history = train({"mil": {}, "wtal_bf": {}}, teacher, seed=1)
    assert int(criterion.terms["wtal_bf"].step) == 12 * math.ceil(32 / 8)  # one per optimizer step
    assert "train_loss_wtal_bf" in history[-1]

    metrics = kind.test_metrics(kind.predictor(teacher, data), data, None)
    assert all(METRIC_NAME.match(k) for k in metrics)
    for prefix in ("", "cbp_", "vlp_"):
        keys = ("mAP", "mAP_01", "mAP_07", "mean_pred_len", "mean_gt_len", "len_ratio")
        assert {f"{prefix}{k}" for k in keys} <= set(metrics)
        by_threshold = [metrics[f"{prefix}mAP_0{i}"] for i in range(1, 8)]
        assert metrics[f"{prefix}mAP"] == pytest.approx(np.mean(by_threshold))
    assert set(metrics) >= {"ap_arm_wrestling", "ap_jump_rope"}
    assert metrics["mAP"] > 0.3  # the generated actions are easy to find
    figures = kind.report_figures([{"role": "teacher", "seed": 0, "metrics": metrics}], data, teacher, None)
    assert set(figures) == {"ap_per_class.png", "timelines.png"}


def test_wtal_dcc_runs_through_the_method_flow(features, tmp_path, monkeypatch):
    import yaml
    from mlflow.tracking import MlflowClient

    from checks import runs_by_role
    from flows.method import method_flow
    from flows.runtime import local_run_settings
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train = {"epochs": 4, "batch_size": 8, "lr": 0.005, "model": {"hidden": 16}}
    method = {"kind": "localization", "models": "localization", "data": str(features), "seeds": [0, 1, 2],
              "teacher": train, "student": {**train, "cache_teacher": True},
              "loss": {"wtal_bf": {"bg_threshold": 0.3}}}
    params = {"tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_root": str(tmp_path / "art")},
              "methods": {"wtal_dcc": method}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with local_run_settings():
        report = method_flow("wtal_dcc", str(tmp_path / "params.yaml"), str(tmp_path / "report.json"))

    assert [p["statement"] for p in report["claim"]["parts"]] == [
        "student_kd.mAP > student_labels.cbp_mAP", "student_kd.mAP > student_labels.vlp_mAP",
        "student_kd.mAP > student_labels.mAP"]
    assert all(p["seeds"] == [0, 1, 2] for p in report["claim"]["parts"])
    assert set(report["roles"]) == {"teacher", "student_kd", "student_labels"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    by_role = runs_by_role(client, "wtal_dcc")
    counts = {k: len(v) for k, v in by_role.items()}
    assert counts == {"flow": 1, "teacher": 1, "student_kd": 3, "student_labels": 3}
    kd = by_role["student_kd"][0]
    assert kd.data.params["loss.wtal_bf.bg_threshold"] == "0.3" and "test_vlp_len_ratio" in kd.data.metrics
    assert len(client.get_metric_history(kd.info.run_id, "val_mAP")) == 4
    assert {a.path for a in client.list_artifacts(by_role["flow"][0].info.run_id)} >= \
        {"report.json", "ap_per_class.png", "timelines.png"}
    student = client.get_model_version_by_alias("wtal_dcc", "champion")
    assert student.tags["distillery.teacher_model"] == "wtal_dcc_teacher/1"
    teacher = client.get_model_version_by_alias("wtal_dcc_teacher", "champion")
    assert teacher.run_id == by_role["teacher"][0].info.run_id


def test_the_declarations():
    from tasks.methods import get_method, resolve
    for name, op in (("wtal_cbp", "<"), ("wtal_vlp", ">")):
        spec = get_method(name)
        assert spec.recipe == "teacher_only" and spec.claims[0].statement == \
            f"teacher.mean_pred_len {op} teacher.mean_gt_len"
    spec, mp, _ = resolve("wtal_dcc")
    assert spec.student == spec.teacher == "wtal_dual" and mp.student.cache_teacher and len(mp.seeds) >= 3
