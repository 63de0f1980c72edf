"""DVC stage `videos`: the video set of a profile -> a folder with `manifest.json` (+ files).

    python -m tasks.stages.videos --profile NAME [OUT_DIR]     # params: params.yaml › video › NAME
                                                              # OUT_DIR default data/video/<NAME>/videos

Sources (`video.<profile>.source`):
  generate  labelled synthetic action videos written as real mp4 files (PyAV, libx264 else mpeg4;
            tasks/stages/video_synthetic.py): `<video_id>.mp4`, ActivityNet-format `annotations.json`,
            and the extractors' pretraining set `pretrain/` (trimmed clips per class, background clips,
            `pretrain.json` with the class prompts)
  files     real video files named in params: a manifest of paths and sha256, no labels (subset
            `unlabelled`); the files are not copied
  thumos14  THUMOS14 annotations (`<Class>_val.txt` / `<Class>_test.txt`, lines `video start end`) ->
            `annotations.json`; videos are THUMOS val (train, less a held-out `val_fraction`: val) and
            test (test); `videos:` a folder of the raw videos (`<video>.mp4`), optional when the
            features are precomputed (video_features `source: precomputed`)

`manifest.json`: {"source", "classes": [{"name", "prompt"}], "videos": [{"video_id", "path" (relative to
the manifest's folder, or absolute), "sha256" (null when not read), "subset"}], "annotations": file or
null}. `annotations.json` (ActivityNet): {"database": {video_id: {"subset": training | validation |
testing, "duration": s, "annotations": [{"segment": [start, end], "label": class name}]}}}.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..platform.common import StageError, atomic_dir, stage_main, read_json, write_json
from ..platform.params import naming_profile, pop_profile, stage_params
from . import video_synthetic as synth
from .video_io import encoder_name, sha256_file, write_video

ACTIVITYNET_SUBSETS = {"train": "training", "val": "validation", "test": "testing", "unlabelled": "unlabelled"}
FROM_ACTIVITYNET = {v: k for k, v in ACTIVITYNET_SUBSETS.items()} | {k: k for k in ACTIVITYNET_SUBSETS}
VIDEO_ID = re.compile(r"[^A-Za-z0-9_.-]")


def out_dir_for(profile: str) -> str:
    return f"data/video/{profile}/videos"


def video_id(path: str | Path) -> str:
    return VIDEO_ID.sub("_", Path(path).stem)


def split_subsets(n: int, val: float, test: float, rng: np.random.Generator) -> list[str]:
    n_test, n_val = round(n * test), round(n * val)
    subsets = ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)
    return [subsets[i] for i in rng.permutation(n)]


# ---------------------------------------------------------------------------------------------------
# generate

def generate(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """Writes the localization videos, their annotations and the pretraining set into `out`."""
    names = cfg.get("classes") or [c.name for c in synth.CLASSES]
    unknown = [n for n in names if n not in synth.BY_NAME]
    if unknown:
        raise StageError("params.yaml", f"video.generate.classes: unknown {unknown} (known: {list(synth.BY_NAME)})")
    classes = tuple(synth.BY_NAME[n] for n in names)
    fps, size, seed = int(cfg["fps"]), int(cfg["size"]), int(cfg.get("seed", 0))
    lo, hi = cfg["duration_s"]
    codec = cfg.get("codec") or encoder_name()
    rng = np.random.default_rng(seed)
    subsets = split_subsets(int(cfg["n_videos"]), cfg["split"]["val"], cfg["split"]["test"], rng)
    database, videos = {}, []
    for i, subset in enumerate(subsets):
        vid = f"video_{i:04d}"
        n_frames = int(round(rng.uniform(lo, hi) * fps))
        instances = synth.plan_video(rng, classes, n_frames, fps, size, max_instances=int(cfg["instances"][1]),
                                     min_instances=int(cfg["instances"][0]))
        count = write_video(out / f"{vid}.mp4", synth.render_video(instances, classes, n_frames, fps, size, seed * 100003 + i),
                            fps, codec)
        assert count == n_frames
        database[vid] = {"subset": ACTIVITYNET_SUBSETS[subset], "duration": round(n_frames / fps, 6),
                         "resolution": f"{size}x{size}", "url": "",
                         "annotations": [{"segment": [round(s.start / fps, 6), round(s.end / fps, 6)],
                                          "label": classes[s.cls].name,
                                          # the generator's ground truth beyond ActivityNet's fields:
                                          # frames the object is visible (still, then moving, then still)
                                          "frames": {"appear": s.appear, "start": s.start, "end": s.end,
                                                     "vanish": s.vanish}} for s in instances]}
        videos.append({"video_id": vid, "path": f"{vid}.mp4", "sha256": sha256_file(out / f"{vid}.mp4"),
                       "subset": subset})
    write_json(out / "annotations.json", {"version": "distillery-synthetic-1", "database": database})
    pretrain = write_pretrain(cfg, classes, out / "pretrain", codec)
    class_list = [{"name": c.name, "prompt": c.prompt} for c in classes]
    return {"source": "generate", "codec": codec, "fps": fps, "size": size, "classes": class_list,
            "videos": videos, "annotations": "annotations.json", "pretrain": pretrain}


def write_pretrain(cfg: dict[str, Any], classes: tuple[synth.ActionClass, ...], out: Path, codec: str) -> str:
    """Trimmed clips per class (half in the class's own look) and background clips."""
    out.mkdir()
    fps, size, seed = int(cfg["fps"]), int(cfg["size"]), int(cfg.get("seed", 0))
    n_frames, per_class = int(cfg["pretrain_clip_frames"]), int(cfg["pretrain_clips_per_class"])
    clips = []
    k = 0
    for label, cls in enumerate(classes):
        for j in range(per_class):
            canonical = j % 2 == 0
            name = f"{cls.name}_{j:03d}.mp4"
            write_video(out / name, synth.render_clip(cls, n_frames, fps, size, 7_000_003 + seed * 1009 + k, canonical),
                        fps, codec)
            clips.append({"file": name, "label": label, "canonical": canonical})
            k += 1
    for j in range(int(cfg["background_clips"])):
        name = f"background_{j:03d}.mp4"
        write_video(out / name, synth.render_clip(None, n_frames, fps, size, 9_000_011 + seed * 1009 + j, False),
                    fps, codec)
        clips.append({"file": name, "label": None, "canonical": False})
    write_json(out / "pretrain.json", {"classes": [{"name": c.name, "prompt": c.prompt} for c in classes],
                                       "background_prompts": list(synth.BACKGROUND_PROMPTS), "fps": fps,
                                       "clips": clips})
    return "pretrain/pretrain.json"


# ---------------------------------------------------------------------------------------------------
# files (real clips, unlabelled)

def list_files(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    videos, seen = [], {}
    for p in cfg["paths"]:
        path = Path(p)
        if not path.is_file():
            raise StageError(path, "video file not found")
        vid = video_id(path)
        if vid in seen:
            raise StageError(path, f"video id {vid!r} is also {seen[vid]}'s: rename one")
        seen[vid] = p
        videos.append({"video_id": vid, "path": os.path.relpath(path.resolve(), out.resolve()),
                       "sha256": sha256_file(path), "subset": "unlabelled"})
    return {"source": "files", "classes": [], "videos": videos, "annotations": None}


# ---------------------------------------------------------------------------------------------------
# THUMOS14

def class_prompt(name: str) -> str:
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower()
    return f"a video of a person doing {words}"


def read_thumos_annotations(folder: Path) -> tuple[list[str], dict[str, list[tuple[str, float, float, str]]]]:
    """THUMOS14 temporal annotations: `<Class>_<subset>.txt` files of `video_name start end` lines.
    Returns the class names (sorted; `Ambiguous` is not a class) and per THUMOS subset (val | test) the
    (video, start, end, class) rows."""
    if not folder.is_dir():
        raise StageError(folder, "THUMOS14 annotation folder not found")
    rows: dict[str, list[tuple[str, float, float, str]]] = {"val": [], "test": []}
    names = set()
    files = sorted(folder.glob("*_*.txt"))
    for path in files:
        m = re.fullmatch(r"(.+)_(val|test)\.txt", path.name)
        if not m or m.group(1) == "Ambiguous":
            continue
        name, subset = m.groups()
        names.add(name)
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                vid, start, end = parts[0], float(parts[1]), float(parts[2])
                if len(parts) != 3:
                    raise ValueError
            except (ValueError, IndexError):
                raise StageError(path, f"line {n}: expected `video_name start end`, got {line.strip()!r}") from None
            if not (0 <= start < end):
                raise StageError(path, f"line {n}: segment {start:g}-{end:g} s is empty or negative")
            rows[subset].append((vid, start, end, name))
    if not names:
        raise StageError(folder, "no THUMOS14 annotation files (<Class>_val.txt / <Class>_test.txt)")
    return sorted(names), rows


def thumos14(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    names, rows = read_thumos_annotations(Path(cfg["annotations"]))
    durations = cfg.get("durations") or {}
    rng = np.random.default_rng(int(cfg.get("seed", 0)))
    val_vids = sorted({r[0] for r in rows["val"]})
    n_val = round(len(val_vids) * float(cfg.get("val_fraction", 0.1)))
    held = set(rng.permutation(val_vids)[:n_val].tolist()) if n_val else set()
    subset_of = {v: ("val" if v in held else "train") for v in val_vids} | {v: "test" for v in {r[0] for r in rows["test"]}}
    videos_dir = Path(cfg["videos"]) if cfg.get("videos") else None
    database, videos = {}, []
    for vid in sorted(subset_of):
        segs = [r for r in rows["val"] + rows["test"] if r[0] == vid]
        path = None
        if videos_dir is not None:
            matches = sorted(videos_dir.glob(f"{vid}.*"))
            if not matches:
                raise StageError(videos_dir, f"no video file for {vid}")
            path = os.path.relpath(matches[0].resolve(), out.resolve())
        duration = float(durations.get(vid, max(e for _, _, e, _ in segs)))
        database[vid] = {"subset": ACTIVITYNET_SUBSETS[subset_of[vid]], "duration": duration,
                         "annotations": [{"segment": [s, e], "label": c} for _, s, e, c in segs]}
        videos.append({"video_id": vid, "path": path, "sha256": None, "subset": subset_of[vid]})
    write_json(out / "annotations.json", {"version": "thumos14", "database": database})
    return {"source": "thumos14", "classes": [{"name": n, "prompt": class_prompt(n)} for n in names],
            "videos": videos, "annotations": "annotations.json"}


# ---------------------------------------------------------------------------------------------------
# reading (video_features, video_extractors)

def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    manifest = read_json(path, "run `dvc repro videos`")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("videos"), list):
        raise StageError(path, "expected {\"videos\": [...], ...}")
    return manifest


def video_path(folder: str | Path, entry: dict[str, Any]) -> Path | None:
    return None if entry.get("path") is None else Path(folder) / entry["path"]


def read_annotations(folder: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """ActivityNet-format annotations by video id ({} when the set has none)."""
    if not manifest.get("annotations"):
        return {}
    path = Path(folder) / manifest["annotations"]
    try:
        database = json.loads(path.read_text())["database"]
    except FileNotFoundError:
        raise StageError(path, "not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise StageError(path, f"not ActivityNet-format JSON ({{\"database\": {{...}}}}): {e}") from None
    names = {c["name"] for c in manifest["classes"]}
    for vid, entry in database.items():
        for a in entry.get("annotations", []):
            if a.get("label") not in names:
                raise StageError(path, f"video {vid}: unknown label {a.get('label')!r}")
            s, e = a["segment"]
            if not 0 <= s < e:
                raise StageError(path, f"video {vid}: segment {s:g}-{e:g} s is empty or negative")
    return database


# ---------------------------------------------------------------------------------------------------

def build(profile: str, out_dir: str | Path) -> dict[str, Any]:
    cfg = stage_params("video", profile)
    source = cfg["source"]
    with atomic_dir(out_dir) as tmp:
        if source == "generate":
            manifest = generate(cfg["generate"], tmp)
        elif source == "files":
            manifest = list_files(cfg["files"], tmp)
        else:
            manifest = thumos14(cfg["thumos14"], tmp)
        write_json(tmp / "manifest.json", manifest)
    return manifest


def main(argv: list[str]) -> None:
    profile, rest = pop_profile(argv, required_by="video")
    out_dir = rest[0] if rest else out_dir_for(profile)
    with naming_profile("video", profile):
        manifest = build(profile, out_dir)
    print(f"videos: wrote {out_dir} ({manifest['source']}: {len(manifest['videos'])} videos)")


if __name__ == "__main__":
    stage_main(main)
