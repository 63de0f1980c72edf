"""DVC stage `video_features`: videos -> the localization features directory
(the contract: tasks/kinds/localization/schema.py).

    python -m tasks.stages.video_features --profile NAME VIDEOS_DIR OUT_DIR
        # params: params.yaml › video_features › NAME; VIDEOS_DIR: the videos stage's output

source `decode`: each video is decoded by PyAV in a producer thread (FFmpeg's own threads decode;
frames are resized to `frame_size` and cut into snippets of `snippet_frames` every `stride` frames)
and handed in batches of `batch_snippets` through a bounded queue (`queue_batches`) to the extractors
(CBP on whole snippets, VLP on `frames` evenly spaced frames of each): decoding the next batch overlaps
the extraction of this one, and memory holds at most the queued batches, whatever a video's length.
source `precomputed`: per-video arrays `<root>/<thumos subset>/<video>.npy` (T, D) per feature key.

Outputs (OUT_DIR): classes.parquet, videos.parquet, segments.parquet, snippets/<video_id>.parquet (each
validated with the contract's Great Expectations suite, then written atomically), report.json (per
video: extracted | skipped-existing | skipped-bad with the reason, frames, fps, seconds).

Resume: a snippet file whose metadata names the same extraction settings (`distillery.extract_sha256`)
and the same source file (`distillery.source_sha256`) is kept and its video skipped; another settings
hash or a changed file re-extracts it. Files of videos no longer listed are removed at the end.

Bad videos (unreadable, truncated, no video stream, zero frames, unknown codec, above `max_resolution`):
`on_bad_video: error` stops with one line naming the file, before any output changes when the probe
finds it (every video is probed first); `skip` leaves the video out and names it in report.json.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from ..kinds.localization import schema
from ..platform.common import StageError, stage_main, write_json
from ..platform.params import naming_profile, pop_profile, stage_params
from ..platform.progress import progress_bar
from .video_extractors import read_text_embeddings
from .video_io import BadVideo, iter_frames, iter_snippets, probe, sha256_file, snippet_count, snippet_times
from .videos import FROM_ACTIVITYNET, read_annotations, read_manifest, video_path

SOURCE_HASH_KEY = b"distillery.source_sha256"
EXTRACT_VERSION = 1  # bump when the extraction code changes what it computes


# ---------------------------------------------------------------------------------------------------
# settings and resume

def extract_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything a snippet's features depend on, besides the video itself."""
    if cfg.get("source", "decode") == "precomputed":
        return {"version": EXTRACT_VERSION, "source": "precomputed", **cfg["precomputed"]}
    exts = {}
    for key in schema.FEATURE_KEYS:
        e = cfg["extractors"][key]
        ckpt = e.get("checkpoint")
        if ckpt and not Path(ckpt).is_file():
            raise StageError(ckpt, f"checkpoint of extractor {key} ({e['name']}) not found")
        exts[key] = {"name": e["name"], "kwargs": e.get("kwargs", {}), "frames": e.get("frames"),
                     "checkpoint_sha256": sha256_file(ckpt) if ckpt else None}
    return {"version": EXTRACT_VERSION, "source": "decode", "frame_size": cfg.get("frame_size", 64),
            "snippet_frames": cfg.get("snippet_frames", 8), "stride": cfg.get("stride", 8),
            "precision": cfg.get("precision", "fp32"), "extractors": exts}


def settings_hash(settings: dict[str, Any]) -> str:
    import hashlib
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def existing(path: Path, extract_hash: str, source_hash: str) -> int | None:
    """The snippet count of a complete snippet file written with these settings from this source."""
    import pyarrow.parquet as pq
    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError):
        return None
    kv = meta.metadata or {}
    if kv.get(schema.EXTRACT_HASH_KEY, b"").decode() != extract_hash or \
            kv.get(SOURCE_HASH_KEY, b"").decode() != source_hash:
        return None
    return meta.num_rows


# ---------------------------------------------------------------------------------------------------
# extractors

