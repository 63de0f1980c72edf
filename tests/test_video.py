"""The video stages (issue 12): decoding, snippets, streaming memory, the real clips, resume, interrupts,
the generator's annotations, the THUMOS14 reader, and the published extractors' state-dict layouts.

References are independent of the code under test: PyAV decodes directly, snippet contents are checked
against frame indices, annotations against what the decoded pixels show, and the I3D / CLIP key lists
are written out here from piergiaj/pytorch-i3d (pytorch_i3d.py) and openai/CLIP (clip/model.py).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import video_fixtures as vf
from conftest import REPO, shared_file
from tasks.kinds.localization import schema
from tasks.stages import video_io, video_synthetic

REAL_CLIPS = {  # file: (frames, fps), from ../shared/data/README.md section 2
    "video/mmaction2/demo.mp4": (280, 28.0),
    "video/mmaction2/test.avi": (164, 25.0),
    "video/mmaction2/S001C001P001R001A001_rgb.avi": (103, 30.0),
    "video/mmaction2/test_video_structuralize.mp4": (300, 29.97002997002997),
    "video/video_features/v_GGSY1Qvo990.mp4": (355, 19.62),
    "video/video_features/v_ZNVhz7ctTq0.mp4": (420, 30.0),
}


def pyav_frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """params.yaml, four generated videos and random small extractors, and one good features run."""
    w = tmp_path_factory.mktemp("video")
    vf.build_videos(w)
    vf.run_stage("tasks.stages.video_features", ["--profile", "t", vf.VIDEOS, vf.FEATURES], w)
    return w


def copy_work(work: Path, tmp_path: Path) -> Path:
    import shutil
    dst = tmp_path / "w"
    shutil.copytree(work, dst)
    return dst


def report(w: Path) -> dict:
    return json.loads((w / vf.FEATURES / "report.json").read_text())


def set_params(w: Path, **features) -> None:
    p = yaml.safe_load((w / "params.yaml").read_text())
    p["video_features"]["t"].update(features)
    (w / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


# ---------------------------------------------------------------------------------------------------
# decoding and snippets

def test_decoded_frames_equal_a_direct_pyav_decode(work):
    path = work / vf.VIDEOS / "video_0002.mp4"
    ref = pyav_frames(path)
    ours = list(video_io.iter_frames(path, 48))  # native size: only the colour conversion
    assert len(ours) == len(ref) > 0
    assert all(np.array_equal(a, b) for a, b in zip(ours, ref))


def test_resized_frames_are_the_centre_crop_of_the_short_side(tmp_path):
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 200  # the centre square, 40 wide
    path = vf.encode(tmp_path / "wide.mp4", [img] * 3)
    (frame, *_) = list(video_io.iter_frames(path, 20))
    assert frame.shape == (20, 20, 3)
    assert frame.mean() > 180  # only the bright centre is left


@pytest.mark.parametrize("n_frames,n,stride", [(1, 8, 8), (8, 8, 8), (9, 8, 8), (100, 8, 8), (100, 16, 4),
                                               (37, 5, 3), (20, 8, 10), (64, 16, 16)])
def test_snippets_have_the_frames_and_times_the_rule_says(n_frames, n, stride):
    frames = [np.full((2, 2, 3), i, np.uint8) for i in range(n_frames)]
    snippets = list(video_io.iter_snippets(iter(frames), n, stride))
    # the rule, written out: snippet k starts at k*stride; after the first it exists while it starts
    # inside the video and its predecessor stopped short of the end
    starts = [0]
    while starts[-1] + stride < n_frames and starts[-1] + n < n_frames:
        starts.append(starts[-1] + stride)
    assert len(snippets) == len(starts) == video_io.snippet_count(n_frames, n, stride)
    for s0, snip in zip(starts, snippets):
        want = [min(i, n_frames - 1) for i in range(s0, s0 + n)]  # padded with the last frame
        assert snip[:, 0, 0, 0].tolist() == want
    if stride <= n:  # every frame is in a snippet
        assert set(np.concatenate([s[:, 0, 0, 0] for s in snippets]).tolist()) == set(range(n_frames))
    t0, t1 = video_io.snippet_times(n_frames, n, stride, fps=4.0)
    assert np.allclose(t0, np.array(starts) / 4.0) and np.allclose(t1, np.minimum(np.array(starts) + n, n_frames) / 4.0)


def test_streaming_memory_is_flat_on_a_long_video(tmp_path):
    """Peak Python-heap memory of decode -> snippets on 3000 frames is that of 150 frames (tracemalloc
    counts NumPy's buffers); a decoder that kept the frames would need 20x."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    short = vf.encode(tmp_path / "short.mp4", [np.roll(base, i, 1) for i in range(150)])
    long = vf.encode(tmp_path / "long.mp4", [np.roll(base, i, 1) for i in range(3000)])

    def peak(path):
        tracemalloc.start()
        n = sum(1 for _ in video_io.iter_snippets(video_io.iter_frames(path, 64), 8, 8))
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return n, p
    (n_short, p_short), (n_long, p_long) = peak(short), peak(long)
    assert n_long == 375 and n_short == 19
    assert p_long < 1.5 * p_short + 256 * 1024, (p_short, p_long)
    assert p_long < 3000 * 64 * 64 * 3 / 10  # far below the decoded video (37 MB)


# ---------------------------------------------------------------------------------------------------
# the stage

def test_the_features_directory_meets_the_contract(work):
    data_dir = work / vf.FEATURES
    videos = pq.read_table(data_dir / "videos.parquet").to_pandas()
    assert sorted(videos["subset"]) == ["test", "train", "train", "val"]
    ann = json.loads((work / vf.VIDEOS / "annotations.json").read_text())["database"]
    for row in videos.itertuples():
        table = pq.read_table(schema.snippet_path(data_dir, row.video_id))
        n_frames = len(pyav_frames(work / vf.VIDEOS / f"{row.video_id}.mp4"))
        assert table.num_rows == row.n_snippets == video_io.snippet_count(n_frames, 8, 8)
        assert row.duration == pytest.approx(n_frames / 16) == pytest.approx(ann[row.video_id]["duration"])
        assert schema.feature_matrix(table, "vlp").shape == (row.n_snippets, vf.TEXT_DIM)
        # VLP features are means of unit vectors, renormalised
        assert np.allclose(np.linalg.norm(schema.feature_matrix(table, "vlp"), axis=1), 1, atol=1e-5)
    classes = pq.read_table(data_dir / "classes.parquet")
    assert classes["name"].to_pylist() == ["red_square_slide", "green_circle_bounce"]
    data = schema.load_localization(data_dir)  # the consumer's reader, with its validation
    assert data.num_classes == 2 and set(data.splits) == {"train", "val", "test"}
    assert report(work)["summary"]["extracted"] == 4


def test_resume_skips_same_settings_and_redoes_changed_ones(work, tmp_path):
    w = copy_work(work, tmp_path)
    snippets = w / vf.FEATURES / "snippets"
    mtimes = {p.name: p.stat().st_mtime_ns for p in snippets.iterdir()}
    vf.run_stage("tasks.stages.video_features", ["--profile", "t", vf.VIDEOS, vf.FEATURES], w)
    assert {v["status"] for v in report(w)["videos"].values()} == {"skipped-existing"}
    assert {p.name: p.stat().st_mtime_ns for p in snippets.iterdir()} == mtimes
    # one video file changed: only it is extracted again
    vf.encode(w / vf.VIDEOS / "video_0001.mp4", vf.frames(40, 48, seed=5))
    vf.run_stage("tasks.stages.video_features", ["--profile", "t", vf.VIDEOS, vf.FEATURES], w)
    status = {k: v["status"] for k, v in report(w)["videos"].items()}
    assert status == {"video_0000": "skipped-existing", "video_0001": "extracted", "video_0002": "skipped-existing",
                      "video_0003": "skipped-existing"}
    assert pq.read_table(snippets / "video_0001.parquet").num_rows == 5  # 40 frames
    # another extraction setting: every video again, with the new hash
    set_params(w, stride=4)
    vf.run_stage("tasks.stages.video_features", ["--profile", "t", vf.VIDEOS, vf.FEATURES], w)
    r = report(w)
    assert {v["status"] for v in r["videos"].values()} == {"extracted"}
    assert {video_io_hash(p) for p in snippets.iterdir()} == {r["summary"]["extract_sha256"]}
    assert pq.read_table(snippets / "video_0001.parquet").num_rows == video_io.snippet_count(40, 8, 4)


def video_io_hash(path: Path) -> str:
    return pq.read_schema(path).metadata[schema.EXTRACT_HASH_KEY].decode()


def test_a_bad_video_is_skipped_and_reported_when_params_allow(work, tmp_path):
    w = copy_work(work, tmp_path)
    set_params(w, on_bad_video="skip")
    vf.truncated_avi(w / vf.VIDEOS / "video_0001.mp4")   # fails while decoding
    vf.audio_only(w / vf.VIDEOS / "video_0003.mp4")      # fails the probe
    vf.run_stage("tasks.stages.video_features", ["--profile", "t", vf.VIDEOS, vf.FEATURES], w)
    r = report(w)["videos"]
    assert r["video_0001"]["status"] == r["video_0003"]["status"] == "skipped-bad"
    assert "truncated" in r["video_0001"]["reason"] and "no video stream" in r["video_0003"]["reason"]
    assert sorted(pq.read_table(w / vf.FEATURES / "videos.parquet")["video_id"].to_pylist()) == ["video_0000", "video_0002"]
    assert sorted(p.name for p in (w / vf.FEATURES / "snippets").iterdir()) == ["video_0000.parquet", "video_0002.parquet"]
    assert set(pq.read_table(w / vf.FEATURES / "segments.parquet")["video_id"].to_pylist()) <= {"video_0000", "video_0002"}


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """20 000 small frames: seconds of extraction (about 2.6 s on 2 cores), so a signal sent 0.3 s after the
    stage starts it lands mid-video. 4 000 frames took 0.53 s here, and CI once finished them first."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    return vf.encode(tmp_path_factory.mktemp("long") / "long.mp4", [np.roll(base, i, 1) for i in range(20_000)])


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_an_interrupted_run_leaves_no_temporary_file(work, long_video, tmp_path, sig, code, word):
    w = copy_work(work, tmp_path)
    import shutil
    shutil.rmtree(w / vf.FEATURES)
    shutil.copyfile(long_video, w / vf.VIDEOS / "video_0003.mp4")  # still extracting when it is stopped
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tasks.stages.video_features", "--profile", "t", vf.VIDEOS,
                             vf.FEATURES], cwd=w, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    snippets = w / vf.FEATURES / "snippets"
    try:
        deadline = time.monotonic() + 120
        while not (snippets.is_dir() and len(list(snippets.glob("video_000[012].parquet"))) == 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.02)
        time.sleep(0.3)  # inside the long video
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [f"error: {word} ({sig.name}); nothing was published"]
    left = [p for p in (w / vf.FEATURES).rglob("*") if ".tmp" in p.name]
    assert left == []
    # what was complete stays (the resume's progress); no table was published
    assert sorted(p.name for p in snippets.iterdir()) == ["video_0000.parquet", "video_0001.parquet",
                                                         "video_0002.parquet"]
    assert not (w / vf.FEATURES / "videos.parquet").exists()


def test_the_six_real_clips_decode_and_extract(tmp_path):
    paths = [shared_file(rel) for rel in REAL_CLIPS]
    w = tmp_path / "w"
    w.mkdir()
    p = vf.params("s")
    p["video"]["s"] = {"source": "files", "files": {"paths": [str(x) for x in paths]}}
    p["video_features"]["s"]["max_resolution"] = [1920, 1080]
    (w / "params.yaml").write_text(yaml.safe_dump(p))
    vf.run_stage("tasks.stages.videos", ["--profile", "s", vf.VIDEOS], w)
    vf.random_extractors(w / vf.EXTRACTORS, [])
    vf.run_stage("tasks.stages.video_features", ["--profile", "s", vf.VIDEOS, vf.FEATURES], w)
    manifest = json.loads((w / vf.VIDEOS / "manifest.json").read_text())
    assert [v["sha256"] for v in manifest["videos"]] == [video_io.sha256_file(x) for x in paths]
    videos = pq.read_table(w / vf.FEATURES / "videos.parquet").to_pandas().set_index("video_id")
    assert set(videos["subset"]) == {"unlabelled"}
    for rel, (frames, fps) in REAL_CLIPS.items():
        vid = Path(rel).stem
        assert videos.loc[vid, "fps"] == pytest.approx(fps, rel=1e-6)
        assert videos.loc[vid, "n_snippets"] == video_io.snippet_count(frames, 8, 8)
        assert report(w)["videos"][vid]["frames"] == frames
        table = pq.read_table(schema.snippet_path(w / vf.FEATURES, vid))
        assert table["t_end"][-1].as_py() == pytest.approx(frames / fps, rel=1e-6)
        schema.validate_snippets(table, vid)


# ---------------------------------------------------------------------------------------------------
# the generator: the annotations say what the pixels show

def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean image (stray background pixels of a similar colour
    are not the object)."""
    from scipy import ndimage
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    return labels == 1 + int(np.argmax(ndimage.sum(mask, labels, range(1, n + 1))))


def test_generated_annotations_match_what_the_frames_show(tmp_path):
    """Every class, 1-3 instances per video, as the default profile generates them (64 px, 16 fps)."""
    gen = {**vf.VIDEO_PARAMS["generate"], "n_videos": 10, "size": 64, "duration_s": [16.0, 20.0],
           "instances": [2, 3], "classes": None, "seed": 12}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"video": {"g": {"source": "generate", "generate": gen}}}))
    vf.run_stage("tasks.stages.videos", ["--profile", "g", "v"], tmp_path)
    ann = json.loads((tmp_path / "v/annotations.json").read_text())["database"]
    checked, labels = 0, set()
    for vid, entry in ann.items():
        frames = np.stack(pyav_frames(tmp_path / "v" / f"{vid}.mp4")).astype(np.float32)
        fps = 16
        assert len(frames) == round(entry["duration"] * fps)
        for a in entry["annotations"]:
            cls = video_synthetic.BY_NAME[a["label"]]
            start, end = round(a["segment"][0] * fps), round(a["segment"][1] * fps)  # moving: [start, end)
            # the object: the largest region of the class's colour (compression keeps it within ~30)
            obj = lambda f: largest_blob(np.abs(frames[f] - np.array(cls.color, np.float32)).max(axis=-1) < 30)
            iou = lambda f, g: (obj(f) & obj(g)).sum() / max((obj(f) | obj(g)).sum(), 1)
            # in view and still for the 4 frames before the segment and the 4 after it
            for f in (*range(start - 4, start), *range(end, end + 4)):
                assert obj(f).sum() > 20, (vid, a["label"], start, end, f)
            assert min(iou(f, f + 1) for f in range(start - 4, start - 1)) > 0.75, (vid, a["label"], start)
            assert min(iou(f, f + 1) for f in range(end, end + 3)) > 0.75, (vid, a["label"], end)
            # and moving from the segment's first frame to its last: 4 frames in, it has left its pose
            assert iou(start - 1, start + 3) < 0.9 and iou(end - 4, end) < 0.9, (vid, a["label"], start, end)
            checked += 1
            labels.add(a["label"])
    assert checked >= 12 and labels == set(video_synthetic.BY_NAME)


