"""params.yaml, validated by one typed schema when it is read.

Every entry point reads its parameters through `load_params`, so a wrong value fails in a second with
one line naming the file and the key path, before anything trains or any MLflow run opens:

    params.yaml: methods.hinton_kd.teacher.lr: must be > 0, got -0.003

The stage sections keep their own defaults in the stage code (`era5`, `era5_prepare`); the schema
checks what is written. The method sections are typed configs the train loop reads directly.
What needs the method registry (loss terms, claim roles, models) is checked by `tasks.methods.resolve`.
"""
from __future__ import annotations

import contextlib
import os
from datetime import date, datetime
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .common import StageError

PARAMS_FILE = "params.yaml"
PROFILED = ("era5", "era5_prepare", "video", "video_features", "scans", "voxelize")   # one entry per profile (`*_profiles`)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------------
# methods

class ParallelParams(Section):
    """`methods.<m>.<role>.parallel`: data parallelism (tasks/train/distributed.py). With nproc > 1 the
    role trains under torchrun, one process per device; the global batch stays `batch_size`."""
    nproc: int = Field(1, ge=1, le=64)                   # processes on this machine (GPUs on a GPU worker)
    backend: Literal["auto", "gloo", "nccl"] = "auto"    # auto: nccl on CUDA, gloo on CPU
    comm_hook: Literal["allreduce", "terngrad"] = "allreduce"  # how gradient buckets are exchanged
    clip_sigmas: float = Field(2.5, gt=0)                # terngrad: clip each layer's gradient at c * std


class TrainParams(Section):
    """How one role trains: `methods.<m>.teacher` / `methods.<m>.student`."""
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)           # sgd only
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)                  # linear warm-up before the schedule
    grad_clip: Optional[float] = Field(None, gt=0)      # max global grad norm; None: no clipping
    # "bf16": training forward passes under torch.autocast in bfloat16, as the full profile trains on
    # GPU workers; weights, gradients, optimizer state and validation stay float32
    precision: Literal["fp32", "bf16"] = "fp32"
    # a frozen teacher's outputs computed once per training sample and reused every epoch: only
    # valid when a sample's input is the same every epoch (no augmentation)
    cache_teacher: bool = False
    checkpoint_every: int = Field(0, ge=0)              # optimizer steps between checkpoints; 0: none
    # validate after every N-th epoch and the last: validation changes nothing in training (eval mode,
    # no RNG draws), it only costs time, a quarter of a Pangu-lite epoch at one step an epoch
    val_every: int = Field(1, ge=1)
    model: dict[str, Any] = Field(default_factory=dict)  # kwargs of the model entrypoint
    parallel: Optional[ParallelParams] = None            # None: one process


class MethodParams(Section):
    """`methods.<name>`: one method's data, seeds and budgets."""
    kind: str                      # the kind that runs it; with `models`, picks its code for DVC (dvc.yaml)
    models: str                    # the models/ family of its teacher and student, e.g. vision
    data: str                      # the prepared data (an output of a DVC stage)
    seeds: list[int] = Field(min_length=1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    teacher: TrainParams
    student: Optional[TrainParams] = None
    loss: dict[str, dict[str, Any]] = Field(default_factory=dict)   # overrides of the declared loss terms
    eval_leads: Optional[list[int]] = None                          # forecast: lead hours scored

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"must be distinct non-negative integers, got {seeds}")
        return seeds

    @field_validator("eval_leads")
    @classmethod
    def _positive(cls, leads: Optional[list[int]]) -> Optional[list[int]]:
        if leads is not None and (not leads or min(leads) <= 0):
            raise ValueError(f"must be positive lead hours, got {leads}")
        return leads


# ---------------------------------------------------------------------------------------------------
# stages

class TrackingParams(Section):
    tracking_uri: str = "sqlite:///mlflow.db"   # MLFLOW_TRACKING_URI takes precedence
    artifact_root: str = "mlartifacts"


class DigitsSplit(Section):
    val: float = Field(gt=0, lt=1)
    test: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _room_for_train(self) -> "DigitsSplit":
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be < 1, got {self.val} + {self.test}")
        return self


class DigitsParams(Section):
    source: str
    split: DigitsSplit
    seed: int = Field(ge=0)


class SyntheticParams(Section):
    grid_deg: Optional[float] = Field(None, gt=0)
    seed: Optional[int] = Field(None, ge=0)