def pick_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class Extractors:
    """The CBP and VLP models and how a batch of uint8 snippets becomes their features."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        import torch

        from models.video_encoders import create_extractor, load_extractor
        self.device = torch.device(pick_device(cfg.get("device", "cpu")))
        self.bf16 = cfg.get("precision", "fp32") == "bf16"
        self.models, self.frames = {}, {}
        for key in schema.FEATURE_KEYS:
            e = cfg["extractors"][key]
            try:
                net = (load_extractor(e["name"], e["checkpoint"], **e.get("kwargs", {})) if e.get("checkpoint")
                       else create_extractor(e["name"], **e.get("kwargs", {})).eval())
            except (KeyError, ValueError, RuntimeError, OSError) as err:
                raise StageError(e.get("checkpoint") or "params.yaml",
                                 f"cannot load extractor {key} ({e['name']}): {str(err).splitlines()[0]}") from None
            self.models[key] = net.to(self.device)
            self.frames[key] = e.get("frames")
        self.dims = {k: m.spec.dim for k, m in self.models.items()}

    def __call__(self, snippets: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (B, N, H, W, 3) -> {key: (B, D) float32}."""
        import torch
        import torch.nn.functional as F

        from models.video_encoders import snippet_features
        x = torch.from_numpy(snippets).to(self.device, non_blocking=True)
        b, n, h, w, _ = x.shape
        x = x.permute(0, 4, 1, 2, 3).float().div_(255)  # (B, 3, N, H, W)
        out = {}
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            for key, net in self.models.items():
                spec = net.spec
                y = x
                if spec.size != h:
                    y = F.interpolate(y.transpose(1, 2).reshape(b * n, 3, h, w), size=(spec.size, spec.size),
                                      mode="area" if spec.size < h else "bilinear")
                    y = y.reshape(b, n, 3, spec.size, spec.size).transpose(1, 2)
                mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1, 1)
                std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1, 1)
                out[key] = snippet_features(net, (y - mean) / std, self.frames[key]).float().cpu().numpy()
        return out


# ---------------------------------------------------------------------------------------------------
# decode in a producer thread, extract in the caller's

_DONE = object()


def produce(jobs: list[tuple[str, Path, float]], cfg: dict[str, Any], q: "queue.Queue", stop: threading.Event) -> None:
    """Puts ("batch", vid, uint8 array), ("end", vid, n_frames) or ("bad", vid, BadVideo) per video, then _DONE."""
    size, n, stride, bs = cfg.get("frame_size", 64), cfg.get("snippet_frames", 8), cfg.get("stride", 8), \
        cfg.get("batch_snippets", 32)

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for vid, path, _ in jobs:
            counter = {"frames": 0}

            def counted() -> Iterator[np.ndarray]:
                for f in iter_frames(path, size):
                    counter["frames"] += 1
                    yield f
            batch: list[np.ndarray] = []
            try:
                for snip in iter_snippets(counted(), n, stride):
                    batch.append(snip)
                    if len(batch) == bs:
                        if not put(("batch", vid, np.stack(batch))):
                            return
                        batch = []
                if batch and not put(("batch", vid, np.stack(batch))):
                    return
                if not put(("end", vid, counter["frames"])):
                    return
            except BadVideo as e:
                if not put(("bad", vid, e)):
                    return
    except BaseException as e:  # surfaced in the consumer
        put(("crash", None, e))
    finally:
        put(_DONE)


def snippet_table(vid: str, feats: dict[str, np.ndarray], starts: np.ndarray, ends: np.ndarray,
                  dims: dict[str, int], extract_hash: str, source_hash: str) -> pa.Table:
    cols = {"video_id": pa.array([vid] * len(starts), pa.string()),
            "snippet": pa.array(np.arange(len(starts), dtype=np.int32)),
            "t_start": pa.array(starts.astype(np.float32)), "t_end": pa.array(ends.astype(np.float32))}
    for k in schema.FEATURE_KEYS:
        values = np.ascontiguousarray(feats[k], dtype=np.float32).reshape(-1)
        cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(values), dims[k])
    meta = {schema.EXTRACT_HASH_KEY: extract_hash.encode(), SOURCE_HASH_KEY: source_hash.encode()}
    return pa.table(cols).cast(schema.snippets_schema(dims).with_metadata(meta))


def write_snippets(out: Path, table: pa.Table) -> None:
    vid = table["video_id"][0].as_py()
    path = schema.snippet_path(out, vid)
    schema.validate_snippets(table, str(path))
    schema.write_table(table, path)