def test_generation_is_deterministic_and_splits_as_asked(tmp_path):
    w1, w2 = tmp_path / "a", tmp_path / "b"
    for w in (w1, w2):
        w.mkdir()
        (w / "params.yaml").write_text(yaml.safe_dump(vf.params()))
        vf.run_stage("tasks.stages.videos", ["--profile", "t", vf.VIDEOS], w)
    m1, m2 = (json.loads((w / vf.VIDEOS / "manifest.json").read_text()) for w in (w1, w2))
    assert [v["sha256"] for v in m1["videos"]] == [v["sha256"] for v in m2["videos"]]
    assert sorted(v["subset"] for v in m1["videos"]) == ["test", "train", "train", "val"]
    pre = json.loads((w1 / vf.VIDEOS / "pretrain" / "pretrain.json").read_text())
    assert [c["label"] for c in pre["clips"]] == [0, 1, None]
    assert pre["background_prompts"] and all(c["prompt"].startswith("a video of") for c in pre["classes"])


# ---------------------------------------------------------------------------------------------------
# THUMOS14: annotation files and precomputed features

def test_thumos14_annotations_and_precomputed_features(tmp_path):
    w = tmp_path / "w"
    ann, feats = w / "thumos/annotations", w / "thumos/features"
    ann.mkdir(parents=True)
    (ann / "BaseballPitch_val.txt").write_text("video_validation_0000051 67.5 75.9\nvideo_validation_0000051 85.9 90.6\n")
    (ann / "HighJump_val.txt").write_text("video_validation_0000052 1.2 4.8\n")
    (ann / "HighJump_test.txt").write_text("video_test_0000004 0.2 1.1\n")
    (ann / "BaseballPitch_test.txt").write_text("video_test_0000004 2.0 3.5\n\n")
    (ann / "Ambiguous_val.txt").write_text("video_validation_0000051 10.0 11.0\n")
    lengths = {"video_validation_0000051": 60, "video_validation_0000052": 9, "video_test_0000004": 3}
    rng = np.random.default_rng(0)
    for key, dim in (("cbp", 12), ("vlp", 6)):
        for vid, t in lengths.items():
            sub = "test" if "test" in vid else "val"
            (feats / key / sub).mkdir(parents=True, exist_ok=True)
            np.save(feats / key / sub / f"{vid}.npy", rng.normal(size=(t, dim)).astype(np.float32))
    prompts = ["a video of a person doing baseball pitch", "a video of a person doing high jump"]
    np.savez(w / "thumos/text.npz", prompts=np.array(prompts), embeddings=rng.normal(size=(2, 6)).astype(np.float32))
    p = {"video_profiles": ["th"],
         "video": {"th": {"source": "thumos14", "thumos14": {"annotations": "thumos/annotations", "val_fraction": 0.5,
                                                            "durations": {"video_validation_0000051": 96.0,
                                                                          "video_validation_0000052": 5.76,
                                                                          "video_test_0000004": 3.6}}}},
         "video_features": {"th": {"source": "precomputed", "text_embeddings": "thumos/text.npz",
                                   "precomputed": {"roots": {"cbp": "thumos/features/cbp", "vlp": "thumos/features/vlp"},
                                                   "fps": 25, "snippet_frames": 16, "stride": 40}}}}
    (w / "params.yaml").write_text(yaml.safe_dump(p))
    vf.run_stage("tasks.stages.videos", ["--profile", "th", "data/v"], w)
    db = json.loads((w / "data/v/annotations.json").read_text())["database"]
    assert db["video_validation_0000051"]["annotations"] == [{"segment": [67.5, 75.9], "label": "BaseballPitch"},
                                                             {"segment": [85.9, 90.6], "label": "BaseballPitch"}]
    assert db["video_test_0000004"]["subset"] == "testing"
    assert {db[v]["subset"] for v in ("video_validation_0000051", "video_validation_0000052")} == {"training", "validation"}
    vf.run_stage("tasks.stages.video_features", ["--profile", "th", "data/v", "data/f"], w)
    data = schema.load_localization(w / "data/f")
    assert data.class_names == ["BaseballPitch", "HighJump"] and data.prompts == prompts
    test = data.splits["test"]
    assert test.video_ids == ["video_test_0000004"] and test.labels.tolist() == [[1.0, 1.0]]
    assert test.features["cbp"].shape == (1, 3, 12) and test.features["vlp"].shape == (1, 3, 6)
    assert test.times[0, 1].tolist() == pytest.approx([40 / 25, 56 / 25])


