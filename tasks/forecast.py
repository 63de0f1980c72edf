"""Forecast training and scoring for the ERA5 methods (the Pangu-Weather family).

Fields are normalised with the training-period statistics from `tasks.era5_prepare` and go through the
model as (upper (B, V, L, H, W), surface (B, S, H, W)). Scores are WeatherBench 2's latitude-weighted
RMSE and ACC (`tasks.weather_metrics`) in physical units, per variable/level and lead time.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from models import create_model
from models.distill import DistillationLoss, ForwardHookManager, mean_field_l1
from models.registry import MethodSpec

from . import tracking
from .train import TrainConfig, TrainedModel, frozen_teacher_outputs, resolve_device, run_epochs
from .weather_metrics import weighted_acc, weighted_rmse

log = logging.getLogger(__name__)
TARGETS_ONLY = {"forecast_l1": {"weight": 1.0}}
# WB2's headline variables; those the data has are scored (name, variable, level or None)
HEADLINE = (("z500", "z", 500), ("t850", "t", 850), ("t2m", "t2m", None))
Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Fields:
    """One split as normalised tensors, with what scoring needs to go back to physical units.

    Rows are states in time order; an ensemble's members are trajectories of their own, stored one
    after another (member-major), so a forecast pair (row i, row i + k) must not cross from one
    trajectory into the next: `inits(k)` lists the rows where it does not."""
    upper: torch.Tensor        # (N, V, L, H, W)
    surface: torch.Tensor      # (N, S, H, W)
    hours: np.ndarray          # (N,) hour of day (UTC) of each state, to index the climatology
    step_hours: int
    trajectory: np.ndarray | None = None  # (N,) which trajectory (ensemble member) each row is in

    def inits(self, k: int) -> torch.Tensor:
        """Rows whose state k steps later is in the same trajectory: the valid forecast inits."""
        n = len(self.hours) - k
        if n <= 0:
            return torch.zeros(0, dtype=torch.long)
        if self.trajectory is None:
            return torch.arange(n)
        return torch.from_numpy(np.flatnonzero(self.trajectory[:n] == self.trajectory[k:]))


class Normalizer:
    """z-scores per variable (and level) with the training-period statistics."""

    def __init__(self, stats: dict[str, Any], upper_vars: list[str], surface_vars: list[str]) -> None:
        self.upper_vars, self.surface_vars = upper_vars, surface_vars
        def arr(var, key, shape):
            return torch.tensor(np.asarray(stats[var][key], dtype=np.float32)).reshape(shape)
        # surface-only (upper-air-only) data: an empty (0, 1, 1, 1) ((0, 1, 1)) scale broadcasts
        # against the empty tensor
        empty_u, empty_s = torch.zeros(0, 1, 1, 1), torch.zeros(0, 1, 1)
        self.u_mean = torch.stack([arr(v, "mean", (-1, 1, 1)) for v in upper_vars]) if upper_vars else empty_u
        self.u_std = torch.stack([arr(v, "std", (-1, 1, 1)) for v in upper_vars]) if upper_vars else empty_u + 1
        self.s_mean = torch.stack([arr(v, "mean", (1, 1)) for v in surface_vars]) if surface_vars else empty_s
        self.s_std = torch.stack([arr(v, "std", (1, 1)) for v in surface_vars]) if surface_vars else empty_s + 1

    def norm(self, upper: torch.Tensor, surface: torch.Tensor) -> Pair:
        return (upper - self.u_mean) / self.u_std, (surface - self.s_mean) / self.s_std

    def denorm(self, upper: torch.Tensor, surface: torch.Tensor) -> Pair:
        return upper * self.u_std + self.u_mean, surface * self.s_std + self.s_mean


def _rows(ds, var: str, dims: tuple[str, ...]) -> np.ndarray:
    """`var` as (rows, *dims): member-major when the data have ensemble members."""
    leading = ("member", "time") if "member" in ds.dims else ("time",)
    x = ds[var].transpose(*leading, *dims).values
    return x.reshape(-1, *x.shape[len(leading):])


def dataset_tensors(ds, upper_vars: list[str], surface_vars: list[str]) -> Pair:
    """(N, V, L, H, W) and (N, S, H, W) float32 tensors in physical units (V = L = 0 without upper air,
    S = 0 without surface variables); N = members x times."""
    grid = ("latitude", "longitude")
    upper = [_rows(ds, v, ("level", *grid)) for v in upper_vars]
    surface = [_rows(ds, v, grid) for v in surface_vars]
    n, h, w = (upper or surface)[0].shape[0], ds.sizes["latitude"], ds.sizes["longitude"]
    upper_t = np.stack(upper, 1) if upper else np.zeros((n, 0, 0, h, w), np.float32)
    surface_t = np.stack(surface, 1) if surface else np.zeros((n, 0, h, w), np.float32)
    return torch.from_numpy(upper_t.astype(np.float32)), torch.from_numpy(surface_t.astype(np.float32))


def to_fields(ds, norm: Normalizer, step_hours: int) -> Fields:
    upper, surface = norm.norm(*dataset_tensors(ds, norm.upper_vars, norm.surface_vars))
    hours = ds["time"].dt.hour.values.astype(np.int64)
    if "member" not in ds.dims:
        return Fields(upper, surface, hours, step_hours)
    members = ds.sizes["member"]
    return Fields(upper, surface, np.tile(hours, members), step_hours,
                  trajectory=np.repeat(np.arange(members), len(hours)))


def lead_steps(lead_hours: int, step_hours: int) -> int:
    if lead_hours % step_hours:
        raise ValueError(f"lead {lead_hours} h is not a multiple of the data's {step_hours} h step")
    return lead_hours // step_hours


# ---------------------------------------------------------------------------------------------------
# training one lead-time model

def forecast_outputs(model: nn.Module, upper: torch.Tensor, surface: torch.Tensor,
                     hooks: ForwardHookManager | None) -> dict[str, torch.Tensor]:
    out_u, out_s = model(upper, surface)
    out = {"upper": out_u, "surface": out_s}
    if hooks is not None:
        out.update(hooks.outputs())
    return out


def fit_forecaster(model: nn.Module, train: Fields, val: Fields, lead_hours: int, cfg: TrainConfig, *,
                   seed: int, criterion: DistillationLoss, teacher: nn.Module | None = None,
                   taps: dict[str, tuple[str, ...]] | None = None, device: torch.device = torch.device("cpu"),
                   on_epoch: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Trains `model` to map the state at t to the state at t + lead (see `tasks.train.run_epochs`).

    A frozen teacher's forecasts (and tapped features) are computed once for every training input.
    """
    taps = taps or {}
    k = lead_steps(lead_hours, train.step_hours)
    inits = train.inits(k).to(device)
    n = len(inits)
    if n == 0:
        raise ValueError(f"training split has {len(train.upper)} states, too few for a {lead_hours} h lead")
    model.to(device)
    xu, xs = train.upper.to(device), train.surface.to(device)

    teacher_out = None
    if criterion.needs_teacher:
        teacher_out = frozen_teacher_outputs(
            teacher, taps.get("teacher", ()), device, n,
            lambda sl, hooks: forecast_outputs(teacher, xu[inits[sl]], xs[inits[sl]], hooks))
    s_hooks = ForwardHookManager.on(model, taps.get("student", ()))

    def batch(pos: torch.Tensor):  # positions in `inits`
        idx = inits[pos]
        target = {"upper": xu[idx + k], "surface": xs[idx + k]}
        t_out = None if teacher_out is None else {key: v[pos] for key, v in teacher_out.items()}
        return forecast_outputs(model, xu[idx], xs[idx], s_hooks), t_out, target

    def validate() -> dict[str, float]:
        return {"val_loss": validation_mae(model, val, lead_hours, device)}

    try:
        return run_epochs(model, criterion, n, batch, validate, cfg, seed=seed, device=device,
                          on_epoch=on_epoch, hooks=s_hooks)
    finally:
        s_hooks.clear()


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


