"""tasks/kinds/detection3d/io.py on the real KITTI frames and nuScenes keyframe in ../shared/data, against
the checks in shared/data/README.md (sizes, points in the image, points in the labelled boxes), each
recomputed here independently of the readers: the calibration and labels parsed by the README's own
one-liners, boxes tested in the camera frame."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_file
from tasks.kinds.detection3d import io
from tasks.kinds.detection3d.boxes import points_in_boxes
from tasks.platform.common import StageError

FRAMES = [f"00000{i}" for i in range(6)]
TILT = 0.02   # the camera y axis is 0.8° off the LiDAR z axis: corners move up to ~1.5% of the box size
POINTS = dict(zip(FRAMES, [115384, 120268, 126891, 113110, 115976, 125086]))
NUSC = "pointcloud/nuscenes/n015-2018-07-24-11-22-45+0800"
NUSC_SCAN = f"{NUSC}__LIDAR_TOP__1532402927647951.pcd.bin"


def kitti(rel: str) -> Path:
    return shared_file(f"pointcloud/kitti/training/{rel}")


@pytest.fixture(scope="module")
def root() -> Path:
    return kitti("velodyne/000000.bin").parents[1]


def raw_calib(frame: str) -> dict[str, np.ndarray]:
    """The README's snippet: `KEY: floats` per line."""
    calib = {k.strip(): np.array([float(x) for x in v.split()])
             for k, v in (line.split(":", 1) for line in open(kitti(f"calib/{frame}.txt")) if ":" in line)}
    velo_to_rect = np.eye(4)
    velo_to_rect[:3, :3] = calib["R0_rect"].reshape(3, 3)
    tr = np.eye(4)
    tr[:3] = calib["Tr_velo_to_cam"].reshape(3, 4)
    return {"P2": calib["P2"].reshape(3, 4), "velo_to_rect": velo_to_rect @ tr}


def camera_frame_counts(points: np.ndarray, frame: str) -> list[tuple[str, int]]:
    """Points inside each labelled box, tested in the rectified camera frame where the label lives:
    rotate by -rotation_y about the camera y axis, then |x| <= l/2, |z| <= w/2, -h <= y - y0 <= 0."""
    rect = (raw_calib(frame)["velo_to_rect"] @ np.c_[points[:, :3], np.ones(len(points))].T).T[:, :3]
    out = []
    for line in open(kitti(f"label_2/{frame}.txt")):
        f = line.split()
        if f[0] == "DontCare":
            continue
        h, w, l, x, y, z, ry = map(float, f[8:15])
        d = rect - [x, y, z]
        lx = np.cos(ry) * d[:, 0] - np.sin(ry) * d[:, 2]
        lz = np.sin(ry) * d[:, 0] + np.cos(ry) * d[:, 2]
        out.append((f[0], int(((abs(lx) <= l / 2) & (abs(lz) <= w / 2) & (d[:, 1] <= 0) & (d[:, 1] >= -h)).sum())))
    return out


def camera_box_corners_in_lidar(frame: str) -> list[np.ndarray]:
    """The 8 corners of each label box, built in the camera frame, moved to the LiDAR frame."""
    inv = np.linalg.inv(raw_calib(frame)["velo_to_rect"])
    out = []
    for line in open(kitti(f"label_2/{frame}.txt")):
        f = line.split()
        if f[0] == "DontCare":
            continue
        h, w, l, x, y, z, ry = map(float, f[8:15])
        corners = np.array([[sx * l / 2, sy, sz * w / 2] for sx in (1, -1) for sy in (0, -h) for sz in (1, -1)])
        rot = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
        cam = corners @ rot.T + [x, y, z]
        out.append((inv @ np.c_[cam, np.ones(8)].T).T[:, :3])
    return out


def lidar_box_corners(box: np.ndarray) -> np.ndarray:
    x, y, z, dx, dy, dz, heading = box
    local = np.array([[sx * dx / 2, sy * dy / 2, sz * dz / 2] for sx in (1, -1) for sy in (1, -1) for sz in (1, -1)])
    rot = np.array([[np.cos(heading), -np.sin(heading), 0], [np.sin(heading), np.cos(heading), 0], [0, 0, 1]])
    return local @ rot.T + [x, y, z]


