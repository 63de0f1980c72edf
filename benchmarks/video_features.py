"""Video feature extraction throughput against decoding alone, on the same clips in one run, and peak
memory on a long video against a short one.

    python benchmarks/video_features.py [--repeats 3] [--profile default]
    → benchmarks/results/video_features.json

Clips: the six real clips in ../shared/data/video (when present) and a generated one of the default
profile (64x64, 16 fps). For each clip and the set as a whole:
  decode_raw       PyAV decode only (frames not converted), threaded (`thread_type = "AUTO"`)
  decode_only      what the stage's producer does without the extractors: decode, resize + crop to
                   `frame_size`, RGB arrays, cut into snippets (tasks/stages/video_io.py)
  decode_extract   the stage's pipeline: the producer thread feeding CBP + VLP (the profile's extractors:
                   the trained checkpoints when `dvc repro video_extractors` has run, else the same
                   architectures untrained, which cost the same) through the bounded queue
fps is decoded frames per second of wall time; the goal (issue 12) is decode_extract >= 0.8x decode_only
on CPU. Memory: peak RSS (and the Python heap's peak, tracemalloc) of a child process extracting a
short (20 s), a medium (2 min) and a long (10 min) generated video: flat means long/short close to 1
(the heap grows until the bounded queue is full, within the first minute, and not after).
With a GPU (torch.cuda), the extraction is also timed there in bf16 with batched snippets.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)

GOAL = 0.8
SHARED = REPO.parent / "shared" / "data" / "video"
REAL = ["mmaction2/demo.mp4", "mmaction2/test.avi", "mmaction2/S001C001P001R001A001_rgb.avi",
        "mmaction2/test_video_structuralize.mp4", "video_features/v_GGSY1Qvo990.mp4",
        "video_features/v_ZNVhz7ctTq0.mp4"]


def generated(path: Path, seconds: float, seed: int = 0) -> Path:
    """A default-profile video (64x64, 16 fps) with actions, `seconds` long."""
    import numpy as np

    from tasks.stages import video_synthetic as synth
    from tasks.stages.video_io import write_video
    fps, size = 16, 64
    n = int(seconds * fps)
    rng = np.random.default_rng(seed)
    # instances every ~12 s: a long video is many short ones in a row
    instances = []
    for k in range(0, n - 12 * fps + 1, 12 * fps):
        for inst in synth.plan_video(rng, synth.CLASSES, 12 * fps, fps, size, 2):
            instances.append(synth.Instance(inst.cls, inst.appear + k, inst.start + k, inst.end + k, inst.vanish + k,
                                            inst.x, inst.y, inst.scale))
    write_video(path, synth.render_video(instances, synth.CLASSES, n, fps, size, seed), fps)
    return path


def feature_cfg(profile: str, gpu: bool = False) -> dict:
    from tasks.platform.params import stage_params
    cfg = stage_params("video_features", profile)
    exts = {}
    for key, e in cfg["extractors"].items():
        e = dict(e)
        if e.get("checkpoint") and not Path(e["checkpoint"]).is_file():
            e["checkpoint"] = None  # untrained: the same architecture and cost
        exts[key] = e
    cfg["extractors"] = exts
    if gpu:
        cfg.update(device="cuda", precision="bf16", batch_snippets=256)
    return cfg


def decode_raw(path: Path) -> int:
    import av
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        return sum(1 for _ in c.decode(s))


def decode_only(path: Path, cfg: dict) -> int:
    from tasks.stages.video_io import iter_frames, iter_snippets
    n = 0

    def counted():
        nonlocal n
        for f in iter_frames(path, cfg["frame_size"]):
            n += 1
            yield f
    for _ in iter_snippets(counted(), cfg["snippet_frames"], cfg["stride"]):
        pass
    return n


def decode_extract(paths: list[Path], cfg: dict, extractors) -> int:
    """The stage's producer thread + bounded queue + extractors (tasks/stages/video_features.py)."""
    import queue

    from tasks.stages.video_features import _DONE, produce
    jobs = [(p.stem, p, 0.0) for p in paths]
    q: queue.Queue = queue.Queue(maxsize=cfg.get("queue_batches", 4))
    stop = threading.Event()
    t = threading.Thread(target=produce, args=(jobs, cfg, q, stop), daemon=True)
    t.start()
    frames = 0
    while True:
        item = q.get()
        if item is _DONE:
            break
        kind, vid, payload = item
        if kind == "batch":
            extractors(payload)
        elif kind == "end":
            frames += payload
        else:
            raise RuntimeError(f"{vid}: {payload}")
    t.join()
    if extractors.device.type == "cuda":
        import torch
        torch.cuda.synchronize()
    return frames


def timed(fn, repeats: int) -> tuple[float, int]:
    best, n = float("inf"), 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t)
    return best, n


