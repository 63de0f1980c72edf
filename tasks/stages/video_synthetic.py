"""Synthetic action videos for the `videos` stage's default profile: frames drawn here, encoded by PyAV.

Each action class is an object of its own appearance (shape and colour) moving in its own way:

    red_square_slide     a red square sliding to the right
    green_circle_bounce  a green circle bouncing up and down
    blue_triangle_spin   a blue triangle spinning in place
    yellow_bar_pulse     a yellow bar growing and shrinking
    magenta_cross_orbit  a magenta cross moving in a circle

A localization video is a textured, noisy background with drifting grey distractor blobs; each action
instance shows its object standing still for 1-2.5 s, then moving (the annotated segment), then still
again for 1-2.5 s before it vanishes. A frame encoder sees the object's appearance on all of that; only
a motion-sensitive clip encoder can tell the moving part from the still ones. Nothing in the features
is told this: it follows from what each encoder sees.

The pretraining set (a Kinetics stand-in: other random videos) holds short trimmed clips of each
motion; half show the class's own object, half a random shape and colour, so a clip classifier must
learn the motion, and only the class's own object is what its prompt describes. Background clips
(no action object) go with generic prompts.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class ActionClass:
    name: str
    shape: str                       # square | circle | triangle | bar | cross
    color: tuple[int, int, int]      # RGB
    motion: str                      # slide | bounce | spin | pulse | orbit
    prompt: str


CLASSES = (
    ActionClass("red_square_slide", "square", (220, 30, 30), "slide", "a video of a red square sliding to the right"),
    ActionClass("green_circle_bounce", "circle", (30, 200, 40), "bounce", "a video of a green circle bouncing up and down"),
    ActionClass("blue_triangle_spin", "triangle", (40, 70, 230), "spin", "a video of a blue triangle spinning in place"),
    ActionClass("yellow_bar_pulse", "bar", (235, 215, 30), "pulse", "a video of a yellow bar growing and shrinking"),
    ActionClass("magenta_cross_orbit", "cross", (220, 40, 210), "orbit", "a video of a magenta cross moving in a circle"),
)
BY_NAME = {c.name: c for c in CLASSES}
BACKGROUND_PROMPTS = ("a video of an empty textured background", "a video of grey blobs drifting over a noisy background")
SHAPES = ("square", "circle", "triangle", "bar", "cross")
EXTRA_COLORS = ((240, 140, 20), (20, 200, 200), (250, 250, 250), (120, 60, 200))


@dataclass(frozen=True)
class Instance:
    cls: int            # index into the classes used
    appear: int         # first frame the object is visible (still)
    start: int          # first moving frame: the annotated segment is [start, end) frames
    end: int
    vanish: int         # first frame without the object
    x: float            # anchor position (pixels) and scale
    y: float
    scale: float


# ---------------------------------------------------------------------------------------------------
# drawing

@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(c, c)  # xx, yy (size, size)


def shape_mask(shape: str, size: int, x: float, y: float, r: float, angle: float = 0.0,
               stretch: float = 1.0) -> np.ndarray:
    """Soft (anti-aliased) coverage in [0, 1] of a shape of radius ~r centred at (x, y)."""
    xx, yy = _grid(size)
    ca, sa = math.cos(angle), math.sin(angle)
    u, v = (xx - x) * ca + (yy - y) * sa, -(xx - x) * sa + (yy - y) * ca
    if shape != "bar":  # a bar pulses along its length; other shapes pulse as a whole
        r *= 1.0 + 0.5 * (stretch - 1.0)
    if shape == "square":
        d = np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    elif shape == "circle":
        d = np.hypot(u, v) - r
    elif shape == "triangle":
        normals = [(-math.sin(a), math.cos(a)) for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
        d = np.max([u * nx + v * ny for nx, ny in normals], axis=0) - 0.55 * r
    elif shape == "bar":
        d = np.maximum(np.abs(u) - 1.1 * r * stretch, np.abs(v) - 0.45 * r)
    elif shape == "cross":
        d = np.minimum(np.maximum(np.abs(u) - r, np.abs(v) - 0.3 * r), np.maximum(np.abs(u) - 0.3 * r, np.abs(v) - r))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - d, 0.0, 1.0)


def motion_pose(motion: str, p: float, length: float, extent: float) -> tuple[float, float, float, float]:
    """(dx, dy, angle, stretch) at phase p in [0, 1] of a motion lasting `length` seconds; every
    motion starts and ends at the object's rest pose, except a slide, which ends `extent` to the right."""
    cycles = max(1, round(length * 0.75))
    if motion == "slide":
        return 1.4 * extent * p, 0.0, 0.0, 1.0
    if motion == "bounce":
        return 0.0, -0.5 * extent * abs(math.sin(math.pi * cycles * p)), 0.0, 1.0
    if motion == "spin":
        return 0.0, 0.0, 2 * math.pi * cycles * p, 1.0
    if motion == "pulse":
        return 0.0, 0.0, 0.0, 1.0 + 0.9 * abs(math.sin(math.pi * cycles * p))
    if motion == "orbit":
        a = 2 * math.pi * cycles * p
        return 0.3 * extent * (math.cos(a) - 1), 0.3 * extent * math.sin(a), 0.0, 1.0
    raise ValueError(f"unknown motion {motion!r}")