# ---------------------------------------------------------------------------------------------------
# scoring: any predictor, WB2 metrics in physical units

Predictor = Callable[[torch.Tensor, int], Pair]  # (init indices, lead hours) -> normalised forecast


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


def headline_index(upper_vars: list[str], levels: list[int], surface_vars: list[str]) -> list[tuple]:
    """(name, "upper"/"surface", channel, level index) for the headline variables present."""
    out = []
    for name, var, level in HEADLINE:
        if level is not None and var in upper_vars and level in levels:
            out.append((name, "upper", upper_vars.index(var), levels.index(level)))
        elif level is None and var in surface_vars:
            out.append((name, "surface", surface_vars.index(var), None))
    return out


def score(predict: Predictor, fields: Fields, norm: Normalizer, clim_phys: Pair, lat: np.ndarray,
          leads: list[int], headline: list[tuple], init_stride: int = 1) -> dict[str, float]:
    """`rmse_<var>_<lead>h` and `acc_<var>_<lead>h` over every init time with a verifying truth."""
    cu, cs = clim_phys
    metrics: dict[str, float] = {}
    for lead in leads:
        k = lead_steps(lead, fields.step_hours)
        idx = fields.inits(k)[::init_stride]
        if len(idx) == 0:
            continue
        fu, fs = norm.denorm(*predict(idx, lead))
        tu, ts = norm.denorm(fields.upper[idx + k], fields.surface[idx + k])
        hours = torch.from_numpy((fields.hours[idx.numpy()] + lead) % 24)
        for name, kind, ch, lvl in headline:
            if kind == "upper":
                f, t, c = fu[:, ch, lvl], tu[:, ch, lvl], cu[hours][:, ch, lvl]
            else:
                f, t, c = fs[:, ch], ts[:, ch], cs[hours][:, ch]
            metrics[f"rmse_{name}_{lead}h"] = weighted_rmse(f, t, lat)
            metrics[f"acc_{name}_{lead}h"] = weighted_acc(f, t, c, lat)
    return metrics