def test_a_thumos_line_that_is_not_three_fields_names_its_file_and_line(tmp_path):
    from tasks.platform.common import StageError
    from tasks.stages.videos import read_thumos_annotations
    (tmp_path / "HighJump_val.txt").write_text("video_validation_0000052 1.2 4.8\nvideo_validation_0000053 1.2\n")
    with pytest.raises(StageError, match=r"HighJump_val.txt: line 2: expected `video_name start end`"):
        read_thumos_annotations(tmp_path)


# ---------------------------------------------------------------------------------------------------
# published extractors: the key names and shapes of the real checkpoints load strictly

def i3d_reference_keys() -> dict[str, tuple[int, ...]]:
    """piergiaj/pytorch-i3d's InceptionI3d(400) parameter names and shapes, written out from
    pytorch_i3d.py: Unit3D = conv3d (+ bn), InceptionModule branches b0, b1a, b1b, b2a, b2b, b3b."""
    keys: dict[str, tuple[int, ...]] = {}

    def unit(name, cin, cout, k):
        keys[f"{name}.conv3d.weight"] = (cout, cin, k, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.bn.{p}"] = (cout,)
    unit("Conv3d_1a_7x7", 3, 64, 7)
    unit("Conv3d_2b_1x1", 64, 64, 1)
    unit("Conv3d_2c_3x3", 64, 192, 3)
    mixed = [("Mixed_3b", 192, [64, 96, 128, 16, 32, 32]), ("Mixed_3c", 256, [128, 128, 192, 32, 96, 64]),
             ("Mixed_4b", 480, [192, 96, 208, 16, 48, 64]), ("Mixed_4c", 512, [160, 112, 224, 24, 64, 64]),
             ("Mixed_4d", 512, [128, 128, 256, 24, 64, 64]), ("Mixed_4e", 512, [112, 144, 288, 32, 64, 64]),
             ("Mixed_4f", 528, [256, 160, 320, 32, 128, 128]), ("Mixed_5b", 832, [256, 160, 320, 32, 128, 128]),
             ("Mixed_5c", 832, [384, 192, 384, 48, 128, 128])]
    for name, cin, c in mixed:
        unit(f"{name}.b0", cin, c[0], 1)
        unit(f"{name}.b1a", cin, c[1], 1)
        unit(f"{name}.b1b", c[1], c[2], 3)
        unit(f"{name}.b2a", cin, c[3], 1)
        unit(f"{name}.b2b", c[3], c[4], 3)
        unit(f"{name}.b3b", cin, c[5], 1)
    keys["logits.conv3d.weight"] = (400, 1024, 1, 1, 1)
    keys["logits.conv3d.bias"] = (400,)
    return keys


def clip_vit_b16_reference_keys() -> dict[str, tuple[int, ...]]:
    """OpenAI CLIP ViT-B/16's `visual.*` state-dict names and shapes (clip/model.py VisionTransformer:
    width 768, 12 layers, patch 16, 224 px, embed 512), plus a few of the text tower's (ignored)."""
    w = 768
    keys = {"visual.class_embedding": (w,), "visual.positional_embedding": (197, w), "visual.proj": (w, 512),
            "visual.conv1.weight": (w, 3, 16, 16), "visual.ln_pre.weight": (w,), "visual.ln_pre.bias": (w,),
            "visual.ln_post.weight": (w,), "visual.ln_post.bias": (w,)}
    for i in range(12):
        b = f"visual.transformer.resblocks.{i}"
        keys.update({f"{b}.attn.in_proj_weight": (3 * w, w), f"{b}.attn.in_proj_bias": (3 * w,),
                     f"{b}.attn.out_proj.weight": (w, w), f"{b}.attn.out_proj.bias": (w,),
                     f"{b}.ln_1.weight": (w,), f"{b}.ln_1.bias": (w,), f"{b}.mlp.c_fc.weight": (4 * w, w),
                     f"{b}.mlp.c_fc.bias": (4 * w,), f"{b}.mlp.c_proj.weight": (w, 4 * w),
                     f"{b}.mlp.c_proj.bias": (w,), f"{b}.ln_2.weight": (w,), f"{b}.ln_2.bias": (w,)})
    keys.update({"positional_embedding": (77, 512), "text_projection": (512, 512), "logit_scale": (),
                 "ln_final.weight": (512,), "ln_final.bias": (512,)})
    return keys


def random_state(keys: dict[str, tuple[int, ...]], dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.rand(s, generator=g) + 0.5 if "running_var" in k else torch.randn(s, generator=g) * 0.05)
             for k, s in keys.items()}
    return {k: v.to(dtype) for k, v in state.items()}