def extract_decoded(jobs: list[tuple[str, Path, float]], cfg: dict[str, Any], out: Path, extract_hash: str,
                    source_hashes: dict[str, str], report: dict[str, dict[str, Any]], on_bad: str) -> dict[str, int]:
    """Runs the producer/consumer over `jobs` (vid, path, fps); returns the snippet count per video done."""
    extractors = Extractors(cfg)
    n, stride = cfg.get("snippet_frames", 8), cfg.get("stride", 8)
    fps_of = {vid: fps for vid, _, fps in jobs}
    q: queue.Queue = queue.Queue(maxsize=cfg.get("queue_batches", 4))
    stop = threading.Event()
    producer = threading.Thread(target=produce, args=(jobs, cfg, q, stop), name="video-decode", daemon=True)
    done: dict[str, int] = {}
    parts: dict[str, list[dict[str, np.ndarray]]] = {}
    started: dict[str, float] = {}
    decoded: dict[str, int] = {}  # snippets so far, per video
    # one step per video; the postfix counts the current one's snippets, so a long video shows progress
    bar = progress_bar(total=len(jobs), desc="video features", unit="video")
    producer.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                break
            kind, vid, payload = item
            if kind == "crash":
                raise payload
            started.setdefault(vid, time.perf_counter())
            if kind == "batch":
                parts.setdefault(vid, []).append(extractors(payload))
                decoded[vid] = decoded.get(vid, 0) + len(payload)
                bar.set_postfix_str(f"{vid}: {decoded[vid]} snippets")
            elif kind == "bad":
                parts.pop(vid, None)
                bar.update()
                if on_bad == "error":
                    raise StageError(payload.path, payload.problem)
                report[vid] = {"status": "skipped-bad", "reason": payload.problem}
            else:  # end
                batches = parts.pop(vid)
                feats = {k: np.concatenate([p[k] for p in batches]) for k in schema.FEATURE_KEYS}
                starts, ends = snippet_times(payload, n, stride, fps_of[vid])
                assert len(starts) == len(feats["cbp"]) == snippet_count(payload, n, stride)
                write_snippets(out, snippet_table(vid, feats, starts, ends, extractors.dims, extract_hash,
                                                  source_hashes[vid]))
                seconds = time.perf_counter() - started[vid]
                report[vid] = {"status": "extracted", "frames": payload, "snippets": len(starts),
                               "fps": fps_of[vid], "seconds": round(seconds, 3),
                               "frames_per_second": round(payload / max(seconds, 1e-9), 1)}
                done[vid] = len(starts)
                bar.update()
    finally:
        bar.close()
        stop.set()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                producer.join(timeout=0.05)
    return done


def extract_precomputed(entries: list[dict[str, Any]], cfg: dict[str, Any], out: Path, extract_hash: str,
                        thumos_subset: dict[str, str], report: dict[str, dict[str, Any]]) -> dict[str, int]:
    pc = cfg["precomputed"]
    done = {}
    for e in progress_bar(entries, desc="video features (precomputed)", unit="video"):
        vid = e["video_id"]
        arrays, hashes = {}, []
        for k in schema.FEATURE_KEYS:
            path = Path(pc["roots"][k]) / thumos_subset[vid] / f"{vid}.npy"
            if not path.is_file():
                raise StageError(path, f"precomputed {k} features not found")
            try:
                a = np.load(path, allow_pickle=False)
            except ValueError as err:
                raise StageError(path, f"not a readable .npy array: {err}") from None
            if a.ndim != 2 or not len(a):
                raise StageError(path, f"expected a (T, D) array, got shape {a.shape}")
            arrays[k] = a
            hashes.append(sha256_file(path))
        t = min(len(a) for a in arrays.values())  # streams may differ by a snippet at the end
        source_hash = settings_hash({"files": hashes})
        target = schema.snippet_path(out, vid)
        if target.is_file() and existing(target, extract_hash, source_hash) == t:
            report[vid] = {"status": "skipped-existing", "snippets": t}
            done[vid] = t
            continue
        starts = np.arange(t) * pc["stride"] / pc["fps"]
        ends = starts + pc["snippet_frames"] / pc["fps"]
        write_snippets(out, snippet_table(vid, {k: a[:t] for k, a in arrays.items()}, starts, ends,
                                          {k: a.shape[1] for k, a in arrays.items()}, extract_hash, source_hash))
        report[vid] = {"status": "extracted", "snippets": t, "fps": pc["fps"]}
        done[vid] = t
    return done


