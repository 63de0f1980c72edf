"""Small video work directories and broken video files, for tests/test_video.py and the bad-input table.

Every file here is written with PyAV directly (not through the stage's own writer), and broken the way
real files break: cut short, no frames, audio only, a codec tag nobody knows.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import av
import numpy as np
import yaml

VIDEOS, FEATURES, EXTRACTORS = "data/video/videos", "data/video/features", "data/video/extractors"
TEXT_DIM = 16

VIDEO_PARAMS = {"source": "generate", "generate": {
    "n_videos": 4, "split": {"val": 0.25, "test": 0.25}, "fps": 16, "size": 48, "duration_s": [2.0, 3.0],
    "instances": [1, 1], "classes": ["red_square_slide", "green_circle_bounce"], "pretrain_clips_per_class": 1,
    "pretrain_clip_frames": 8, "background_clips": 1, "seed": 3}}
FEATURE_PARAMS = {
    "extractors": {"cbp": {"name": "small_c3d", "checkpoint": f"{EXTRACTORS}/cbp.pt"},
                   "vlp": {"name": "small_clip", "checkpoint": f"{EXTRACTORS}/vlp.pt", "frames": 2}},
    "text_embeddings": f"{EXTRACTORS}/text.parquet", "frame_size": 32, "snippet_frames": 8, "stride": 8,
    "batch_snippets": 4, "queue_batches": 2, "max_resolution": [640, 480], "on_bad_video": "error", "device": "cpu"}


def params(profile: str = "t", **features) -> dict:
    return {"video_profiles": [profile], "video": {profile: VIDEO_PARAMS},
            "video_features": {profile: {**FEATURE_PARAMS, **features}}}


def run_stage(module: str, argv: list[str], work: Path) -> None:
    from tasks.platform.common import cli_main
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cli_main(importlib.import_module(module).main, argv)
    finally:
        os.chdir(cwd)


def random_extractors(out: Path, prompts: list[str], seed: int = 0) -> None:
    """Untrained small extractors and random prompt embeddings: what the failure paths need."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from models.video_encoders import create_extractor, save_extractor
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cbp_kwargs, vlp_kwargs = {"num_classes": 2, "width": 4, "size": 32}, {"embed_dim": TEXT_DIM, "width": 4, "size": 32}
    save_extractor(create_extractor("small_c3d", **cbp_kwargs), "small_c3d", cbp_kwargs, out / "cbp.pt")
    save_extractor(create_extractor("small_clip", **vlp_kwargs), "small_clip", vlp_kwargs, out / "vlp.pt")
    emb = np.random.default_rng(seed).normal(size=(len(prompts), TEXT_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pq.write_table(pa.table({"prompt": prompts, "kind": ["class"] * len(prompts),
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), TEXT_DIM)}),
                   out / "text.parquet")


def build_videos(work: Path, profile: str = "t", **features) -> None:
    """params.yaml, the generated videos and random extractors (the video_features stage's inputs)."""
    (work / "params.yaml").write_text(yaml.safe_dump(params(profile, **features), sort_keys=False))
    run_stage("tasks.stages.videos", ["--profile", profile, VIDEOS], work)
    from tasks.stages.video_synthetic import BY_NAME
    random_extractors(work / EXTRACTORS, [BY_NAME[n].prompt for n in VIDEO_PARAMS["generate"]["classes"]])


# ---------------------------------------------------------------------------------------------------
# video files, good and broken

def frames(n: int, size: int = 48, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    return [np.roll(base, i, axis=1) for i in range(n)]


def encode(path: Path, images: list[np.ndarray], fps: int = 16, codec: str = "libx264", audio: bool = False) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = images[0].shape[:2]
        s.pix_fmt = "yuv420p"
        a = c.add_stream("aac", rate=16000) if audio else None
        for img in images:
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        if a is not None:
            _mux_tone(c, a)
    return path


def _mux_tone(c, a, seconds: float = 1.0) -> None:
    t = np.arange(int(16000 * seconds)) / 16000
    frame = av.AudioFrame.from_ndarray((0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                       format="fltp", layout="mono")
    frame.sample_rate = 16000
    for p in a.encode(frame):
        c.mux(p)
    for p in a.encode():
        c.mux(p)


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as c:
        _mux_tone(c, c.add_stream("aac", rate=16000))
    return path


def zero_frames(path: Path) -> Path:
    """An AVI whose video stream is declared (48x48 mpeg4) but holds no frame."""
    with av.open(str(path), "w", format="avi") as c:
        s = c.add_stream("mpeg4", rate=16)
        s.width = s.height = 48
        s.pix_fmt = "yuv420p"
        c.start_encoding()
    return path


def unknown_codec(path: Path) -> Path:
    """An mpeg4 AVI whose codec tag (FourCC) is changed to one no decoder claims."""
    tmp = path.with_name(path.name + ".src.avi")
    encode(tmp, frames(16), codec="mpeg4")
    data = tmp.read_bytes()
    tmp.unlink()
    assert data.count(b"FMP4") >= 1
    path.write_bytes(data.replace(b"FMP4", b"QZQZ"))
    return path


def truncated_avi(path: Path, n: int = 40, keep: float = 0.5) -> Path:
    """An AVI cut short: its header lists n frames, about half of them are there."""
    tmp = path.with_name(path.name + ".src.avi")
    encode(tmp, frames(n), codec="mpeg4")
    data = tmp.read_bytes()
    tmp.unlink()
    path.write_bytes(data[:int(len(data) * keep)])
    return path