class ArcoParams(Section):
    url: Optional[str] = None
    storage_options: Optional[dict[str, Any]] = None
    area: Optional[list[float]] = Field(None, min_length=4, max_length=4)
    chunks: Optional[dict[str, int]] = None


class CdsParams(Section):
    area: Optional[list[float]] = Field(None, min_length=4, max_length=4)
    data_format: Optional[Literal["netcdf", "grib"]] = None
    ensemble_member: Union[int, Literal["mean", "all"], None] = None


class FilesParams(Section):
    paths: list[str] = Field(min_length=1)
    ensemble_member: Union[int, Literal["mean", "all"], None] = None


class Era5Params(Section):
    """`era5.<profile>`: the download stage."""
    source: Literal["synthetic", "arco", "cds", "files"]
    start: Union[str, date, datetime, None] = None   # YAML reads an unquoted 2020-01-01 as a date
    end: Union[str, date, datetime, None] = None
    n_days: Optional[Union[int, float]] = Field(None, gt=0)
    step_hours: Optional[int] = Field(None, gt=0)
    levels: Optional[list[Union[int, float]]] = None   # ints stay ints: they name coordinates
    variables: Optional[list[str]] = None
    synthetic: Optional[SyntheticParams] = None
    arco: Optional[ArcoParams] = None
    cds: Optional[CdsParams] = None
    files: Optional[FilesParams] = None

    @model_validator(mode="after")
    def _source_section(self) -> "Era5Params":
        if self.source == "files" and self.files is None:
            raise ValueError("source files needs a `files:` section with `paths`")
        if self.source != "files" and not (self.start and (self.n_days or self.end)):
            raise ValueError(f"source {self.source} needs `start` and `n_days` or `end`")
        return self


class Era5PrepareParams(Section):
    """`era5_prepare.<profile>`: the preparation stage."""
    variables: Optional[list[str]] = None
    levels: Optional[list[Union[int, float]]] = None   # ints stay ints: they name coordinates
    grid_deg: Optional[float] = Field(None, gt=0)   # None: keep the source grid
    split: Optional[dict[str, Any]] = None
    max_lead_hours: Optional[int] = Field(None, gt=0)
    embargo_hours: Optional[int] = Field(None, ge=0)
    dask: Union[Literal["auto"], bool, None] = None
    dask_above_mb: Optional[float] = Field(None, gt=0)
    # where Dask runs when it is used: null (threads), "local:N", "tcp://host:port";
    # $DASK_SCHEDULER_ADDRESS takes precedence (tasks/platform/dask_cluster.py)
    cluster: Optional[str] = None

    @field_validator("cluster", mode="before")
    @classmethod
    def _cluster(cls, value: Any) -> Optional[str]:
        from .dask_cluster import check
        return check(value)


class VideoSplit(Section):
    val: float = Field(gt=0, lt=1)
    test: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _room_for_train(self) -> "VideoSplit":
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be < 1, got {self.val} + {self.test}")
        return self


class VideoGenerateParams(Section):
    """`video.<profile>.generate`: the synthetic labelled set (tasks/stages/video_synthetic.py)."""
    n_videos: int = Field(gt=0)
    split: VideoSplit
    fps: int = Field(gt=0, le=120)
    size: int = Field(ge=16, le=512)                 # square frames, pixels (even: yuv420p)
    duration_s: list[float] = Field(min_length=2, max_length=2)   # [min, max] seconds
    instances: list[int] = Field(min_length=2, max_length=2)      # [min, max] action instances per video
    classes: Optional[list[str]] = None              # names from video_synthetic.CLASSES; None: all
    pretrain_clips_per_class: int = Field(gt=0)
    pretrain_clip_frames: int = Field(gt=0)
    background_clips: int = Field(ge=0)
    codec: Optional[Literal["libx264", "mpeg4"]] = None   # None: libx264 if FFmpeg has it, else mpeg4
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _ranges(self) -> "VideoGenerateParams":
        if not 0 < self.duration_s[0] <= self.duration_s[1]:
            raise ValueError(f"duration_s must be [min, max] with 0 < min <= max, got {self.duration_s}")
        if not 1 <= self.instances[0] <= self.instances[1]:
            raise ValueError(f"instances must be [min, max] with 1 <= min <= max, got {self.instances}")
        if self.size % 2:
            raise ValueError(f"size must be even (yuv420p), got {self.size}")
        return self