@pytest.mark.parametrize("frame", FRAMES)
def test_kitti_frame_shapes_and_the_readme_checks(root, frame):
    f = io.read_kitti_frame(root, frame)
    assert f.points.shape == (POINTS[frame], 4) and f.points.dtype == np.float32
    assert f.calib.P2.shape == (3, 4) and f.calib.R0_rect.shape == (3, 3) and f.calib.Tr_imu_to_velo.shape == (3, 4)
    assert f.boxes.boxes.shape == (len(f.boxes.names), 7) and "DontCare" not in f.boxes.names
    assert len(f.labels.types) == len(f.boxes.names) + f.labels.types.count("DontCare")

    # points projected into image_2 (README: about 18.6k-20.3k a frame), with the README's own matrices
    width, height = Image.open(kitti(f"image_2/{frame}.png")).size
    m = raw_calib(frame)
    uvw = (m["P2"] @ m["velo_to_rect"] @ np.c_[f.points[:, :3], np.ones(len(f.points))].T).T
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = uvw[:, 0] / uvw[:, 2], uvw[:, 1] / uvw[:, 2]
    in_image = int(((uvw[:, 2] > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)).sum())
    assert 18_600 <= in_image <= 20_300
    uv, depth = f.calib.lidar_to_image(f.points)
    assert int(((depth > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)).sum()) \
        == in_image

    # every labelled box holds LiDAR points; the README's two counts are camera-frame counts
    camera = camera_frame_counts(f.points, frame)
    assert [t for t, _ in camera] == f.boxes.names and all(c > 0 for _, c in camera)
    readme = {"000000": [("Pedestrian", 376)], "000003": [("Car", 680)]}
    if frame in readme:
        assert camera == readme[frame]
    # the LiDAR-frame boxes: corners within 5 cm of the camera box moved over (the LiDAR box is upright),
    # and nearly the same points inside
    for box, corners in zip(f.boxes.boxes, camera_box_corners_in_lidar(frame)):
        dist = np.linalg.norm(lidar_box_corners(box)[:, None] - corners[None], axis=-1)   # (8, 8)
        assert dist.min(1).max() < TILT * max(box[3:6]) and dist.min(0).max() < TILT * max(box[3:6])
        assert np.linalg.norm(lidar_box_corners(box).mean(0) - corners.mean(0)) < TILT * box[5]   # lifted along z
    lidar = points_in_boxes(f.points, f.boxes.boxes).sum(1)
    for (_, c_cam), c_lidar in zip(camera, lidar):
        assert abs(int(c_lidar) - c_cam) <= max(2, 0.01 * c_cam)


def test_lidar_box_heading_and_size_follow_openpcdet():
    """000003's car: camera rotation_y 1.62, so heading = -1.62 - pi/2; dx, dy, dz = l, w, h."""
    f = io.read_kitti_frame(kitti("velodyne/000003.bin").parents[1], "000003")
    x, y, z, dx, dy, dz, heading = f.boxes.boxes[0]
    assert (dx, dy, dz) == (4.15, 1.73, 1.57)
    assert heading == pytest.approx(-1.62 - np.pi / 2)
    assert 12 < x < 15 and abs(y) < 2   # 13 m ahead in the camera's z, about on the axis


def test_calibration_and_labels_parse_exactly():
    c0 = io.read_kitti_calib(kitti("calib/000000.txt"))
    assert c0.P2[0, 3] == 4.575831e01 and c0.R0_rect[0, 0] == 9.999128e-01 and c0.P0[0, 0] == 7.070493e02
    c = io.read_kitti_calib(kitti("calib/000001.txt"))
    for frame in FRAMES[2:]:   # frames 1-5 share one calibration file (README: same MD5)
        assert np.array_equal(io.read_kitti_calib(kitti(f"calib/{frame}.txt")).Tr_velo_to_cam, c.Tr_velo_to_cam)
    labels = io.read_kitti_labels(kitti("label_2/000001.txt"))
    assert Counter(labels.types) == Counter({"DontCare": 4, "Truck": 1, "Car": 1, "Cyclist": 1})
    assert labels.dimensions[0].tolist() == [2.85, 2.63, 12.34] and labels.location[0].tolist() == [0.47, 1.49, 69.44]
    assert labels.occluded.tolist() == [0, 0, 3, -1, -1, -1, -1] and labels.score is None


def test_nuscenes_scan_and_trusted_info():
    scan = io.read_nuscenes_points(shared_file(NUSC_SCAN))
    assert scan.shape == (34688, 5) and scan[:, 4].min() >= 0 and scan[:, 4].max() <= 31
    pkl = shared_file(f"{NUSC}.pkl")
    with pytest.raises(StageError, match="refusing to unpickle") as e:
        io.read_nuscenes_info(pkl)
    assert e.value.path == str(pkl)
    info = io.read_nuscenes_info(pkl, trusted=True)
    boxes = io.nuscenes_boxes(info)
    assert len(boxes) == 69
    assert Counter(boxes.names) == Counter({"pedestrian": 30, "barrier": 22, "car": 8, "traffic_cone": 3,
                                            "truck": 2, "bicycle": 1, "bus": 1, "construction_vehicle": 1,
                                            "ignore": 1})
    # README: recounting with the gravity-centre convention gives 994 points (1009 recorded); 61 of 69 exact
    recorded = np.array([inst["num_lidar_pts"] for inst in info["data_list"][0]["instances"]])
    counts = independent_points_in_boxes(scan, boxes.boxes)
    assert counts.sum() == 994 and recorded.sum() == 1009 and (counts == recorded).sum() == 61
    assert np.array_equal(points_in_boxes(scan, boxes.boxes).sum(1), counts)


