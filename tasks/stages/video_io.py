"""Video reading for the video stages: probe a file, decode it as a stream of resized RGB frames, cut
the stream into snippets, and encode frames into a real video file (the generator's writer).

PyAV (FFmpeg) does the work, with FFmpeg's own frame/slice threads (`thread_type = "AUTO"`). Nothing
here holds more than one snippet of frames (plus what a caller queues): memory does not grow with a
video's length.

Snippet k of a video of F frames starts at frame k*stride and spans `n` frames; it exists when k = 0
or when it starts inside the video and the previous one did not reach the end. The last snippet is
padded with the video's last frame, so every frame (up to a stride gap when stride > n) is in one.
Times are frame index / fps (the stream's average rate): t_start = k*stride/fps, t_end =
min(k*stride + n, F)/fps.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..platform.common import StageError


class BadVideo(StageError):
    """A problem with one video file: an error, or a skip recorded in the report (`on_bad_video: skip`)."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int
    height: int
    fps: float
    codec: str
    frames: int          # frames the container lists (0: unknown)
    has_audio: bool


def _ffmpeg_reason(e: Exception) -> str:
    return str(getattr(e, "strerror", None) or e).strip()


def probe(path: str | Path, max_resolution: tuple[int, int] | None = None,
          limit_name: str = "max_resolution") -> VideoInfo:
    """Opens `path` and decodes its first frame; BadVideo names the file and what is wrong.
    `limit_name`: how the error names the resolution limit (its params key)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise BadVideo(path, "video file not found")
    if path.stat().st_size == 0:
        raise BadVideo(path, "empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise BadVideo(path, f"not a readable video (truncated, or not a video container): "
                             f"{_ffmpeg_reason(e)}") from None
    with container:
        if not container.streams:
            raise BadVideo(path, "no streams at all: an empty container (zero frames)")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise BadVideo(path, f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        codec = getattr(getattr(ctx, "codec", None), "name", None) if ctx is not None else None
        if ctx is None or not codec or codec == "none":
            tag = getattr(ctx, "codec_tag", "") if ctx is not None else ""
            raise BadVideo(path, f"unknown or unsupported video codec{f' (tag {tag!r})' if tag else ''}")
        width, height = ctx.width, ctx.height
        if width <= 0 or height <= 0:
            raise BadVideo(path, f"no frame size in the video stream ({width}x{height})")
        if max_resolution is not None and (width > max_resolution[0] or height > max_resolution[1]):
            raise BadVideo(path, f"resolution {width}x{height} exceeds {limit_name} "
                                 f"{max_resolution[0]}x{max_resolution[1]}")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if not fps > 0:
            raise BadVideo(path, "no frame rate in the video stream")
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise BadVideo(path, f"undecodable {codec} video: {_ffmpeg_reason(e)}") from None
        if first is None:
            raise BadVideo(path, "zero frames: the video stream holds no decodable frame")
        return VideoInfo(str(path), width, height, fps, codec, int(stream.frames or 0),
                         bool(container.streams.audio))


def _resize_box(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the short side `size`."""
    scale = size / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    return w, h


def iter_frames(path: str | Path, size: int) -> Iterator[np.ndarray]:
    """Decoded frames, resized (short side `size`, area filter) and centre-cropped to (size, size, 3)
    uint8 RGB, one at a time. BadVideo if decoding fails part-way or fewer than 95% of the frames
    the container lists decode (a truncated file)."""
    import av
    from av.video.reformatter import VideoReformatter

    path = Path(path)
    count = 0
    reformatter = VideoReformatter()  # one scaler context for the whole video: per frame it costs 2x
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # FFmpeg frame + slice threads; the GIL is released while it decodes
            listed = int(stream.frames or 0)
            box = None
            for frame in container.decode(stream):
                if box is None:
                    box = _resize_box(frame.width, frame.height, size)
                    x0, y0 = (box[0] - size) // 2, (box[1] - size) // 2
                rgb = reformatter.reformat(frame, box[0], box[1], "rgb24", interpolation="AREA").to_ndarray()
                count += 1
                yield rgb[y0:y0 + size, x0:x0 + size]
    except av.FFmpegError as e:
        raise BadVideo(path, f"corrupt video: decoding failed after {count} frames: {_ffmpeg_reason(e)}") from None
    if count == 0:
        raise BadVideo(path, "zero frames: the video stream holds no decodable frame")
    if listed and count < 0.95 * listed:
        raise BadVideo(path, f"truncated: {count} of the {listed} frames the container lists decode")


def snippet_count(n_frames: int, n: int, stride: int) -> int:
    """How many snippets `iter_snippets` yields for a video of `n_frames` frames."""
    if n_frames <= 0:
        return 0
    k = 1
    while k * stride < n_frames and (k - 1) * stride + n < n_frames:
        k += 1
    return k


def snippet_times(n_frames: int, n: int, stride: int, fps: float) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(snippet_count(n_frames, n, stride)) * stride
    return (starts / fps).astype(np.float32), (np.minimum(starts + n, n_frames) / fps).astype(np.float32)


def iter_snippets(frames: Iterable[np.ndarray], n: int, stride: int) -> Iterator[np.ndarray]:
    """(n, H, W, 3) snippets every `stride` frames (see the module docstring); holds at most n frames."""
    buf: list[np.ndarray] = []
    next_start, index, k = 0, 0, 0
    for frame in frames:
        if index >= next_start:
            buf.append(frame)
        index += 1
        if len(buf) == n:
            yield np.stack(buf)
            k += 1
            next_start += stride
            buf = buf[stride:] if stride < n else []
    covered = (k - 1) * stride + n if k else 0
    if buf and index > covered:
        yield np.stack(buf + [buf[-1]] * (n - len(buf)))


# ---------------------------------------------------------------------------------------------------
# writing

def encoder_name() -> str:
    """libx264 where the bundled FFmpeg has it, else mpeg4."""
    import av
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: int, codec: str | None = None,
                crf: int = 18) -> int:
    """Encodes (H, W, 3) uint8 RGB frames into `path` (mp4/avi by suffix); returns the frame count."""
    import av

    codec = codec or encoder_name()
    count = 0
    with av.open(str(path), "w") as container:
        stream = None
        for rgb in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=fps)
                stream.height, stream.width = rgb.shape[:2]
                stream.pix_fmt = "yuv420p"
                if codec == "libx264":
                    stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
                else:
                    stream.bit_rate = 2_000_000
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
            count += 1
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return count


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