class VideoFilesParams(Section):
    paths: list[str] = Field(min_length=1)


class Thumos14Params(Section):
    annotations: str                                  # folder of <Class>_val.txt / <Class>_test.txt
    videos: Optional[str] = None                      # folder of the raw videos; None: features precomputed
    val_fraction: float = Field(0.1, ge=0, lt=1)      # THUMOS val videos held out as our val split
    durations: Optional[dict[str, float]] = None      # video -> seconds; default: its last segment's end
    seed: int = Field(0, ge=0)


class VideoParams(Section):
    """`video.<profile>`: the videos stage."""
    source: Literal["generate", "files", "thumos14"]
    generate: Optional[VideoGenerateParams] = None
    files: Optional[VideoFilesParams] = None
    thumos14: Optional[Thumos14Params] = None

    @model_validator(mode="after")
    def _source_section(self) -> "VideoParams":
        if getattr(self, self.source) is None:
            raise ValueError(f"source {self.source} needs a `{self.source}:` section")
        return self


class ExtractorParams(Section):
    """`video_features.<profile>.extractors.<cbp|vlp>`: a registered extractor (models/video_encoders.py)."""
    name: str
    checkpoint: Optional[str] = None                  # local weights; None: random init (tests only)
    frames: Optional[int] = Field(None, gt=0)         # frame encoders: frames embedded per snippet; None: all
    kwargs: dict[str, Any] = Field(default_factory=dict)


class VideoPretrainParams(Section):
    """`video_features.<profile>.pretrain`: the video_extractors stage (small CBP and VLP)."""
    cbp_epochs: int = Field(gt=0)
    vlp_epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    val_fraction: float = Field(0.2, ge=0, lt=1)      # pretraining clips held out to report accuracy
    seed: int = Field(0, ge=0)


class PrecomputedParams(Section):
    """Per-video feature arrays `<root>/<thumos subset>/<video>.npy` (T, D), one root per feature key."""
    roots: dict[str, str]
    fps: float = Field(gt=0)                          # frame rate the snippets were cut at
    snippet_frames: int = Field(gt=0)
    stride: int = Field(gt=0)