def independent_points_in_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Points inside each box by half-planes of its footprint corners (no rotation of the points)."""
    counts = []
    for box in boxes:
        c = lidar_box_corners(box)[[0, 2, 6, 4], :2]      # footprint, top face order: +x+y, +x-y, -x-y, -x+y
        inside = np.ones(len(points), bool)
        for a, b in zip(c, np.roll(c, -1, 0)):
            cross = (b[0] - a[0]) * (points[:, 1] - a[1]) - (b[1] - a[1]) * (points[:, 0] - a[0])
            inside &= cross <= 1e-9
        inside &= np.abs(points[:, 2] - box[2]) <= box[5] / 2
        counts.append(int(inside.sum()))
    return np.array(counts)


def test_kitti_lidar_counts_match_an_independent_count(root):
    for frame in ("000000", "000003"):
        f = io.read_kitti_frame(root, frame)
        assert np.array_equal(points_in_boxes(f.points, f.boxes.boxes).sum(1),
                              independent_points_in_boxes(f.points, f.boxes.boxes))


# ---------------------------------------------------------------------------------------------------
# bad files (the command's one-line errors are in tests/test_bad_inputs.py)

def test_bad_scans_are_refused_naming_the_file(tmp_path):
    good = np.arange(40, dtype=np.float32)
    cases = {"partial.bin": good.tobytes()[:-4], "empty.bin": b"",
             "nan.bin": np.where(np.arange(40) == 9, np.nan, good).astype(np.float32).tobytes(),
             "inf.bin": np.where(np.arange(40) == 2, -np.inf, good).astype(np.float32).tobytes()}
    expect = {"partial.bin": "not a multiple of the 16-byte point", "empty.bin": "empty scan",
              "nan.bin": "non-finite .* first at point 2 column 1", "inf.bin": "non-finite .* first at point 0 column 2"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(StageError, match=expect[name]) as e:
            io.read_kitti_points(tmp_path / name)
        assert e.value.path == str(tmp_path / name)
    (tmp_path / "scan.pcd.bin").write_bytes(good.tobytes())   # 160 bytes: 10 KITTI points, 8 nuScenes points
    assert io.read_nuscenes_points(tmp_path / "scan.pcd.bin").shape == (8, 5)
    (tmp_path / "odd.pcd.bin").write_bytes(good.tobytes()[:64])
    with pytest.raises(StageError, match="not a multiple of the 20-byte point"):
        io.read_nuscenes_points(tmp_path / "odd.pcd.bin")


def test_bad_calibration_and_labels(tmp_path):
    text = kitti("calib/000000.txt").read_text()
    cases = {
        "missing key": (text.replace("Tr_velo_to_cam", "Tr_velo_cam"), "missing Tr_velo_to_cam"),
        "short row": ("\n".join(line.rsplit(" ", 1)[0] if line.startswith("R0_rect") else line
                                 for line in text.strip().splitlines()), "R0_rect: expected 9 values, found 8"),
        "text": (text.replace("P2: 7.070493000000e+02", "P2: seven"), "P2: not a number: 'seven'"),
        "no colon": ("P0 1 2 3\n", "expected `KEY: values`"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / f"{name}.txt"
        path.write_text(content)
        with pytest.raises(StageError, match=match):
            io.read_kitti_calib(path)
    line = kitti("label_2/000003.txt").read_text().splitlines()[0]
    label_cases = {"fields": (line.rsplit(" ", 1)[0], "line 1: expected 15 fields .* found 14"),
                   "number": (line.replace("1.62", "1.6x"), "line 1: not a number: '1.6x'"),
                   "type": (line.replace("Car", "Cat"), "unknown object type 'Cat'"),
                   "size": (line.replace("1.57 1.73 4.15", "1.57 0 4.15"), "dimensions h w l must be > 0")}
    for name, (content, match) in label_cases.items():
        path = tmp_path / f"{name}.txt"
        path.write_text(content + "\n")
        with pytest.raises(StageError, match=match):
            io.read_kitti_labels(path)
    (tmp_path / "empty.txt").write_text("")
    assert len(io.kitti_boxes_to_lidar(io.read_kitti_labels(tmp_path / "empty.txt"),
                                       io.read_kitti_calib(kitti("calib/000000.txt")))) == 0
    (tmp_path / "scored.txt").write_text(line + " 0.93\n")
    assert io.read_kitti_labels(tmp_path / "scored.txt").score.tolist() == [0.93]
    with pytest.raises(StageError, match="not found"):
        io.read_kitti_labels(tmp_path / "absent.txt")


def test_the_command_writes_a_summary(tmp_path):
    src = tmp_path / "kitti"
    for sub, ext in (("velodyne", "bin"), ("calib", "txt"), ("label_2", "txt")):
        (src / sub).mkdir(parents=True)
        shutil.copy(kitti(f"{sub}/000003.{ext}"), src / sub)
    io.main([str(src), str(tmp_path / "out.json"), "--nuscenes", str(shared_file(NUSC_SCAN))])
    import json
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["frames"]["000003"]["points"] == 113110
    assert summary["frames"]["000003"]["boxes"] == [{"type": "Car", "points_inside": 674}]
    assert list(summary["nuscenes_scans"].values()) == [{"points": 34688}]