def measure(clips: dict[str, Path], cfg: dict, repeats: int) -> dict:
    from tasks.stages.video_features import Extractors
    extractors = Extractors(cfg)
    decode_extract([next(iter(clips.values()))], cfg, extractors)  # warm-up (first conv calls, caches)
    rows = {}
    for name, path in {**clips, "all": None}.items():
        paths = list(clips.values()) if path is None else [path]
        raw_s, n = timed(lambda: sum(decode_raw(p) for p in paths), repeats)
        dec_s, _ = timed(lambda: sum(decode_only(p, cfg) for p in paths), repeats)
        ext_s, n2 = timed(lambda: decode_extract(paths, cfg, extractors), repeats)
        assert n == n2, (name, n, n2)
        rows[name] = {"frames": n, "decode_raw_fps": round(n / raw_s, 1), "decode_only_fps": round(n / dec_s, 1),
                      "decode_extract_fps": round(n / ext_s, 1), "ratio": round(dec_s / ext_s, 3)}
    return rows


def child_memory(path: str, profile: str) -> None:
    """Runs in a child process: extracts one video, prints peak RSS and the Python heap's peak."""
    import resource
    import tracemalloc

    from tasks.stages.video_features import Extractors
    def status_mb(key: str) -> float:  # VmRSS (now) or VmHWM (peak so far), Linux
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")
    cfg = feature_cfg(profile)
    extractors = Extractors(cfg)
    before = status_mb("VmRSS")  # torch, PyAV and the models loaded: what any video costs
    tracemalloc.start()
    frames = decode_extract([Path(path)], cfg, extractors)
    heap = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"frames": frames, "rss_before_mb": before, "peak_rss_mb": status_mb("VmHWM"),
                      "peak_rss_growth_mb": status_mb("VmHWM") - before,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "python_heap_peak_mb": heap / 2 ** 20}))


def memory(tmp: Path, profile: str) -> dict:
    out = {}
    for name, seconds in (("short_20s", 20), ("medium_120s", 120), ("long_600s", 600)):
        path = generated(tmp / f"{name}.mp4", seconds, seed=1)
        proc = subprocess.run([sys.executable, __file__, "--child-memory", str(path), "--profile", profile],
                              capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["rss_ratio_long_vs_short"] = round(out["long_600s"]["peak_rss_mb"] / out["short_20s"]["peak_rss_mb"], 3)
    out["heap_ratio_long_vs_short"] = round(out["long_600s"]["python_heap_peak_mb"]
                                            / out["short_20s"]["python_heap_peak_mb"], 3)
    # the queue (queue_batches decoded batches) fills within the first minute; after that nothing grows
    out["heap_ratio_long_vs_medium"] = round(out["long_600s"]["python_heap_peak_mb"]
                                             / out["medium_120s"]["python_heap_peak_mb"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "video_features.json"))
    ap.add_argument("--child-memory", default=None)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    if args.child_memory:
        child_memory(args.child_memory, args.profile)
        return
    import torch

    from tasks.platform.common import write_json
    cfg = feature_cfg(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clips = {Path(r).name: SHARED / r for r in REAL if (SHARED / r).is_file()}
        clips["generated_64px_20s.mp4"] = generated(tmp / "generated.mp4", 20)
        result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                              "torch_threads": torch.get_num_threads(),
                              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
                  "settings": {k: cfg[k] for k in ("frame_size", "snippet_frames", "stride", "batch_snippets",
                                                   "queue_batches") if k in cfg}
                  | {"extractors": {k: {"name": e["name"], "trained": bool(e.get("checkpoint"))}
                                    for k, e in cfg["extractors"].items()}},
                  "goal_ratio": GOAL, "repeats": args.repeats, "cpu": measure(clips, cfg, args.repeats)}
        if torch.cuda.is_available():
            result["gpu"] = {"device": torch.cuda.get_device_name(0),
                             "rows": measure(clips, feature_cfg(args.profile, gpu=True), args.repeats)}
        if not args.skip_memory:
            result["memory"] = memory(tmp, args.profile)
    write_json(args.out, result)
    print(f"{'clip':42s} {'frames':>6s} {'raw fps':>8s} {'decode fps':>10s} {'extract fps':>11s} {'ratio':>6s}")
    for part in ("cpu", "gpu"):
        rows = result.get(part, {})
        rows = rows.get("rows", rows) if part == "gpu" else rows
        for name, r in rows.items():
            print(f"{part + ' ' + name:42s} {r['frames']:6d} {r['decode_raw_fps']:8.0f} {r['decode_only_fps']:10.0f} "
                  f"{r['decode_extract_fps']:11.0f} {r['ratio']:6.2f}")
    if "memory" in result:
        m = result["memory"]
        for k in ("short_20s", "medium_120s", "long_600s"):
            print(f"memory {k:12s} {m[k]['frames']:6d} frames: peak RSS {m[k]['peak_rss_mb']:.0f} MB "
                  f"(+{m[k]['peak_rss_growth_mb']:.0f} MB while extracting), Python heap peak "
                  f"{m[k]['python_heap_peak_mb']:.1f} MB")
        print(f"long/short: RSS x{m['rss_ratio_long_vs_short']}, heap x{m['heap_ratio_long_vs_short']} "
              f"(long/medium heap x{m['heap_ratio_long_vs_medium']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
