"""Bad input, one table: every stage and the method flow, one row per fault.

A row breaks one input (or params.yaml) of a stage whose earlier good run left its output in a work
directory, runs the stage's entry point (`cli_main(main, argv)`, what `python -m …` runs) and asserts:
exit status 1; exactly one line on stderr, naming the file (or params key) and the problem; no file
created, changed or left behind in the work directory (so no output, no temporary file, and the
earlier output byte-identical). A new stage adds a `Stage` and rows, not tests.

Rows run in-process (imports are paid once); `test_the_command_line_prints_that_line_alone` runs one
row per stage as a real `python -m` process, where warnings and logs would show.
"""
from __future__ import annotations

import errno
import gzip
import importlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import xarray as xr
import yaml

import flows.method  # noqa: F401  (see below)
from conftest import REPO, shared_file
import video_fixtures as vf  # noqa: E402  (tests/video_fixtures.py)
from tasks.platform.common import cli_main, hash_path

# flows.method is imported here, at collection, not inside a test under capsys: Prefect binds its
# console log handler to the sys.stderr it finds on import, and capsys closes its stream after the
# test, which broke every later in-process flow ("I/O operation on closed file", then a recursion).

UK_GRIB = "era5/xarray-data/era5-2mt-2019-03-uk.grib"


@dataclass(frozen=True)
class Stage:
    module: str
    argv: tuple[str, ...]
    output: str                          # what the earlier good run wrote (relative to the work dir)
    build: Callable[[Path], None]        # writes the good inputs and params.yaml, runs the stage once


@dataclass(frozen=True)
class Row:
    id: str
    stage: str
    fault: Callable[[Path], None]        # breaks an input or params.yaml in the work dir
    names: str                           # the line is "error: <names>…"
    problem: str                         # a regex the line must match after that


# ---------------------------------------------------------------------------------------------------
# stages and their good inputs