# ---------------------------------------------------------------------------------------------------
# the task-level functions the flow calls

@dataclass
class ForecastData:
    train: Fields
    val: Fields
    test: Fields
    norm: Normalizer
    clim_phys: Pair
    lat: np.ndarray
    levels: list[int]
    meta: dict[str, Any]
    global_lon: bool = True   # the grid closes round the globe in longitude

    @property
    def headline(self) -> list[tuple]:
        return headline_index(self.norm.upper_vars, self.levels, self.norm.surface_vars)

    def example(self) -> Pair:
        return self.train.upper[:1], self.train.surface[:1]


def longitude_layout(lon: np.ndarray) -> tuple[bool, int]:
    """(whether the grid spans the globe, the roll that makes a regional grid contiguous).

    Prepared data keeps longitudes ascending in [0, 360), so a box across 0° E (the UK samples) is
    stored as 0.125..1.625 then 350.125..359.625: neighbours in the array are not neighbours on Earth
    unless the columns are rolled to start after the gap.
    """
    gaps = np.diff(lon)
    spacing = float(gaps.min()) if len(gaps) else 360.0
    if abs(len(lon) * spacing - 360.0) < 1e-6 * 360.0:
        return True, 0
    wrap_gap = lon[0] + 360.0 - lon[-1]   # from the last column round to the first
    inner = int(np.argmax(gaps))
    return False, (inner + 1 if gaps[inner] > wrap_gap else 0)


def load_forecast_data(data_dir: str, validate: bool = False) -> ForecastData:
    """The prepared splits as tensors. Every task of a flow reads the same store, so the result is
    kept per process, keyed on the store's path and its meta.json (rewritten by every prepare);
    validation always runs when asked for. Callers must not modify the tensors in place."""
    meta = Path(data_dir) / "meta.json"
    stamp = meta.stat().st_mtime_ns if meta.is_file() else None
    if validate or stamp is None:
        from .era5_prepare import load_prepared
        load_prepared(data_dir, validate=validate)  # raises the clear StageError on bad input
    return _load_forecast_data(str(Path(data_dir).resolve()), stamp)


