"""A generated features directory in the localization data contract (tasks/kinds/localization/schema.py),
for tests and for running the localization methods before the video stages exist:

    python tests/localization_fixture.py /tmp/features [--train 160 --val 40 --test 40]

Each video is background snippets with 1–2 action classes, 1–2 segments each. A snippet's feature is
noise plus, inside a ground-truth segment, its class's prototype, scaled per extractor to mimic the
two branches of the WTAL paper: the CBP key carries the class at full strength only in the core of a
segment (weakly at its edges: an incomplete localizer), the VLP key carries the class's *text
embedding* over the whole segment and, weaker, a few snippets before and after it (over-complete).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.kinds.localization.schema import (SEGMENTS_SCHEMA, VIDEOS_SCHEMA, classes_schema, snippet_path,
                                             snippets_schema, write_table)

CLASS_NAMES = ("arm wrestling", "apply eye makeup", "drink water", "jump/rope")


def place_segments(rng: np.random.Generator, t: int, n: int, length: tuple[int, int],
                   gap: int) -> list[tuple[int, int]]:
    """Up to `n` non-overlapping [start, end) snippet ranges at least `gap` apart and from the ends."""
    placed: list[tuple[int, int]] = []
    for _ in range(20 * n):
        if len(placed) == n:
            break
        size = int(rng.integers(length[0], length[1] + 1))
        if t - 2 * gap - size <= 0:
            break
        s = int(rng.integers(gap, t - gap - size + 1))
        if all(s >= e + gap or s + size + gap <= b for b, e in placed):
            placed.append((s, s + size))
    return sorted(placed)


def write_features(root: str | Path, counts: dict[str, int] | None = None, seed: int = 0,
                   snippets: tuple[int, int] = (40, 72), length: tuple[int, int] = (6, 14),
                   dims: tuple[int, int] = (32, 48), amplitude: float = 0.6, margin: int = 3,
                   snippet_seconds: float = 1.0, classes: tuple[str, ...] = CLASS_NAMES) -> Path:
    """Writes classes.parquet, videos.parquet, segments.parquet and snippets/ under `root`."""
    root = Path(root)
    (root / "snippets").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = counts or {"train": 48, "val": 16, "test": 16}
    d_cbp, d_vlp = dims
    n_cls = len(classes)
    text = rng.normal(size=(n_cls, d_vlp)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    proto_cbp = rng.normal(size=(n_cls, d_cbp)).astype(np.float32)
    proto_vlp = text * np.sqrt(d_vlp)  # the class's prompt direction, at the noise's scale

    write_table(pa.table({"class_id": np.arange(n_cls, dtype=np.int32), "name": list(classes),
                          "prompt": [f"a video of a person doing {c}" for c in classes],
                          "text_embedding": list(text)}), root / "classes.parquet", classes_schema(d_vlp))
    videos, segments = [], []
    schema = snippets_schema({"cbp": d_cbp, "vlp": d_vlp})
    for subset, n in counts.items():
        for k in range(n):
            vid = f"{subset}_{k:04d}"
            t = int(rng.integers(snippets[0], snippets[1] + 1))
            present = rng.choice(n_cls, size=1 + int(rng.random() < 0.25), replace=False)
            wanted = [(int(c), 1 + int(rng.random() < 0.5)) for c in present]
            ranges = place_segments(rng, t, sum(m for _, m in wanted), length, gap=margin + 1)
            labels = [c for c, m in wanted for _ in range(m)][:len(ranges)]
            rng.shuffle(labels)
            cbp = rng.normal(size=(t, d_cbp)).astype(np.float32)
            vlp = rng.normal(size=(t, d_vlp)).astype(np.float32)
            for c, (s, e) in zip(labels, ranges):
                edge = max(1, (e - s) // 4)
                strength_cbp = np.full(e - s, 0.25, np.float32)
                strength_cbp[edge:e - s - edge] = 1.0            # the core only: incomplete
                cbp[s:e] += amplitude * strength_cbp[:, None] * proto_cbp[c]
                vlp[s:e] += amplitude * proto_vlp[c]
                for lo, hi in ((max(0, s - margin), s), (e, min(t, e + margin))):
                    vlp[lo:hi] += 0.6 * amplitude * proto_vlp[c]  # spills over: over-complete
                segments.append((vid, c, s * snippet_seconds, e * snippet_seconds))
            starts = np.arange(t, dtype=np.float32) * snippet_seconds
            write_table(pa.table({"video_id": [vid] * t, "snippet": np.arange(t, dtype=np.int32),
                                  "t_start": starts, "t_end": starts + snippet_seconds,
                                  "cbp": list(cbp), "vlp": list(vlp)}), snippet_path(root, vid), schema)
            videos.append((vid, subset, t * snippet_seconds, 25.0, t, sorted(set(labels))))
    write_table(pa.table({k: [v[i] for v in videos] for i, k in enumerate(VIDEOS_SCHEMA.names)}),
                root / "videos.parquet", VIDEOS_SCHEMA)
    write_table(pa.table({k: [s[i] for s in segments] for i, k in enumerate(SEGMENTS_SCHEMA.names)}),
                root / "segments.parquet", SEGMENTS_SCHEMA)
    return root


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--train", type=int, default=160)
    ap.add_argument("--val", type=int, default=40)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    counts = {"train": args.train, "val": args.val, "test": args.test}
    print(write_features(args.root, counts, seed=args.seed))