class Background:
    """A fixed low-frequency texture, drifting grey blobs and per-frame sensor noise."""

    def __init__(self, size: int, rng: np.random.Generator, blobs: int) -> None:
        self.size, self.rng = size, rng
        coarse = rng.normal(0, 1, (6, 6, 3)).astype(np.float32)
        idx = np.linspace(0, 5, size)
        i0 = np.floor(idx).astype(int).clip(0, 4)
        w = (idx - i0)[:, None]
        rows = coarse[i0] * (1 - w[..., None]) + coarse[i0 + 1] * w[..., None]           # (size, 6, 3)
        tex = rows[:, i0] * (1 - w.T[..., None]) + rows[:, i0 + 1] * w.T[..., None]     # (size, size, 3)
        tint = rng.uniform(90, 140, 3).astype(np.float32)
        self.texture = tint + 22 * tex + 6 * rng.normal(0, 1, (size, size, 3)).astype(np.float32)
        self.blobs = [dict(x=rng.uniform(0, size), y=rng.uniform(0, size), vx=rng.normal(0, 0.25),
                           vy=rng.normal(0, 0.25), r=rng.uniform(0.07, 0.13) * size, g=rng.uniform(60, 190))
                      for _ in range(blobs)]

    def frame(self) -> np.ndarray:
        img = self.texture.copy()
        for b in self.blobs:
            b["vx"] = 0.95 * b["vx"] + self.rng.normal(0, 0.06)
            b["vy"] = 0.95 * b["vy"] + self.rng.normal(0, 0.06)
            b["x"] = (b["x"] + b["vx"]) % self.size
            b["y"] = (b["y"] + b["vy"]) % self.size
            m = shape_mask("circle", self.size, b["x"], b["y"], b["r"])[..., None]
            img = img * (1 - m) + b["g"] * m
        return img + self.rng.normal(0, 5, img.shape).astype(np.float32)


def place(motion: str, size: int, r: float, rng: np.random.Generator) -> tuple[float, float]:
    """A rest position from which the whole path of `motion` stays inside the frame."""
    e = 0.4 * size
    # room needed left, right, above, below the rest position
    left, right, up, down = {"slide": (0, 1.4 * e, 0, 0), "bounce": (0, 0, 0.5 * e, 0), "orbit": (0.6 * e, 0, 0.3 * e, 0.3 * e),
                             "pulse": (1.2 * r, 1.2 * r, 0, 0), "spin": (0.3 * r, 0.3 * r, 0.3 * r, 0.3 * r)}[motion]
    lo, hi = r + 2, size - r - 2
    return float(rng.uniform(lo + left, hi - right)), float(rng.uniform(lo + up, hi - down))


def _draw(img: np.ndarray, shape: str, color: tuple[int, int, int], x: float, y: float, r: float,
          angle: float, stretch: float) -> np.ndarray:
    m = shape_mask(shape, img.shape[0], x, y, r, angle, stretch)[..., None]
    return img * (1 - m) + np.asarray(color, np.float32) * m


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# localization videos