@functools.lru_cache(maxsize=2)
def _load_forecast_data(data_dir: str, stamp: int | None) -> ForecastData:
    from .era5_prepare import load_prepared, surface_vars, upper_vars
    d = load_prepared(data_dir, validate=False)
    global_lon, shift = longitude_layout(d["train"]["longitude"].values)
    if shift:  # a regional box across 0° E: make its columns contiguous in space
        d = {k: v.roll(longitude=-shift, roll_coords=True) if k in ("train", "val", "test", "climatology") else v
             for k, v in d.items()}
    up, sf = upper_vars(d["train"]), surface_vars(d["train"])
    norm = Normalizer(d["stats"], up, sf)
    step = int(d["meta"]["step_hours"])
    clim = d["climatology"]
    cu, cs = dataset_tensors(clim.rename(hour="time"), up, sf)  # (24, V, L, H, W), (24, S, H, W)
    return ForecastData(train=to_fields(d["train"], norm, step), val=to_fields(d["val"], norm, step),
                        test=to_fields(d["test"], norm, step), norm=norm,
                        clim_phys=(cu, cs), lat=d["train"]["latitude"].values,
                        levels=[int(x) for x in d["train"]["level"].values] if up else [],
                        meta=d["meta"], global_lon=global_lon)


def model_kwargs(data: ForecastData, params: dict[str, Any], role: str) -> dict[str, Any]:
    """Shapes from the data, sizes from params (`methods.<m>.<teacher|student>.model`)."""
    u, s = data.train.upper, data.train.surface
    return dict(n_upper=u.shape[1], n_levels=u.shape[2], n_surface=s.shape[1], n_lat=s.shape[2],
                n_lon=s.shape[3], wrap_lon=data.global_lon, **params.get(role, {}).get("model", {}))


def train_lead_model(spec: MethodSpec, role: str, lead: int, data_dir: str, params: dict[str, Any],
                     seed: int, ctx: tracking.RunContext, teacher: TrainedModel | None = None,
                     extra_tags: dict[str, Any] | None = None) -> TrainedModel:
    """Trains one lead-time model (teacher, distilled student or student on targets alone) as one run."""
    distilled = role == "student_kd"
    side = "teacher" if role == "teacher" else "student"
    model_name = spec.teacher if side == "teacher" else spec.student
    terms = params["loss_terms"] if distilled else TARGETS_ONLY
    cfg = TrainConfig.from_params(params[side])
    device = resolve_device(params.get("device", "auto"))
    data = load_forecast_data(data_dir)

    torch.manual_seed(seed)
    model = create_model(model_name, **model_kwargs(data, params, side))
    criterion = DistillationLoss(terms)
    teacher_model = tracking.load_model(teacher.model_uri, ctx) if distilled else None
    tags = {"method": spec.name, "role": role, "seed": seed, "lead_hours": lead, "model": model_name,
            "device": str(device), **(extra_tags or {})}
    if distilled:
        tags.update(teacher_run_id=teacher.run_id, teacher_model_uri=teacher.model_uri)
    run_params = {"model": model_name, "model_kwargs": model_kwargs(data, params, side), "lead_hours": lead,
                  "seed": seed, "train": asdict(cfg), "loss": terms, "device": str(device),
                  "n_params": sum(p.numel() for p in model.parameters())}
    with tracking.run(ctx, f"{role}-{lead}h-seed{seed}", tags=tags, params=run_params) as run_id:
        log.info("%s/%s %dh seed %d on %s", spec.name, role, lead, seed, device)
        epoch_logger = tracking.EpochLogger(run_id, ctx)
        history = fit_forecaster(model, data.train, data.val, lead, cfg, seed=seed, criterion=criterion,
                                 teacher=teacher_model, taps=spec.feature_taps if distilled else None,
                                 device=device, on_epoch=epoch_logger)
        epoch_logger.close()
        tracking.log_learning_curve(history, f"{spec.name} · {role} · {lead} h · seed {seed}")
        model_uri = tracking.log_model(model, None)
    return TrainedModel(role=role, seed=seed, run_id=run_id, model_uri=model_uri,
                        val_score=history[-1]["val_loss"], val_higher_is_better=False)