@pytest.mark.parametrize("with_counters", [False, True])
def test_i3d_loads_a_state_dict_with_the_published_names_strictly(tmp_path, with_counters):
    from models.video_encoders import load_extractor
    keys = i3d_reference_keys()
    state = random_state(keys)
    if with_counters:  # checkpoints saved by a newer PyTorch carry BatchNorm's batch counters
        state.update({k.replace("running_mean", "num_batches_tracked"): torch.tensor(0) for k in keys
                      if k.endswith("running_mean")})
    torch.save(state, tmp_path / "rgb_imagenet.pt")
    net = load_extractor("i3d", tmp_path / "rgb_imagenet.pt")
    assert {k for k in net.state_dict() if not k.endswith("num_batches_tracked")} == set(keys)
    assert all(tuple(v.shape) == keys[k] for k, v in net.state_dict().items() if k in keys)
    with torch.no_grad():
        f = net.forward_features(torch.randn(1, 3, 8, 32, 32))
        assert f.shape == (1, 1024) and torch.isfinite(f).all()
        assert net(torch.randn(1, 3, 8, 32, 32)).shape == (1, 400)


def test_i3d_refuses_a_checkpoint_with_a_missing_key(tmp_path):
    from models.video_encoders import load_extractor
    state = random_state(i3d_reference_keys())
    del state["Mixed_4c.b1b.conv3d.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="Mixed_4c.b1b.conv3d.weight"):
        load_extractor("i3d", tmp_path / "broken.pt")


def test_clip_vit_b16_loads_the_visual_tower_of_a_clip_state_dict(tmp_path):
    from models.video_encoders import load_extractor, snippet_features
    keys = clip_vit_b16_reference_keys()
    state = random_state(keys, torch.float16)  # OpenAI's weights are fp16
    state.update({"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
                  "vocab_size": torch.tensor(49408)})
    torch.save(state, tmp_path / "ViT-B-16.pt")
    net = load_extractor("clip_vit_b16", tmp_path / "ViT-B-16.pt")
    assert set(net.state_dict()) == {k.removeprefix("visual.") for k in keys if k.startswith("visual.")}
    with torch.no_grad():
        f = snippet_features(net, torch.randn(1, 3, 2, 224, 224), frames=2)
    assert f.shape == (1, 512) and torch.allclose(f.norm(dim=1), torch.ones(1), atol=1e-5)
