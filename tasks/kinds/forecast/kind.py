"""The forecast kind (ERA5, Pangu-Weather family): one model per lead time, composed into a forecaster.

A role trains one model per unit, a lead time in hours (the teacher every lead of the method, a
student the shortest), each mapping the state at t to the state at t + lead. The evaluated model is
Pangu's hierarchical temporal aggregation of them (`models.weather.HierarchicalForecaster`), scored
with WeatherBench 2's latitude-weighted RMSE and ACC in physical units against persistence and the
training-period climatology.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models import create_model
from models.distill import mean_field_l1
from models.weather import HierarchicalForecaster

from .. import Unit, register_kind
from .data import Fields, ForecastData, ForecastPairs, Pair, lead_steps, load_forecast_data
from .metrics import Predictor, headline, score


@torch.no_grad()
def validation_mae(model: nn.Module, val: Fields, lead_hours: int, device: torch.device) -> float:
    """Mean absolute error on normalised fields over the validation pairs (the training loss's scale)."""
    model.eval()
    k = lead_steps(lead_hours, val.step_hours)
    total, count = 0.0, 0
    for idx in val.inits(k).split(64):
        pu, ps = model(val.upper[idx].to(device), val.surface[idx].to(device))
        error = mean_field_l1({"upper": pu.cpu(), "surface": ps.cpu()},
                              {"upper": val.upper[idx + k], "surface": val.surface[idx + k]})
        total += float(error) * len(idx)
        count += len(idx)
    return total / max(count, 1)


def model_predictor(forecaster: nn.Module, fields: Fields, device: torch.device) -> Predictor:
    forecaster.to(device).eval()

    @torch.no_grad()
    def predict(idx: torch.Tensor, lead: int) -> Pair:
        u, s = forecaster(fields.upper[idx].to(device), fields.surface[idx].to(device), lead)
        return u.cpu(), s.cpu()
    return predict


def persistence_predictor(fields: Fields) -> Predictor:
    return lambda idx, lead: (fields.upper[idx], fields.surface[idx])


def climatology_predictor(fields: Fields, clim_norm: Pair) -> Predictor:
    """The training-period mean for the valid time's hour of day."""
    cu, cs = clim_norm  # (24, V, L, H, W), (24, S, H, W) normalised

    def predict(idx: torch.Tensor, lead: int) -> Pair:
        hours = torch.from_numpy((fields.hours[idx.numpy()] + lead) % 24)
        return cu[hours], cs[hours]
    return predict


class Forecast:
    cadence = "weekly"  # of its deployments' schedules (flows/deploy.py)
    name = "forecast"
    labels_loss = {"forecast_l1": {"weight": 1.0}}
    cache_batch = 64
    val_key = "val_loss"
    val_higher_is_better = False
    composes = True   # lead-time models -> one HierarchicalForecaster

    def load(self, data_dir: str, validate: bool = False) -> ForecastData:
        return load_forecast_data(data_dir, validate=validate)

    def units(self, spec: Any, role: str) -> list[Unit]:
        # a student learns the teacher's shortest-lead model
        return list(spec.leads) if role == "teacher" else [spec.leads[0]]

    def compositions(self, spec: Any) -> list[tuple[str, str, tuple[Unit, ...]]]:
        # HTA's baseline: the teacher's 1 h model iterated to every lead
        return [("iterated_1h", "teacher", (1,))] if "iterated_1h" in spec.baselines else []

    def train_set(self, data: ForecastData, unit: Unit) -> ForecastPairs:
        return ForecastPairs(data.train, unit)

    def model_kwargs(self, data: ForecastData, tp: Any) -> dict[str, Any]:
        """Shapes from the data, sizes from params (`methods.<m>.<teacher|student>.model`)."""
        u, s = data.train.upper, data.train.surface
        return dict(n_upper=u.shape[1], n_levels=u.shape[2], n_surface=s.shape[1], n_lat=s.shape[2],
                    n_lon=s.shape[3], wrap_lon=data.global_lon, **tp.model)

    def build(self, spec: Any, side: str, data: ForecastData, tp: Any) -> nn.Module:
        return create_model(spec.teacher if side == "teacher" else spec.student, **self.model_kwargs(data, tp))

    def forward(self, model: nn.Module, inputs: Pair) -> dict[str, torch.Tensor]:
        upper, surface = model(*inputs)
        return {"upper": upper, "surface": surface}

    def validate(self, model: nn.Module, data: ForecastData, unit: Unit, device: torch.device) -> dict[str, float]:
        return {"val_loss": validation_mae(model, data.val, unit, device)}

    def compose(self, members: dict[Unit, nn.Module]) -> nn.Module:
        return HierarchicalForecaster(members)

    def predictor(self, model: nn.Module, data: ForecastData) -> Predictor:
        return model_predictor(model, data.test, torch.device("cpu"))

    def baselines(self, spec: Any, data: ForecastData) -> dict[str, Predictor]:
        clim_norm = data.norm.norm(*data.clim_phys)
        known = {"persistence": persistence_predictor(data.test),
                 "climatology": climatology_predictor(data.test, clim_norm)}
        return {name: known[name] for name in known if name in spec.baselines}

    def test_metrics(self, predict: Predictor, data: ForecastData, mp: Any) -> dict[str, float]:
        return score(predict, data.test, data.norm, data.clim_phys, data.lat, list(mp.eval_leads), headline(data))

    def input_example(self, data: ForecastData) -> None:
        return None  # a forecaster takes (upper, surface, lead); MLflow's signature cannot say so

    def unit_name(self, unit: Unit) -> str:
        return f"{unit}h"

    def check_params(self, spec: Any, mp: Any) -> str | None:
        """What is wrong with a forecast method's params block (`key: problem`), or None."""
        if not mp.eval_leads:
            return "eval_leads: required for a forecast method"
        claimed = {int(m.rsplit("_", 1)[1][:-1]) for c in spec.claims for m in (c.left_metric, c.right_metric)}
        if not claimed <= set(mp.eval_leads):
            return f"eval_leads: the claim needs leads {sorted(claimed)}, got {mp.eval_leads}"
        return None

    def score_chart(self, metric: str) -> tuple[str, Any] | None:
        """The DVC plot a test score belongs on: rmse_z500_24h -> ("rmse_z500_by_lead_h", 24)."""
        m = re.fullmatch(r"(rmse|acc)_(\w+)_(\d+)h", metric)
        return (f"{m[1]}_{m[2]}_by_lead_h", int(m[3])) if m else None

    def known_roles(self) -> set[str]:
        return {"persistence", "climatology", "iterated_1h"}

    def report_figures(self, evaluations: list[dict[str, Any]], data: ForecastData, teacher: nn.Module,
                       mp: Any, product: nn.Module | None = None) -> dict[str, Any]:
        """RMSE against lead time per headline variable and role, and the teacher's forecast / truth /
        error maps at the longest lead for z500 and t2m."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        leads = list(mp.eval_leads)
        figures = {}
        names = [h[0] for h in headline(data)]
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
        roles = sorted({e["role"] for e in evaluations})
        for ax, name in zip(axes[0], names):
            for role in roles:
                ys = [np.mean([e["metrics"][f"rmse_{name}_{ld}h"] for e in evaluations if e["role"] == role])
                      for ld in leads]
                ax.plot(leads, ys, marker="o", label=role)
            ax.set_title(f"{name} RMSE"); ax.set_xlabel("lead (h)")
        axes[0][0].legend(fontsize=7)
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.88, wspace=0.3)
        figures["rmse_vs_lead.png"] = fig

        lead = max(leads)
        k = lead_steps(lead, data.test.step_hours)
        idx = data.test.inits(k)[:1]
        if len(idx) == 0:
            return figures
        fu, fs = data.norm.denorm(*model_predictor(teacher, data.test, torch.device("cpu"))(idx, lead))
        tu, ts = data.norm.denorm(data.test.upper[idx + k], data.test.surface[idx + k])
        for name, where, ch, lvl in headline(data):
            if name not in ("z500", "t2m"):
                continue
            f = (fu[0, ch, lvl] if where == "upper" else fs[0, ch]).numpy()
            t = (tu[0, ch, lvl] if where == "upper" else ts[0, ch]).numpy()
            fig, axes = plt.subplots(1, 3, figsize=(12, 3))
            for ax, (title, field) in zip(axes, (("forecast", f), ("truth", t), ("error", f - t))):
                im = ax.imshow(field, cmap="RdBu_r" if title == "error" else "viridis")
                ax.set_title(f"{name} {title} (+{lead} h)"); fig.colorbar(im, ax=ax, shrink=0.8)
            figures[f"maps/{name}_{lead}h.png"] = fig
        return figures


register_kind(Forecast())