# ---------------------------------------------------------------------------------------------------
# the tables

def class_table(classes: list[dict[str, str]], text: dict[str, np.ndarray], source: str) -> pa.Table:
    missing = [c["prompt"] for c in classes if c["prompt"] not in text]
    if missing:
        raise StageError(source, f"no text embedding for prompt(s) {missing[:3]}")
    dim = len(next(iter(text.values()))) if text else 1
    emb = np.stack([text[c["prompt"]] for c in classes]).astype(np.float32) if classes else np.zeros((0, dim), np.float32)
    return pa.table({"class_id": pa.array(np.arange(len(classes), dtype=np.int32)),
                     "name": pa.array([c["name"] for c in classes], pa.string()),
                     "prompt": pa.array([c["prompt"] for c in classes], pa.string()),
                     "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)})


def build(profile: str, videos_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    cfg = stage_params("video_features", profile)
    videos_dir, out = Path(videos_dir), Path(out_dir)
    manifest = read_manifest(videos_dir)
    database = read_annotations(videos_dir, manifest)
    classes = manifest.get("classes") or []
    class_id = {c["name"]: i for i, c in enumerate(classes)}
    if cfg.get("text_embeddings"):
        text = read_text_embeddings(cfg["text_embeddings"])
        classes_pa = class_table(classes, text, cfg["text_embeddings"])
    else:
        raise StageError("params.yaml", f"video_features.{profile}.text_embeddings: required (the prompts' embeddings)")
    if cfg.get("threads"):
        import torch
        torch.set_num_threads(cfg["threads"])
    on_bad = cfg.get("on_bad_video", "error")
    settings = extract_settings(cfg)
    extract_hash = settings_hash(settings)
    report: dict[str, dict[str, Any]] = {}
    entries = manifest["videos"]
    t0 = time.perf_counter()

    if settings["source"] == "precomputed":
        subsets = {vid: ("val" if e["subset"] in ("train", "val") else "test") for vid, e in
                   ((e["video_id"], e) for e in entries)}
        counts = extract_precomputed(entries, cfg, out, extract_hash, subsets, report)
        fps = {e["video_id"]: float(cfg["precomputed"]["fps"]) for e in entries}
        durations = {vid: float(database.get(vid, {}).get("duration") or counts[vid] * cfg["precomputed"]["stride"]
                                / cfg["precomputed"]["fps"]) for vid in counts}
    else:
        # 1. probe every video before anything is written: most bad files fail here
        max_res = tuple(cfg["max_resolution"]) if cfg.get("max_resolution") else None
        infos, source_hashes, jobs = {}, {}, []
        counts = {}
        # probing hashes every file: minutes over a real dataset
        for e in progress_bar(entries, desc="video probe", unit="video"):
            vid, path = e["video_id"], video_path(videos_dir, e)
            try:
                if path is None:
                    raise BadVideo(videos_dir / "manifest.json", f"video {vid} has no file (raw videos not listed)")
                infos[vid] = probe(path, max_res, f"video_features.{profile}.max_resolution")
            except BadVideo as err:
                if on_bad == "error":
                    raise StageError(err.path, err.problem) from None
                report[vid] = {"status": "skipped-bad", "reason": err.problem}
                continue
            source_hashes[vid] = sha256_file(path)
            have = existing(schema.snippet_path(out, vid), extract_hash, source_hashes[vid])
            if have is not None:
                counts[vid] = have
                report[vid] = {"status": "skipped-existing", "snippets": have, "fps": infos[vid].fps}
            else:
                jobs.append((vid, path, infos[vid].fps))
        # 2. decode + extract what is missing
        if jobs:
            counts.update(extract_decoded(jobs, cfg, out, extract_hash, source_hashes, report, on_bad))
        fps = {vid: infos[vid].fps for vid in counts}
        durations = {}
        for vid in counts:
            frames = report[vid].get("frames")
            if frames is None:  # skipped-existing: its last snippet ends at the last frame
                frames = round(float(read_last_end(out, vid)) * fps[vid])
            durations[vid] = frames / fps[vid]

    # 3. the tables: only videos whose snippets exist
    kept = [e for e in entries if e["video_id"] in counts]
    if not kept:
        raise StageError(videos_dir / "manifest.json", "no video could be read (see the skips in the report)")
    videos = pd.DataFrame({
        "video_id": [e["video_id"] for e in kept],
        "subset": [e["subset"] for e in kept],
        "duration": [durations[e["video_id"]] for e in kept],
        "fps": [fps[e["video_id"]] for e in kept],
        "n_snippets": [counts[e["video_id"]] for e in kept],
        "labels": [sorted({class_id[a["label"]] for a in database.get(e["video_id"], {}).get("annotations", [])})
                   for e in kept]})
    rows = [(e["video_id"], class_id[a["label"]], *a["segment"]) for e in kept
            for a in database.get(e["video_id"], {}).get("annotations", [])]
    segments = pd.DataFrame(rows, columns=["video_id", "class_id", "t_start", "t_end"])
    segments = segments.astype({"class_id": np.int32, "t_start": np.float32, "t_end": np.float32})
    for e in kept:
        sub = database.get(e["video_id"], {}).get("subset")
        if sub is not None and FROM_ACTIVITYNET.get(sub, sub) != e["subset"]:
            raise StageError(videos_dir / manifest["annotations"], f"video {e['video_id']}: subset {sub} "
                                                                    f"in the annotations, {e['subset']} in the manifest")
    num_classes = len(classes)
    videos_pa = pa.Table.from_pandas(videos, preserve_index=False).cast(schema.VIDEOS_SCHEMA)
    segments_pa = pa.Table.from_pandas(segments, preserve_index=False).cast(schema.SEGMENTS_SCHEMA)
    schema.validate_videos(videos.set_axis(videos["video_id"]), max(num_classes, 1), str(out / "videos.parquet"))
    schema.validate_segments(segments, videos, max(num_classes, 1), str(out / "segments.parquet"))
    schema.write_table(classes_pa, out / "classes.parquet")
    schema.write_table(segments_pa, out / "segments.parquet")
    schema.write_table(videos_pa, out / "videos.parquet")
    # 4. files of videos no longer listed (or now bad) go: the directory holds exactly this set
    keep = {f"{vid}.parquet" for vid in counts}
    for f in (out / "snippets").glob("*.parquet") if (out / "snippets").is_dir() else []:
        if f.name not in keep:
            f.unlink()
    seconds = time.perf_counter() - t0
    extracted = [r for r in report.values() if r["status"] == "extracted"]
    frames = sum(r.get("frames", 0) for r in extracted)
    summary = {"profile": profile, "extract_sha256": extract_hash, "settings": settings,
               "dims": snippet_dims(out, kept[0]["video_id"]),
               "videos": len(entries), "written": len(kept),
               "extracted": len(extracted), "skipped_existing": sum(r["status"] == "skipped-existing" for r in report.values()),
               "skipped_bad": sum(r["status"] == "skipped-bad" for r in report.values()),
               "seconds": round(seconds, 2), "frames_extracted": frames,
               "frames_per_second": round(frames / seconds, 1) if frames else None}
    write_json(out / "report.json", {"summary": summary, "videos": report})
    return summary


def snippet_dims(out: Path, vid: str) -> dict[str, int]:
    import pyarrow.parquet as pq
    sch = pq.read_schema(schema.snippet_path(out, vid))
    return {k: sch.field(k).type.list_size for k in schema.FEATURE_KEYS}


def read_last_end(out: Path, vid: str) -> float:
    import pyarrow.parquet as pq
    table = pq.read_table(schema.snippet_path(out, vid), columns=["t_end"])
    return float(table["t_end"][-1].as_py())


def main(argv: list[str]) -> None:
    profile, rest = pop_profile(argv)
    if profile is None or len(rest) != 2:
        raise StageError("command line", "usage: python -m tasks.stages.video_features --profile NAME VIDEOS_DIR OUT_DIR")
    with naming_profile("video_features", profile):
        s = build(profile, rest[0], rest[1])
    print(f"video_features: wrote {rest[1]} ({s['written']} videos: {s['extracted']} extracted, "
          f"{s['skipped_existing']} kept, {s['skipped_bad']} bad; {s['seconds']} s)")


if __name__ == "__main__":
    stage_main(main)