class VideoFeaturesParams(Section):
    """`video_features.<profile>`: the video_features stage."""
    source: Literal["decode", "precomputed"] = "decode"
    extractors: dict[str, ExtractorParams] = Field(default_factory=dict)
    text_embeddings: Optional[str] = None             # prompt embeddings (video_extractors' text.parquet or .npy)
    frame_size: int = Field(64, ge=8)                 # decode: short side resized to this, centre crop
    snippet_frames: int = Field(8, gt=0)
    stride: int = Field(8, gt=0)
    batch_snippets: int = Field(32, gt=0)
    queue_batches: int = Field(4, gt=0)               # decoded batches waiting for the extractors
    max_resolution: Optional[list[int]] = Field(None, min_length=2, max_length=2)   # [width, height]
    on_bad_video: Literal["error", "skip"] = "error"
    device: str = Field("cpu", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: Optional[int] = Field(None, gt=0)        # torch intra-op threads; None: torch's default
    pretrain: Optional[VideoPretrainParams] = None
    precomputed: Optional[PrecomputedParams] = None

    @model_validator(mode="after")
    def _keys(self) -> "VideoFeaturesParams":
        if self.source == "decode" and sorted(self.extractors) != ["cbp", "vlp"]:
            raise ValueError(f"extractors must name exactly cbp and vlp, got {sorted(self.extractors)}")
        if self.source == "precomputed" and self.precomputed is None:
            raise ValueError("source precomputed needs a `precomputed:` section")
        return self


# ---------------------------------------------------------------------------------------------------
# point clouds (issue 13): the scans and voxelize stages

class ScansGenerateParams(Section):
    """`scans.<profile>.generate`: KITTI-format scenes ray-cast by a simulated spinning LiDAR."""
    n_scenes: int = Field(gt=0)
    split: VideoSplit                                 # {val, test} fractions of the scenes
    beams: int = Field(64, gt=1, le=256)
    elevation_deg: list[float] = Field(min_length=2, max_length=2)   # [top, bottom] beam, degrees
    azimuth_step_deg: float = Field(gt=0.05, le=10)   # horizontal resolution: rays = beams * 360 / step
    sensor_height: float = Field(1.73, gt=0, le=5)    # metres above the ground plane
    max_range: float = Field(80.0, gt=1, le=250)
    range_noise: float = Field(0.02, ge=0, le=0.5)    # std of the range, metres
    dropout: float = Field(0.05, ge=0, lt=1)          # fraction of returns lost at random
    objects: dict[Literal["Car", "Pedestrian", "Cyclist"], list[int]]   # class -> [min, max] per scene
    placement_range: list[float] = Field(min_length=2, max_length=2)   # [near, far] metres, object centres
    half_fov_deg: float = Field(38.0, gt=0, le=45)    # objects within the camera's view: |azimuth| <= this
    min_points: int = Field(5, ge=1)                  # fewer LiDAR points inside: not labelled
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _ranges(self) -> "ScansGenerateParams":
        top, bottom = self.elevation_deg
        if not -90 < bottom < top < 90:
            raise ValueError(f"elevation_deg must be [top, bottom] with -90 < bottom < top < 90, got "
                             f"{self.elevation_deg}")
        near, far = self.placement_range
        if not 2 <= near < far <= self.max_range:
            raise ValueError(f"placement_range must be [near, far] with 2 <= near < far <= max_range, got "
                             f"{self.placement_range}")
        for cls, counts in self.objects.items():
            if len(counts) != 2 or not 0 <= counts[0] <= counts[1]:
                raise ValueError(f"objects.{cls} must be [min, max] with 0 <= min <= max, got {self.objects[cls]}")
        return self


class ScansFilesParams(Section):
    """`scans.<profile>.files`: real KITTI frames under a `training/`-like root (velodyne/, calib/, label_2/)."""
    root: str
    frames: Optional[list[str]] = None               # frame ids; None: every scan under velodyne/
    split: Literal["train", "val", "test"] = "val"


class ScansParams(Section):
    """`scans.<profile>`: the scans stage."""
    source: Literal["generate", "files"]
    generate: Optional[ScansGenerateParams] = None
    files: Optional[ScansFilesParams] = None

    @model_validator(mode="after")
    def _source_section(self) -> "ScansParams":
        if getattr(self, self.source) is None:
            raise ValueError(f"source {self.source} needs a `{self.source}:` section")
        return self


class VoxelizeParams(Section):
    """`voxelize.<profile>`: hard voxelization of every scan (models/voxelize.py)."""
    point_range: list[float] = Field(min_length=6, max_length=6)   # x0 y0 z0 x1 y1 z1, LiDAR frame, metres
    voxel_size: list[float] = Field(min_length=3, max_length=3)    # dx dy dz, metres
    max_points: int = Field(gt=0, le=256)             # points kept per voxel
    max_voxels: int = Field(gt=0)                     # voxels kept per frame (first-appearance order)
    features: Literal["mean", "first"] = "mean"
    # a KITTI `training` folder whose frames are voxelized too, as split `real`: scored, never trained on
    real_frames: Optional[str] = None

    @model_validator(mode="after")
    def _grid(self) -> "VoxelizeParams":
        if min(self.voxel_size) <= 0:
            raise ValueError(f"voxel_size must be > 0 on every axis, got {self.voxel_size}")
        for axis, name in enumerate("xyz"):
            extent = self.point_range[3 + axis] - self.point_range[axis]
            if extent <= 0:
                raise ValueError(f"point_range: {name}1 must be > {name}0, got {self.point_range}")
            cells = extent / self.voxel_size[axis]
            if abs(cells - round(cells)) > 1e-4 * max(1.0, cells):
                raise ValueError(f"point_range's {name} extent {extent:g} m is not a multiple of voxel_size "
                                 f"{self.voxel_size[axis]:g} m ({cells:.4g} cells)")
        return self


class Params(Section):
    tracking: TrackingParams = TrackingParams()
    digits: Optional[DigitsParams] = None
    era5_profiles: list[str] = Field(default_factory=list)
    era5: dict[str, Era5Params] = Field(default_factory=dict)
    era5_prepare: dict[str, Era5PrepareParams] = Field(default_factory=dict)
    video_profiles: list[str] = Field(default_factory=list)
    video: dict[str, VideoParams] = Field(default_factory=dict)
    video_features: dict[str, VideoFeaturesParams] = Field(default_factory=dict)
    pointcloud_profiles: list[str] = Field(default_factory=list)
    scans: dict[str, ScansParams] = Field(default_factory=dict)
    voxelize: dict[str, VoxelizeParams] = Field(default_factory=dict)
    methods: dict[str, MethodParams] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _profiles_exist(self) -> "Params":
        for profile in self.era5_profiles:
            for section in ("era5", "era5_prepare"):
                if profile not in getattr(self, section):
                    raise ValueError(f"profile {profile!r} has no section {section}.{profile}")
        for profile in self.video_profiles:
            for section in ("video", "video_features"):
                if profile not in getattr(self, section):
                    raise ValueError(f"profile {profile!r} has no section {section}.{profile}")
        for profile in self.pointcloud_profiles:
            for section in ("scans", "voxelize"):
                if profile not in getattr(self, section):
                    raise ValueError(f"profile {profile!r} has no section {section}.{profile}")
        return self


# ---------------------------------------------------------------------------------------------------
# loading

def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    """Reads and validates the whole file; StageError naming the file and the first bad key."""
    path = Path(path)
    if not path.is_file():
        raise StageError(path, "params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise StageError(path, f"not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise StageError(path, f"expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise StageError(path, describe(e.errors()[0])) from None


def stage_params(section: str, profile: str | None = None, path: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    """A stage's section (`<section>` or `<section>.<profile>`) as written, after validation."""
    params = load_params(path)
    value = getattr(params, section, None)
    if profile is None and section in PROFILED:
        raise StageError("command line", f"--profile NAME is required: {section} has one section per profile")
    if profile is not None:
        if not isinstance(value, dict) or profile not in value:
            raise StageError(path, f"{section}: no profile {profile!r}; profiles: {sorted(value or {})}")
        value = value[profile]
    if value is None:
        raise StageError(path, f"has no section {section!r}")
    return value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else value


def pop_profile(argv: list[str], required_by: str | None = None) -> tuple[str | None, list[str]]:
    """`--profile NAME` from a stage's arguments: (NAME or None, the other arguments). With
    `required_by` (a params section that has one entry per profile) a missing --profile is an error."""
    if "--profile" not in argv:
        if required_by:
            raise StageError("command line", f"--profile NAME is required: {required_by} has one section per profile")
        return None, argv
    i = argv.index("--profile")
    if i + 1 >= len(argv):
        raise StageError("command line", "--profile needs a name")
    return argv[i + 1], argv[:i] + argv[i + 2:]


@contextlib.contextmanager
def naming_profile(section: str, profile: str | None) -> Iterator[None]:
    """Stage code names params keys as `<section>.<key>`; with a profile the key is
    `<section>.<profile>.<key>`, and that is what an error must say."""
    try:
        yield
    except StageError as e:
        if profile and e.path == PARAMS_FILE and e.problem.startswith(section) \
                and not e.problem.startswith(f"{section}.{profile}"):
            raise StageError(e.path, f"{section}.{profile}{e.problem[len(section):]}") from None
        raise


def describe(error: dict[str, Any]) -> str:
    """One pydantic error as `key.path: what is wrong, got <value>`."""
    where = ".".join(str(p) for p in error["loc"])
    kind, ctx, got = error["type"], error.get("ctx") or {}, error.get("input")
    num = lambda v: f"{v:g}" if isinstance(v, (int, float)) else str(v)
    messages = {
        "greater_than": f"must be > {num(ctx.get('gt'))}", "greater_than_equal": f"must be >= {num(ctx.get('ge'))}",
        "less_than": f"must be < {num(ctx.get('lt'))}", "less_than_equal": f"must be <= {num(ctx.get('le'))}",
        "missing": "required, missing", "extra_forbidden": "unknown key",
        "literal_error": f"must be one of {ctx.get('expected')}",
        "too_short": f"needs at least {ctx.get('min_length')} item(s)",
        "string_pattern_mismatch": f"must match {ctx.get('pattern')}",
    }
    message = messages.get(kind) or str(ctx.get("error") or error["msg"]).removeprefix("Value error, ")
    message = message[0].lower() + message[1:] if message else message
    if kind in ("missing", "extra_forbidden", "value_error") or isinstance(got, dict):
        return f"{where or 'top level'}: {message}"
    return f"{where}: {message}, got {got!r}"