def write_params(work: Path, params: dict) -> None:
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def edit_params(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def fault(work: Path) -> None:
        params = yaml.safe_load((work / "params.yaml").read_text())
        edit(params)
        write_params(work, params)
    return fault


def run_ok(stage: Stage, work: Path) -> None:
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cli_main(importlib.import_module(stage.module).main, list(stage.argv))
    finally:
        os.chdir(cwd)


def build_digits(work: Path) -> None:
    from tasks.stages.digits import source_path
    (work / "src").mkdir()
    with gzip.open(source_path("sklearn"), "rt") as fh:
        (work / "src" / "digits.csv").write_text(fh.read())
    write_params(work, {"digits": {"source": "src/digits.csv", "split": {"val": 0.2, "test": 0.2}, "seed": 0}})


def small_era5(days: int = 2, levels=(850, 500), variables=("z", "t", "t2m", "msl")) -> xr.Dataset:
    from tasks.stages import era5_synthetic
    times = pd.date_range("2020-01-01", periods=days * 24, freq="h")
    return era5_synthetic.generate(times, 22.5, list(levels), list(variables), 0)


def build_download_netcdf(work: Path) -> None:
    (work / "src").mkdir()
    small_era5().to_netcdf(work / "src" / "era5.nc", engine="netcdf4")
    write_params(work, {"era5": {"t": {"source": "files", "files": {"paths": ["src/*.nc"]},
                                       "variables": ["z", "t", "t2m", "msl"]}}})


def build_download_grib(work: Path) -> None:
    (work / "src").mkdir()
    shutil.copy(shared_file(UK_GRIB), work / "src" / "uk.grib")
    write_params(work, {"era5": {"g": {"source": "files", "files": {"paths": ["src/*.grib"]},
                                       "variables": ["t2m"]}}})


PREPARE = {"variables": ["z", "t", "t2m", "msl"], "levels": [850, 500], "grid_deg": None,
           "split": {"val": 0.2, "test": 0.2}, "max_lead_hours": 6}


def build_prepare(work: Path) -> None:
    from tasks.stages import era5_download
    era5_download.write_store(small_era5(days=4), work / "data/era5/raw.zarr", "small synthetic")
    write_params(work, {"era5_prepare": {"t": PREPARE}})


def build_method(work: Path, templates: dict[str, Path]) -> None:
    """The repo's params.yaml, the digits and prepared ERA5 outputs above as the methods' data, and a
    report from an earlier run that a failed run must leave alone."""
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    shutil.copytree(templates["digits"] / "data/digits", work / "data/digits")
    shutil.copytree(templates["era5_prepare"] / "data/era5/prepared", work / "data/era5/default/prepared")
    (work / "metrics").mkdir()
    for method in ("hinton_kd", "pangu"):
        (work / "metrics" / f"{method}.json").write_text('{"earlier": "run"}\n')


def build_detection_method(work: Path, templates: dict[str, Path]) -> None:
    """The repo's params.yaml with the voxelize stage's output above as the detectors' data."""
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    shutil.copytree(templates["voxelize"] / PC_VOXELS, work / "data/pointcloud/default/voxels")
    (work / "metrics").mkdir()
    (work / "metrics" / "second.json").write_text('{"earlier": "run"}\n')


KITTI_FRAMES = ("000000", "000003")   # two real frames; the faults break 000003, read after 000000


def build_kitti(work: Path) -> None:
    for sub, ext in (("velodyne", "bin"), ("calib", "txt"), ("label_2", "txt")):
        (work / "src/kitti" / sub).mkdir(parents=True)
        for frame in KITTI_FRAMES:
            shutil.copy(shared_file(f"pointcloud/kitti/training/{sub}/{frame}.{ext}"), work / "src/kitti" / sub)


POINTCLOUD_PARAMS = {
    "scans": {"t": {"source": "generate", "generate": {
        "n_scenes": 3, "split": {"val": 0.34, "test": 0.34}, "beams": 32, "elevation_deg": [2.0, -24.8],
        "azimuth_step_deg": 2.0, "max_range": 80.0, "objects": {"Car": [2, 4], "Pedestrian": [0, 2]},
        "placement_range": [5.0, 30.0], "min_points": 5, "seed": 0}}},
    "voxelize": {"t": {"point_range": [0, -40, -3, 70.4, 40, 1], "voxel_size": [0.4, 0.4, 0.4],
                       "max_points": 5, "max_voxels": 8000}}}
PC_SCANS, PC_VOXELS = "data/pointcloud/t/scans", "data/pointcloud/t/voxels"


def build_voxelize(work: Path) -> None:
    from tasks.stages import scans
    write_params(work, POINTCLOUD_PARAMS)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        scans.build("t", PC_SCANS)
    finally:
        os.chdir(cwd)


STAGES: dict[str, Stage] = {
    "digits": Stage("tasks.stages.digits", ("data/digits",), "data/digits", build_digits),
    "download": Stage("tasks.stages.era5_download", ("--profile", "t", "data/era5/raw.zarr"), "data/era5/raw.zarr",
                      build_download_netcdf),
    "download_grib": Stage("tasks.stages.era5_download", ("--profile", "g", "data/era5/raw.zarr"),
                           "data/era5/raw.zarr", build_download_grib),
    "era5_prepare": Stage("tasks.stages.era5_prepare", ("--profile", "t", "data/era5/raw.zarr", "data/era5/prepared"),
                          "data/era5/prepared", build_prepare),
    # the method flow's entry point: params, declaration and inputs are checked before Prefect starts
    "hinton_kd": Stage("flows.method", ("hinton_kd",), "metrics/hinton_kd.json", None),
    "pangu": Stage("flows.method", ("pangu",), "metrics/pangu.json", None),
    "second": Stage("flows.method", ("second",), "metrics/second.json", None),
    # video (issue 12): the generator's params; the features stage's videos, extractors and params
    "videos": Stage("tasks.stages.videos", ("--profile", "t", vf.VIDEOS), vf.VIDEOS,
                    lambda work: (work / "params.yaml").write_text(yaml.safe_dump(vf.params()))),
    "video_features": Stage("tasks.stages.video_features", ("--profile", "t", vf.VIDEOS, vf.FEATURES), vf.FEATURES,
                            vf.build_videos),
    # the point-cloud readers' check command (issue 13): reads every KITTI frame, writes a summary
    "kitti": Stage("tasks.kinds.detection3d.io", ("src/kitti", "data/kitti_check.json"), "data/kitti_check.json",
                   build_kitti),
    # the point-cloud stages (issue 13): the generator's params; the voxelizer's scans and params
    "scans": Stage("tasks.stages.scans", ("--profile", "t", PC_SCANS), PC_SCANS,
                   lambda work: write_params(work, POINTCLOUD_PARAMS)),
    "voxelize": Stage("tasks.stages.voxelize", ("--profile", "t", PC_SCANS, PC_VOXELS), PC_VOXELS, build_voxelize),
}


# ---------------------------------------------------------------------------------------------------
# faults

def write_text(rel: str, text: str) -> Callable[[Path], None]:
    return lambda work: (work / rel).write_text(text)


def truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def fault(work: Path) -> None:
        data = (work / rel).read_bytes()
        (work / rel).write_bytes(data[:int(len(data) * keep)])
    return fault


def remove(rel: str) -> Callable[[Path], None]:
    def fault(work: Path) -> None:
        path = work / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return fault


def remove_one_chunk(store: str, var: str) -> Callable[[Path], None]:
    def fault(work: Path) -> None:
        chunks = sorted(p for p in (work / store / var / "c").rglob("*") if p.is_file())
        chunks[len(chunks) // 2].unlink()
    return fault


def garble_one_chunk(store: str, var: str) -> Callable[[Path], None]:
    def fault(work: Path) -> None:
        chunk = sorted(p for p in (work / store / var / "c").rglob("*") if p.is_file())[0]
        chunk.write_bytes(b"\x00garbage" * 8)
    return fault


def csv_cell(row: int, col: int, value: str) -> Callable[[Path], None]:
    def fault(work: Path) -> None:
        path = work / "src/digits.csv"
        lines = path.read_text().splitlines()
        cells = lines[row].split(",")
        cells[col] = value
        lines[row] = ",".join(cells)
        path.write_text("\n".join(lines) + "\n")
    return fault


def drop_csv_column(work: Path) -> None:
    path = work / "src/digits.csv"
    path.write_text("\n".join(",".join(line.split(",")[:-1]) for line in path.read_text().splitlines()) + "\n")


def gzip_then_truncate(work: Path) -> None:
    src = work / "src/digits.csv"
    data = gzip.compress(src.read_bytes())
    (work / "src/digits.csv.gz").write_bytes(data[:len(data) // 2])
    edit_params(lambda p: p["digits"].update(source="src/digits.csv.gz"))(work)


def edit_nc(edit: Callable[[xr.Dataset], xr.Dataset]) -> Callable[[Path], None]:
    def fault(work: Path) -> None:
        path = work / "src/era5.nc"
        ds = edit(xr.load_dataset(path))
        path.unlink()
        ds.to_netcdf(path, engine="netcdf4")
    return fault


def edit_raw(edit: Callable[[xr.Dataset], xr.Dataset]) -> Callable[[Path], None]:
    """A raw store as another tool (or an older download stage) might have written it: unchecked."""
    def fault(work: Path) -> None:
        path = work / "data/era5/raw.zarr"
        ds = edit(xr.open_zarr(path, consolidated=False).load())
        shutil.rmtree(path)
        for var in ds.variables.values():
            var.encoding = {}
        ds.to_zarr(path, mode="w", consolidated=False)
    return fault


def nan_field(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy(deep=True)
    ds["t2m"][-5] = np.nan
    return ds


def inf_value(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy(deep=True)
    ds["msl"][3, 1, 1] = np.inf
    return ds


def celsius_labelled_kelvin(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy(deep=True)
    ds["t2m"] = (ds["t2m"] - 273.15).assign_attrs(ds["t2m"].attrs)
    return ds


def units(var: str, value: str | None) -> Callable[[xr.Dataset], xr.Dataset]:
    def edit(ds: xr.Dataset) -> xr.Dataset:
        ds = ds.copy()
        ds[var].attrs.pop("units")
        if value is not None:
            ds[var].attrs["units"] = value
        return ds
    return edit


def duplicate_time(ds: xr.Dataset) -> xr.Dataset:
    return xr.concat([ds.isel(time=slice(0, 11)), ds.isel(time=slice(10, None))], "time")


def swap_times(ds: xr.Dataset) -> xr.Dataset:
    order = list(range(ds.sizes["time"]))
    order[20], order[21] = order[21], order[20]
    return ds.isel(time=order)


def gap_in_time(ds: xr.Dataset) -> xr.Dataset:
    return ds.drop_isel(time=[30])


def drop_var(var: str) -> Callable[[xr.Dataset], xr.Dataset]:
    return lambda ds: ds.drop_vars(var)


def second_file_on_another_grid(work: Path) -> None:
    ds = small_era5()[["t2m"]].rename(t2m="t2m_other")
    ds = ds.assign_coords(latitude=ds.latitude + 1.0).rename(t2m_other="msl")
    ds["msl"] = (ds["msl"] * 0 + 101325.0).assign_attrs(units="Pa")
    ds.to_netcdf(work / "src/era5_b.nc", engine="netcdf4")


def parquet_pixel(value: float) -> Callable[[Path], None]:
    def fault(work: Path) -> None:
        path = work / "data/digits/train.parquet"
        table = pq.read_table(path)
        df = table.to_pandas()
        df.loc[7, "px_10"] = value
        path.unlink()
        pq.write_table(type(table).from_pandas(df, schema=table.schema, preserve_index=False), path)
    return fault


def parquet_drop_column(work: Path) -> None:
    path = work / "data/digits/val.parquet"
    table = pq.read_table(path)
    path.unlink()
    pq.write_table(table.drop_columns(["px_63"]), path)


def set_key(dotted: str, value) -> Callable[[Path], None]:
    def edit(p: dict) -> None:
        *parents, last = dotted.split(".")
        node = p
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return edit_params(edit)


def append_bytes(rel: str, extra: bytes) -> Callable[[Path], None]:
    return lambda work: (work / rel).write_bytes((work / rel).read_bytes() + extra)


def poke_float(rel: str, point: int, column: int, value: float, features: int = 4) -> Callable[[Path], None]:
    def fault(work: Path) -> None:
        data = bytearray((work / rel).read_bytes())
        struct.pack_into("<f", data, (point * features + column) * 4, value)
        (work / rel).write_bytes(bytes(data))
    return fault


def edit_lines(rel: str, edit: Callable[[list[str]], list[str]]) -> Callable[[Path], None]:
    def fault(work: Path) -> None:
        path = work / rel
        path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    return fault


def drop_last_value(prefix: str) -> Callable[[list[str]], list[str]]:
    return lambda lines: [line.rsplit(" ", 1)[0] if line.startswith(prefix) else line for line in lines]


DELETE = object()
SRC_NC, RAW, PREP = "src/era5.nc", "data/era5/raw.zarr", "data/era5/default/prepared"
VIDEO = f"{vf.VIDEOS}/video_0001.mp4"
SCAN, CALIB, LABEL = "src/kitti/velodyne/000003.bin", "src/kitti/calib/000003.txt", "src/kitti/label_2/000003.txt"

ROWS = [
    # digits: the source CSV and params
    Row("digits-zero-byte", "digits", write_text("src/digits.csv", ""), "src/digits.csv", "empty"),
    Row("digits-truncated-gzip", "digits", gzip_then_truncate, "src/digits.csv.gz", "not a readable digits CSV"),
    Row("digits-html-not-csv", "digits", write_text("src/digits.csv", "<html><body>Not found</body></html>\n"),
        "src/digits.csv", "not a readable digits CSV"),
    Row("digits-column-missing", "digits", drop_csv_column, "src/digits.csv", "expected 65 columns .* found 64"),
    Row("digits-nan-pixel", "digits", csv_cell(5, 3, "nan"), "src/digits.csv", r"non-finite values in rows \[5\]"),
    Row("digits-pixel-above-16", "digits", csv_cell(11, 20, "17"), "src/digits.csv",
        r"px_20: .*outside \[0, 16\].* row 11"),
    Row("digits-negative-pixel", "digits", csv_cell(12, 7, "-1"), "src/digits.csv", r"px_07: .*outside \[0, 16\].* row 12"),
    Row("digits-label-10", "digits", csv_cell(3, 64, "10"), "src/digits.csv", r"label: 1 value.* not in the allowed set .*10 at row 3"),
    Row("digits-source-missing", "digits", remove("src/digits.csv"), "src/digits.csv", "source file not found"),
    Row("digits-params-val-negative", "digits", set_key("digits.split.val", -0.1), "params.yaml",
        "digits.split.val: must be > 0"),
    Row("digits-params-seed-missing", "digits", set_key("digits.seed", DELETE), "params.yaml",
        "digits.seed: required, missing"),
    # era5_download, files source: netCDF
    Row("nc-zero-byte", "download", write_text(SRC_NC, ""), SRC_NC, "not a GRIB or netCDF file"),
    Row("nc-truncated", "download", truncate(SRC_NC), SRC_NC, "unreadable netcdf file"),
    Row("nc-html-error-page", "download", write_text(SRC_NC, "<!DOCTYPE html><title>503</title>"), SRC_NC,
        "not a GRIB or netCDF file"),
    Row("nc-nan-field", "download", edit_nc(nan_field), SRC_NC,
        r"t2m: NaN or inf in 1 time step\(s\), first 2020-01-02T19:00"),
    Row("nc-inf-value", "download", edit_nc(inf_value), SRC_NC, r"msl: NaN or inf in 1 time step\(s\), first 2020-01-01T03:00"),
    Row("nc-celsius-labelled-kelvin", "download", edit_nc(celsius_labelled_kelvin), SRC_NC,
        r"t2m: values span -.* K, outside the physical \[170, 340\]"),
    Row("nc-units-missing", "download", edit_nc(units("t2m", None)), SRC_NC, "t2m: wrong units: no `units` attribute"),
    Row("nc-units-wrong", "download", edit_nc(units("msl", "furlongs")), SRC_NC, "msl: wrong units 'furlongs'"),
    Row("nc-time-duplicated", "download", edit_nc(duplicate_time), SRC_NC,
        r"time axis: time step 11 \(2020-01-01T10:00\) repeats step 10"),
    Row("nc-time-not-monotonic", "download", edit_nc(swap_times), SRC_NC,
        r"time step 21 \(2020-01-01T20:00\) is 1 h before step 20 \(2020-01-01T21:00\)"),
    Row("nc-time-gap", "download", edit_nc(gap_in_time), SRC_NC,
        r"time step 30 \(2020-01-02T07:00\) is 2 h after step 29 \(2020-01-02T05:00\), expected 1 h"),
    Row("nc-variable-missing", "download", edit_nc(drop_var("msl")), SRC_NC, r"missing requested variables \['msl'\]"),
    Row("nc-files-on-two-grids", "download", second_file_on_another_grid, "src/era5.nc, src/era5_b.nc",
        "cannot merge"),
    Row("download-params-source", "download", set_key("era5.t.source", "ftp"), "params.yaml", "era5.t.source"),
    Row("download-params-no-match", "download", set_key("era5.t.files.paths", ["src/*.grb"]), "src/*.grb",
        "no file matches"),
    # era5_download, files source: GRIB (the real UK sample)
    Row("grib-truncated", "download_grib", truncate("src/uk.grib", 0.7), "src/uk.grib", "truncated or corrupt GRIB after"),
    Row("grib-zero-byte", "download_grib", write_text("src/uk.grib", ""), "src/uk.grib", "no GRIB messages found"),
    Row("grib-html-named-grib", "download_grib", write_text("src/uk.grib", "<html>quota exceeded</html>"),
        "src/uk.grib", "no GRIB messages found"),
    # era5_prepare: the raw store and params
    Row("raw-chunk-missing", "era5_prepare", remove_one_chunk(RAW, "t2m"), RAW, r"chunks missing from t2m \(1 of"),
    Row("raw-chunk-garbled", "era5_prepare", garble_one_chunk(RAW, "z"), RAW, "z: unreadable chunk"),
    Row("raw-group-metadata-missing", "era5_prepare", remove(f"{RAW}/zarr.json"), RAW, "not a readable Zarr store"),
    Row("raw-variable-metadata-missing", "era5_prepare", remove(f"{RAW}/msl/zarr.json"), RAW,
        r"missing variable\(s\) \['msl'\]"),
    Row("raw-nan-field", "era5_prepare", edit_raw(nan_field), RAW,
        r"test split failed validation .*t2m has NaN in 1 time steps, first 2020-01-04T19:00"),
    Row("raw-celsius-labelled-kelvin", "era5_prepare", edit_raw(celsius_labelled_kelvin), RAW,
        r"train split failed validation .*t2m spans .* outside \[170, 340\]"),
    Row("raw-time-gap", "era5_prepare", edit_raw(gap_in_time), RAW,
        r"train split failed validation .*time step 30 \(2020-01-02T07:00\) is 2 h after step 29"),
    Row("raw-time-duplicated", "era5_prepare", edit_raw(duplicate_time), RAW, r"time step 11 \(2020-01-01T10:00\) repeats"),
    Row("raw-level-missing", "era5_prepare", set_key("era5_prepare.t.levels", [850, 250]), RAW,
        r"missing level\(s\) \[250\]"),
    Row("prepare-params-grid-zero", "era5_prepare", set_key("era5_prepare.t.grid_deg", 0), "params.yaml",
        "era5_prepare.t.grid_deg: must be > 0"),
    Row("prepare-params-split", "era5_prepare", set_key("era5_prepare.t.split", {"val": 0.6, "test": 0.5}),
        "params.yaml", "era5_prepare.t.split: need 0 < val, test and val \\+ test < 1"),
    # the method flow: its prepared inputs, checked before Prefect starts
    Row("prepared-chunk-missing", "pangu", remove_one_chunk(f"{PREP}/train.zarr", "z"), f"{PREP}/train.zarr",
        r"chunks missing from z \(1 of"),
    Row("prepared-meta-missing", "pangu", remove(f"{PREP}/meta.json"), f"{PREP}/meta.json", "not found"),
    Row("prepared-stats-corrupt", "pangu", truncate(f"{PREP}/stats.json"), f"{PREP}/stats.json", "not valid JSON"),
    Row("prepared-split-missing", "pangu", remove(f"{PREP}/val.zarr/zarr.json"), f"{PREP}/val.zarr",
        "not a readable Zarr store"),
    Row("parquet-truncated", "hinton_kd", truncate("data/digits/train.parquet"), "data/digits/train.parquet",
        "not a readable Parquet file"),
    Row("parquet-pixel-out-of-range", "hinton_kd", parquet_pixel(99.0), "data/digits/train.parquet",
        r"px_10: .*outside \[0, 16\].* row 7"),
    Row("parquet-column-missing", "hinton_kd", parquet_drop_column, "data/digits/val.parquet", "wrong schema"),
    Row("detector-voxels-truncated", "second", truncate("data/pointcloud/default/voxels/frames/000001.npz"),
        "data/pointcloud/default/voxels/frames/000001.npz", "not a readable voxel file"),
    Row("detector-summary-missing", "second", remove("data/pointcloud/default/voxels/summary.json"),
        "data/pointcloud/default/voxels/summary.json", "not found"),
    Row("detector-params-widths", "second", set_key("methods.second.teacher.model", {"widths": [8, 8]}),
        "params.yaml", r"methods.second.teacher.model: widths: the stem's and 2 stages', 3 values, got \(8, 8\)"),
    Row("detector-params-unknown-option", "second", set_key("methods.second.teacher.model", {"depth": 3}),
        "params.yaml", r"methods.second.teacher.model: unknown detector options \['depth'\]"),
    Row("method-params-lr", "hinton_kd", set_key("methods.hinton_kd.teacher.lr", -0.003), "params.yaml",
        "methods.hinton_kd.teacher.lr: must be > 0, got -0.003"),
    Row("method-params-loss-term", "hinton_kd", set_key("methods.hinton_kd.loss.kdd", {"weight": 1.0}), "params.yaml",
        r"loss.kdd: not a loss term of hinton_kd"),
    # videos: the generator's params
    Row("videos-params-fps-zero", "videos", set_key("video.t.generate.fps", 0), "params.yaml",
        "video.t.generate.fps: must be > 0"),
    Row("videos-params-unknown-class", "videos", set_key("video.t.generate.classes", ["purple_blob_dance"]),
        "params.yaml", r"video.t.generate.classes: unknown \['purple_blob_dance'\]"),
    Row("videos-params-no-source-section", "videos", set_key("video.t.generate", DELETE), "params.yaml",
        "video.t: source generate needs a `generate:` section"),
    # video_features: one video file broken (the others' features exist and are kept), or params
    Row("video-truncated-mp4", "video_features", truncate(VIDEO, 0.6), VIDEO,
        r"not a readable video \(truncated, or not a video container\)"),
    Row("video-truncated-avi", "video_features", lambda w: vf.truncated_avi(w / VIDEO), VIDEO,
        "truncated: .* of the 40 frames the container lists decode"),
    Row("video-zero-byte", "video_features", write_text(VIDEO, ""), VIDEO, r"empty file \(0 bytes\)"),
    Row("video-zero-frames", "video_features", lambda w: vf.zero_frames(w / VIDEO), VIDEO,
        "zero frames: the video stream holds no decodable frame"),
    Row("video-audio-only", "video_features", lambda w: vf.audio_only(w / VIDEO), VIDEO,
        r"no video stream \(streams: audio\)"),
    Row("video-unknown-codec", "video_features", lambda w: vf.unknown_codec(w / VIDEO), VIDEO,
        "unknown or unsupported video codec"),
    Row("video-html-not-a-video", "video_features", write_text(VIDEO, "<html><body>404</body></html>"), VIDEO,
        "not a readable video"),
    Row("video-above-max-resolution", "video_features", set_key("video_features.t.max_resolution", [32, 32]),
        f"{vf.VIDEOS}/video_0000.mp4", "resolution 48x48 exceeds video_features.t.max_resolution 32x32"),
    Row("video-file-missing", "video_features", remove(VIDEO), VIDEO, "video file not found"),
    Row("video-manifest-missing", "video_features", remove(f"{vf.VIDEOS}/manifest.json"),
        f"{vf.VIDEOS}/manifest.json", r"not found \(run `dvc repro videos`\)"),
    Row("video-annotation-unknown-label", "video_features",
        edit_lines(f"{vf.VIDEOS}/annotations.json", lambda ls: [l.replace('"red_square_slide"', '"red_squares"') for l in ls]),
        f"{vf.VIDEOS}/annotations.json", r"video video_\d+: unknown label 'red_squares'"),
    Row("video-checkpoint-missing", "video_features", remove(f"{vf.EXTRACTORS}/cbp.pt"), f"{vf.EXTRACTORS}/cbp.pt",
        r"checkpoint of extractor cbp \(small_c3d\) not found"),
    Row("video-checkpoint-other-extractor", "video_features",
        lambda w: shutil.copy(w / vf.EXTRACTORS / "vlp.pt", w / vf.EXTRACTORS / "cbp.pt"), f"{vf.EXTRACTORS}/cbp.pt",
        r"cannot load extractor cbp \(small_c3d\): checkpoint holds extractor 'small_clip'"),
    Row("video-params-on-bad-video", "video_features", set_key("video_features.t.on_bad_video", "ignore"),
        "params.yaml", "video_features.t.on_bad_video: must be one of"),
    Row("video-params-extractor-key", "video_features", set_key("video_features.t.extractors.flow", {"name": "i3d"}),
        "params.yaml", "video_features.t: extractors must name exactly cbp and vlp"),
    # point clouds (issue 13): KITTI scans, calibration and labels
    Row("kitti-scan-partial-point", "kitti", append_bytes(SCAN, b"\0" * 6), SCAN,
        r"size 1809766 bytes is not a multiple of the 16-byte point \(4 float32\)"),
    Row("kitti-scan-empty", "kitti", write_text(SCAN, ""), SCAN, "empty scan: no points"),
    Row("kitti-scan-nan", "kitti", poke_float(SCAN, 10, 1, float("nan")), SCAN,
        r"non-finite values \(NaN or inf\) in 1 point\(s\), first at point 10 column 1"),
    Row("kitti-scan-inf", "kitti", poke_float(SCAN, 5, 2, float("-inf")), SCAN,
        r"non-finite values .* first at point 5 column 2"),
    Row("kitti-calib-missing", "kitti", remove(CALIB), CALIB, "not found"),
    Row("kitti-calib-key-missing", "kitti", edit_lines(CALIB, lambda ls: [x for x in ls if "Tr_velo_to_cam" not in x]),
        CALIB, "missing Tr_velo_to_cam"),
    Row("kitti-calib-short-row", "kitti", edit_lines(CALIB, drop_last_value("R0_rect")), CALIB,
        "line 5: R0_rect: expected 9 values, found 8"),
    Row("kitti-calib-not-a-number", "kitti", edit_lines(CALIB, lambda ls: [x.replace("P2: 7.", "P2: 7,") for x in ls]),
        CALIB, "line 3: P2: not a number: '7,215377000000e\\+02'"),
    Row("kitti-label-missing", "kitti", remove(LABEL), LABEL, "not found"),
    Row("kitti-label-short-line", "kitti", edit_lines(LABEL, drop_last_value("Car")), LABEL,
        "line 1: expected 15 fields \\(16 with a score\\), found 14"),
    Row("kitti-label-not-a-number", "kitti", edit_lines(LABEL, lambda ls: [x.replace(" 13.22 ", " 13,22 ") for x in ls]),
        LABEL, "line 1: not a number: '13,22'"),
    Row("kitti-label-unknown-type", "kitti", edit_lines(LABEL, lambda ls: [x.replace("Car ", "car ", 1) for x in ls]),
        LABEL, "line 1: unknown object type 'car'"),
    # scans: the generator's params
    Row("scans-params-azimuth-step-zero", "scans", set_key("scans.t.generate.azimuth_step_deg", 0), "params.yaml",
        r"scans.t.generate.azimuth_step_deg: must be > 0.05, got 0"),
    Row("scans-params-placement-beyond-range", "scans", set_key("scans.t.generate.placement_range", [5, 120]),
        "params.yaml", r"scans.t.generate: placement_range must be \[near, far\] with 2 <= near < far <= max_range"),
    Row("scans-params-no-source-section", "scans", set_key("scans.t.generate", DELETE), "params.yaml",
        "scans.t: source generate needs a `generate:` section"),
    # voxelize: the scans it reads, and its grid
    Row("voxelize-params-grid-not-a-multiple", "voxelize", set_key("voxelize.t.voxel_size", [0.3, 0.3, 0.3]),
        "params.yaml", r"voxelize.t: point_range's x extent 70.4 m is not a multiple of voxel_size 0.3 m"),
    Row("voxelize-params-max-points-zero", "voxelize", set_key("voxelize.t.max_points", 0), "params.yaml",
        "voxelize.t.max_points: must be > 0, got 0"),
    Row("voxelize-scan-partial-point", "voxelize", append_bytes(f"{PC_SCANS}/training/velodyne/000001.bin", b"\0" * 6),
        f"{PC_SCANS}/training/velodyne/000001.bin", r"is not a multiple of the 16-byte point"),
    Row("voxelize-label-missing", "voxelize", remove(f"{PC_SCANS}/training/label_2/000002.txt"),
        f"{PC_SCANS}/training/label_2/000002.txt", "not found"),
    Row("voxelize-manifest-missing", "voxelize", remove(f"{PC_SCANS}/manifest.json"), f"{PC_SCANS}/manifest.json",
        r"not found \(run `dvc repro scans`\)"),
    Row("voxelize-real-frames-missing", "voxelize", set_key("voxelize.t.real_frames", "no/such/kitti"), "no/such/kitti",
        r"not found \(params.yaml: voxelize.t.real_frames\)"),
]


# ---------------------------------------------------------------------------------------------------
# the table

@pytest.fixture(scope="module")
def templates(tmp_path_factory, monkeypatch_module) -> dict[str, Path]:
    """Each stage's work directory after one good run (the methods' is assembled from the others)."""
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    out: dict[str, Path] = {}
    for name, stage in STAGES.items():
        if stage.build is None:
            continue
        work = tmp_path_factory.mktemp(name)
        stage.build(work)
        run_ok(stage, work)
        assert (work / stage.output).exists()
        out[name] = work
    for method in ("hinton_kd", "pangu"):
        work = tmp_path_factory.mktemp(method)
        build_method(work, out)
        out[method] = work
    out["second"] = tmp_path_factory.mktemp("second")
    build_detection_method(out["second"], out)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def snapshot(work: Path) -> dict[str, tuple[int, int]]:
    """Every path with its size and mtime (a directory's mtime changes when a temporary output in it
    comes and goes, so directories count by name only)."""
    return {str(p.relative_to(work)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (0, 0)
            for p in sorted(work.rglob("*"))}


def work_copy(templates: dict[str, Path], row: Row, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(templates[row.stage], work, symlinks=True)
    row.fault(work)
    return work


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_exits_1_with_one_line_and_writes_nothing(row, templates, tmp_path, monkeypatch, capsys):
    stage = STAGES[row.stage]
    work = work_copy(templates, row, tmp_path)
    before, output_hash = snapshot(work), hash_path(work / stage.output)
    monkeypatch.chdir(work)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(importlib.import_module(stage.module).main, list(stage.argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"error: {row.names}: "
    assert lines[0].startswith(prefix), lines[0]
    assert re.search(row.problem, lines[0][len(prefix):]), lines[0]
    assert snapshot(work) == before  # no output, no temporary file, nothing touched
    assert hash_path(work / stage.output) == output_hash


# one row per stage as a real process: warnings or log lines would show on its stderr
CLI_ROWS = ["digits-pixel-above-16", "nc-time-gap", "grib-truncated", "raw-nan-field", "prepared-chunk-missing",
            "parquet-pixel-out-of-range", "videos-params-fps-zero", "video-truncated-avi", "kitti-scan-nan"]


@pytest.mark.parametrize("row", [r for r in ROWS if r.id in CLI_ROWS], ids=CLI_ROWS)
def test_the_command_line_prints_that_line_alone(row, templates, tmp_path):
    stage = STAGES[row.stage]
    work = work_copy(templates, row, tmp_path)
    before = snapshot(work)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", stage.module, *stage.argv], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {row.names}: "), proc.stderr
    assert snapshot(work) == before


def test_the_table_covers_every_stage_with_enough_rows():
    assert {r.stage for r in ROWS} == set(STAGES)
    assert len(ROWS) >= 30
    assert len({r.id for r in ROWS}) == len(ROWS)
    json.dumps([r.id for r in ROWS])  # ids are plain strings (pytest node ids, README table)


# ---------------------------------------------------------------------------------------------------
# resources: a full disk while writing (simulated at the stage's writer: the library call that writes
# the output fails halfway with ENOSPC) and a read-only output folder (real)

def disk_full(obj, target, *args, **kwargs):
    """Stands in for `write_table(table, where)`, `Dataset.to_zarr(self, store)` and `_to_zarr(ds, path)`:
    leaves half a file where it was told to write, then fails as a full disk does."""
    target = Path(target)
    if target.suffix == ".parquet":
        target.write_bytes(b"PAR1\0\0")
    else:
        target.mkdir(parents=True, exist_ok=True)
        (target / "zarr.json").write_bytes(b'{"zarr_format": 3, "node')
    raise OSError(errno.ENOSPC, "No space left on device", str(target))


DISK_FULL = {  # stage -> (object, attribute) of the call that writes its output
    "digits": ("pyarrow.parquet", "write_table"),
    "download": ("xarray.Dataset", "to_zarr"),
    "era5_prepare": ("tasks.stages.era5_prepare", "_to_zarr"),
}


def _resolve(dotted: str):
    module, _, attr = dotted.rpartition(".")
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError:
        return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("stage_name", list(DISK_FULL))
def test_a_full_disk_is_one_line_and_leaves_the_previous_output(stage_name, templates, tmp_path, monkeypatch,
                                                                capsys):
    stage = STAGES[stage_name]
    work = tmp_path / "work"
    shutil.copytree(templates[stage_name], work, symlinks=True)
    before, output_hash = snapshot(work), hash_path(work / stage.output)
    owner, attr = DISK_FULL[stage_name]
    monkeypatch.setattr(_resolve(owner), attr, disk_full)
    monkeypatch.chdir(work)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(importlib.import_module(stage.module).main, list(stage.argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {stage.output}: cannot write: No space left on device"), err
    assert snapshot(work) == before
    assert hash_path(work / stage.output) == output_hash


def read_only(folder: Path, cmd: list[str]) -> list[str]:
    """`cmd` with `folder` read-only. As a user: without write bits. As root, which ignores them: a
    read-only bind mount over it, in a mount namespace of the command's own (so nothing outside sees it)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return cmd
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(folder), *cmd]


@pytest.mark.parametrize("stage_name", ["digits", "download", "era5_prepare"])
def test_a_read_only_output_folder_is_one_line_and_leaves_the_previous_output(stage_name, templates, tmp_path):
    stage = STAGES[stage_name]
    work = tmp_path / "work"
    shutil.copytree(templates[stage_name], work, symlinks=True)
    folder = (work / stage.output).parent
    before, output_hash = snapshot(work), hash_path(work / stage.output)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["PYTHONPATH"] = str(REPO)
    try:
        proc = subprocess.run(read_only(folder, [sys.executable, "-m", stage.module, *stage.argv]), cwd=work,
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        folder.chmod(0o755)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert re.match(f"error: {stage.output}: cannot write: (Permission denied|Read-only file system)", lines[0]), lines
    assert snapshot(work) == before
    assert hash_path(work / stage.output) == output_hash