def plan_video(rng: np.random.Generator, classes: tuple[ActionClass, ...], n_frames: int, fps: int, size: int,
               max_instances: int, min_instances: int = 1) -> list[Instance]:
    """Non-overlapping instances (still / moving / still windows) with background between them."""
    n_classes = len(classes)
    n = int(rng.integers(min_instances, max_instances + 1))
    first = int(rng.integers(n_classes))
    while True:
        windows = []
        for i in range(n):
            cls = first if i == 0 or rng.random() < 0.6 else int(rng.integers(n_classes))
            pre, move, post = (int(round(rng.uniform(a, b) * fps)) for a, b in ((1.0, 2.5), (2.0, 4.0), (1.0, 2.5)))
            windows.append((cls, pre, move, post))
        free = n_frames - sum(p + m + q for _, p, m, q in windows)
        if free >= (n + 1) * fps // 2 or n == 1:
            break
        n -= 1
    if free < 0:  # one instance longer than a short video: shrink its three windows alike
        k = n_frames / (n_frames - free)
        windows = [(c, max(1, int(p * k)), max(2, int(m * k)), max(1, int(q * k))) for c, p, m, q in windows]
        free = n_frames - sum(p + m + q for _, p, m, q in windows)
    free = max(free, 0)
    gaps = np.floor(rng.dirichlet(np.ones(n + 1)) * free).astype(int)
    out, t = [], int(gaps[0])
    for (cls, pre, move, post), gap in zip(windows, gaps[1:]):
        scale = float(rng.uniform(0.9, 1.1))
        x, y = place(classes[cls].motion, size, 0.11 * size * scale, rng)
        out.append(Instance(cls, t, t + pre, t + pre + move, min(t + pre + move + post, n_frames), x, y, scale))
        t += pre + move + post + int(gap)
    return out


def render_video(instances: list[Instance], classes: tuple[ActionClass, ...], n_frames: int, fps: int,
                 size: int, seed: int) -> Iterator[np.ndarray]:
    """The frames of one localization video, one at a time."""
    rng = np.random.default_rng(seed)
    bg = Background(size, rng, blobs=int(rng.integers(1, 3)))
    extent = 0.4 * size
    for f in range(n_frames):
        img = bg.frame()
        for inst in instances:
            if not inst.appear <= f < inst.vanish:
                continue
            c = classes[inst.cls]
            length = (inst.end - inst.start) / fps
            p = min(max((f - inst.start) / max(inst.end - inst.start - 1, 1), 0.0), 1.0)
            dx, dy, angle, stretch = motion_pose(c.motion, p, length, extent)
            img = _draw(img, c.shape, c.color, inst.x + dx, inst.y + dy, 0.11 * size * inst.scale, angle, stretch)
        yield _to_uint8(img)


# ---------------------------------------------------------------------------------------------------
# pretraining clips

def render_clip(cls: ActionClass | None, n_frames: int, fps: int, size: int, seed: int,
                canonical: bool) -> Iterator[np.ndarray]:
    """A trimmed clip: the object moving throughout (a random phase and speed of its motion), drawn
    with the class's own look when `canonical`, else a random shape and colour. `cls` None: background."""
    rng = np.random.default_rng(seed)
    bg = Background(size, rng, blobs=int(rng.integers(1, 3)))
    if cls is not None:
        # a spinning circle would not move at all: spins take one of the other shapes
        shapes = [s for s in SHAPES if not (cls.motion == "spin" and s == "circle")]
        shape, color = (cls.shape, cls.color) if canonical else (
            shapes[int(rng.integers(len(shapes)))],
            CLASSES[int(rng.integers(len(CLASSES)))].color if rng.random() < 0.5
            else EXTRA_COLORS[int(rng.integers(len(EXTRA_COLORS)))])
        length = float(rng.uniform(2.0, 4.0))        # the whole motion's length: sets its speed
        p0 = float(rng.uniform(0, 1 - min(n_frames / fps / length, 1.0)))
        extent = 0.4 * size
        r = 0.11 * size * float(rng.uniform(0.9, 1.1))
        x, y = place(cls.motion, size, r, rng)
    for f in range(n_frames):
        img = bg.frame()
        if cls is not None:
            p = p0 + f / fps / length
            dx, dy, angle, stretch = motion_pose(cls.motion, p, length, extent)
            img = _draw(img, shape, color, x + dx, y + dy, r, angle, stretch)
        yield _to_uint8(img)