def compose_forecaster(spec: MethodSpec, role: str, members: dict[int, TrainedModel], seed: int,
                       ctx: tracking.RunContext, extra_tags: dict[str, Any] | None = None) -> TrainedModel:
    """Loads lead-time models from MLflow and logs them as one HierarchicalForecaster (the model a
    user loads: `forecaster(upper, surface, lead_hours)`), in a run that names its members."""
    from models.weather import HierarchicalForecaster
    forecaster = HierarchicalForecaster({lead: tracking.load_model(tm.model_uri, ctx) for lead, tm in members.items()})
    tags = {"method": spec.name, "role": role, "seed": seed, "leads": ",".join(map(str, sorted(members))),
            **{f"member_{lead}h_run_id": tm.run_id for lead, tm in members.items()}, **(extra_tags or {})}
    with tracking.run(ctx, f"{role}-forecaster-seed{seed}", tags=tags) as run_id:
        uri = tracking.log_model(forecaster, None)
    return TrainedModel(role=role, seed=seed, run_id=run_id, model_uri=uri,
                        val_score=float(np.mean([tm.val_score for tm in members.values()])),
                        val_higher_is_better=False)


def evaluate_forecasters(spec: MethodSpec, data_dir: str, forecasters: list[TrainedModel],
                         leads: list[int], ctx: tracking.RunContext, init_stride: int = 1) -> list[dict[str, Any]]:
    """Scores every forecaster (loaded back from MLflow) and every model-free baseline of the method
    (persistence, climatology) on the test split; each gets its metrics on its own run."""
    data = load_forecast_data(data_dir)
    device = torch.device("cpu")
    evaluations = []

    def record(role: str, seed: int, run_id: str, predict: Predictor) -> None:
        metrics = score(predict, data.test, data.norm, data.clim_phys, data.lat, leads, data.headline, init_stride)
        tracking.log_metrics(run_id, {f"test_{k}": v for k, v in metrics.items()}, ctx)
        evaluations.append({"role": role, "seed": seed, "run_id": run_id, "metrics": metrics})

    for tm in sorted(forecasters, key=lambda t: (t.role, t.seed)):
        record(tm.role, tm.seed, tm.run_id, model_predictor(tracking.load_model(tm.model_uri, ctx), data.test, device))
    clim_norm = data.norm.norm(*data.clim_phys)
    for role, predict in (("persistence", persistence_predictor(data.test)),
                          ("climatology", climatology_predictor(data.test, clim_norm))):
        if role in spec.baselines:
            with tracking.run(ctx, role, tags={"method": spec.name, "role": role, "seed": 0}) as run_id:
                pass
            record(role, 0, run_id, predict)
    return evaluations


def log_forecast_plots(evaluations: list[dict[str, Any]], data_dir: str, teacher: TrainedModel,
                       leads: list[int], ctx: tracking.RunContext) -> None:
    """On the parent run: RMSE against lead time per headline variable and role, and the teacher's
    forecast / truth / error maps at the longest lead for z500 and t2m."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load_forecast_data(data_dir)
    names = [h[0] for h in data.headline]
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
    mlflow_log_figure(fig, "rmse_vs_lead.png", ctx)
    plt.close(fig)

    lead = max(leads)
    k = lead_steps(lead, data.test.step_hours)
    idx = data.test.inits(k)[:1]
    if len(idx) == 0:
        return
    predict = model_predictor(tracking.load_model(teacher.model_uri, ctx), data.test, torch.device("cpu"))
    fu, fs = data.norm.denorm(*predict(idx, lead))
    tu, ts = data.norm.denorm(data.test.upper[idx + k], data.test.surface[idx + k])
    for name, kind, ch, lvl in data.headline:
        if name not in ("z500", "t2m"):
            continue
        f = (fu[0, ch, lvl] if kind == "upper" else fs[0, ch]).numpy()
        t = (tu[0, ch, lvl] if kind == "upper" else ts[0, ch]).numpy()
        fig, axes = plt.subplots(1, 3, figsize=(12, 3))
        for ax, (title, field) in zip(axes, (("forecast", f), ("truth", t), ("error", f - t))):
            im = ax.imshow(field, cmap="RdBu_r" if title == "error" else "viridis")
            ax.set_title(f"{name} {title} (+{lead} h)"); fig.colorbar(im, ax=ax, shrink=0.8)
        mlflow_log_figure(fig, f"maps/{name}_{lead}h.png", ctx)
        plt.close(fig)


def mlflow_log_figure(fig, artifact_file: str, ctx: tracking.RunContext) -> None:
    from mlflow.tracking import MlflowClient
    MlflowClient(ctx.tracking_uri).log_figure(ctx.parent_run_id, fig, artifact_file, save_kwargs={"dpi": 80})
