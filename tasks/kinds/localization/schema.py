"""The video-features data contract: the Parquet layout the `video_features` stage writes and the
localization kind reads, and the Great Expectations suites both sides run on it.

A features directory (`data/video/<profile>/features/`) holds

    classes.parquet   class_id int32, name, prompt, text_embedding fixed_size_list<float32>[D_vlp]
                      (the class prompt in the VLP encoder's joint space: the text-prompt classifier)
    videos.parquet    video_id, subset (train | val | test | unlabelled), duration (s), fps,
                      n_snippets int32, labels list<int32> (video-level: all training may see)
    segments.parquet  video_id, class_id int32, t_start, t_end (s): ground truth, for evaluation only
    snippets/<video_id>.parquet
                      one row per snippet in time order: video_id, snippet int32, t_start, t_end (s),
                      and one fixed_size_list<float32> column per feature extractor (FEATURE_KEYS);
                      the schema metadata `distillery.extract_sha256` names the extraction settings,
                      so a rerun with the same settings skips the video (the stage resumes)

Every file is written atomically; a video's snippet file exists complete or not at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ...platform.common import StageError, atomic_path
from ...platform.validation import Suite, validate_frame

FEATURE_KEYS = ("cbp", "vlp")  # classification-pretrained 3D CNN, vision-language image encoder
SUBSETS = ("train", "val", "test", "unlabelled")
SPLITS = ("train", "val", "test")
EXTRACT_HASH_KEY = b"distillery.extract_sha256"

VIDEOS_SCHEMA = pa.schema([("video_id", pa.string()), ("subset", pa.string()), ("duration", pa.float32()),
                           ("fps", pa.float32()), ("n_snippets", pa.int32()), ("labels", pa.list_(pa.int32()))])
SEGMENTS_SCHEMA = pa.schema([("video_id", pa.string()), ("class_id", pa.int32()), ("t_start", pa.float32()),
                             ("t_end", pa.float32())])


def classes_schema(text_dim: int) -> pa.Schema:
    return pa.schema([("class_id", pa.int32()), ("name", pa.string()), ("prompt", pa.string()),
                      ("text_embedding", pa.list_(pa.float32(), text_dim))])


def snippets_schema(dims: dict[str, int]) -> pa.Schema:
    """`dims`: feature key -> width, e.g. {"cbp": 64, "vlp": 384}."""
    return pa.schema([("video_id", pa.string()), ("snippet", pa.int32()), ("t_start", pa.float32()),
                      ("t_end", pa.float32())] + [(k, pa.list_(pa.float32(), dims[k])) for k in FEATURE_KEYS])


def snippet_path(features_dir: str | Path, video_id: str) -> Path:
    return Path(features_dir) / "snippets" / f"{video_id}.parquet"


# ---------------------------------------------------------------------------------------------------
# suites (GX runs on flat frames: the list columns are checked as arrays, below)

def videos_suite(num_classes: int) -> Suite:
    def build() -> list[Any]:
        import great_expectations as gx
        E = gx.expectations
        return [E.ExpectColumnValuesToBeUnique(column="video_id"),
                E.ExpectColumnValuesToNotBeNull(column="video_id"),
                E.ExpectColumnValuesToBeInSet(column="subset", value_set=list(SUBSETS)),
                E.ExpectColumnValuesToBeBetween(column="duration", min_value=0, strict_min=True),
                E.ExpectColumnValuesToBeBetween(column="fps", min_value=0, strict_min=True),
                E.ExpectColumnValuesToBeBetween(column="n_snippets", min_value=1),
                E.ExpectColumnValuesToBeBetween(column="max_label", min_value=-1, max_value=num_classes - 1)]
    return build


def segments_suite(num_classes: int) -> Suite:
    def build() -> list[Any]:
        import great_expectations as gx
        E = gx.expectations
        return [E.ExpectColumnValuesToNotBeNull(column="video_id"),
                E.ExpectColumnValuesToBeBetween(column="class_id", min_value=0, max_value=num_classes - 1),
                E.ExpectColumnValuesToBeBetween(column="t_start", min_value=0),
                E.ExpectColumnValuesToBeBetween(column="length", min_value=0, strict_min=True)]
    return build


def snippets_suite() -> Suite:
    def build() -> list[Any]:
        import great_expectations as gx
        E = gx.expectations
        return [E.ExpectTableRowCountToBeBetween(min_value=1),
                E.ExpectColumnValuesToBeInSet(column="snippet_in_order", value_set=[True]),
                E.ExpectColumnValuesToBeBetween(column="t_start", min_value=0),
                E.ExpectColumnValuesToBeBetween(column="length", min_value=0, strict_min=True),
                *[E.ExpectColumnValuesToBeInSet(column=f"{k}_finite", value_set=[True]) for k in FEATURE_KEYS]]
    return build


def validate_videos(videos: pd.DataFrame, num_classes: int, source: str) -> None:
    flat = videos.drop(columns=["labels"]).assign(
        max_label=[max(ls) if len(ls) else -1 for ls in videos["labels"]])
    bad = [(v, ls) for v, ls in zip(videos["video_id"], videos["labels"]) if min(ls, default=0) < 0]
    if bad:
        raise StageError(source, f"negative class ids in labels of video {bad[0][0]}: {list(bad[0][1])}")
    validate_frame(flat, videos_suite(num_classes), source=source, name="videos")


def validate_segments(segments: pd.DataFrame, videos: pd.DataFrame, num_classes: int, source: str) -> None:
    validate_frame(segments.assign(length=segments["t_end"] - segments["t_start"]), segments_suite(num_classes),
                   source=source, name="segments")
    unknown = sorted(set(segments["video_id"]) - set(videos["video_id"]))
    if unknown:
        raise StageError(source, f"segments of unknown videos {unknown[:5]}")
    duration = dict(zip(videos["video_id"], videos["duration"]))
    late = segments[segments["t_end"] > segments["video_id"].map(duration) + 1e-3]
    if len(late):
        row = late.iloc[0]
        raise StageError(source, f"segment {row.t_start:g}-{row.t_end:g} s ends after video {row.video_id} "
                                 f"({duration[row.video_id]:g} s)")


def snippets_frame(table: pa.Table, name: str) -> pd.DataFrame:
    """The checked quantities of one video's snippet table, rows labelled `<name> snippet <i>`."""
    snippet = table["snippet"].to_numpy()
    flat = pd.DataFrame({"snippet_in_order": np.diff(snippet, prepend=-1) > 0,
                         "t_start": table["t_start"].to_numpy(),
                         "length": (table["t_end"].to_numpy() - table["t_start"].to_numpy())})
    for k in FEATURE_KEYS:
        values = feature_matrix(table, k)
        flat[f"{k}_finite"] = np.isfinite(values).all(axis=1) if values.size else np.ones(len(flat), bool)
    flat.index = [f"{name} snippet {i}" for i in snippet]
    return flat


def validate_snippets(table: pa.Table, source: str) -> None:
    validate_frame(snippets_frame(table, "video"), snippets_suite(), source=source, name="snippets")


def validate_snippet_tables(tables: dict[str, pa.Table], source: str) -> None:
    """Every video's snippets in one GX run (a run costs ~50 ms, whatever its size); the failed rows
    are labelled with their file."""
    if tables:
        flat = pd.concat([snippets_frame(t, f"{vid}.parquet") for vid, t in tables.items()])
        validate_frame(flat, snippets_suite(), source=source, name="snippets")


# ---------------------------------------------------------------------------------------------------
# writing and reading

def write_table(table: pa.Table, path: str | Path, schema: pa.Schema | None = None) -> None:
    """Writes `table` (cast to `schema`) to `path` atomically."""
    if schema is not None:
        table = table.select(schema.names).cast(schema.with_metadata(table.schema.metadata))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def feature_matrix(table: pa.Table, key: str) -> np.ndarray:
    """A fixed-size-list column as a (rows, width) float32 array, without a copy per row."""
    column = table[key].combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width).astype(np.float32, copy=False)


def read_parquet(path: Path, schema: pa.Schema | None = None) -> pa.Table:
    if not path.is_file():
        raise StageError(path, "not found (run `dvc repro video_features`)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise StageError(path, f"not a readable Parquet file: {e}") from e
    if schema is not None and not table.schema.equals(schema, check_metadata=False):
        raise StageError(path, f"wrong schema: expected {schema.names} "
                               f"({', '.join(str(t) for t in schema.types)}), got {table.schema.names}")
    return table


def extract_hash(path: Path) -> str | None:
    """The extraction settings a snippet file was written with, or None if unreadable."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None
    value = meta.get(EXTRACT_HASH_KEY)
    return value.decode() if value else None


@dataclass
class Videos:
    """Padded snippet features of one subset's videos, in `videos.parquet` order."""
    video_ids: list[str]
    features: dict[str, "np.ndarray"]        # key -> (N, T, D) float32, zero past each video's end
    mask: "np.ndarray"                       # (N, T) bool: a real snippet
    times: "np.ndarray"                      # (N, T, 2) float32 snippet start, end (s)
    labels: "np.ndarray"                     # (N, C) float32 multi-hot video-level labels
    durations: "np.ndarray"                  # (N,) float32 s
    segments: pd.DataFrame = field(default_factory=pd.DataFrame)  # video_id, class_id, t_start, t_end

    def __len__(self) -> int:
        return len(self.video_ids)


@dataclass
class LocalizationData:
    splits: dict[str, Videos]
    class_names: list[str]
    prompts: list[str]
    text_embeddings: "np.ndarray"            # (C, D_vlp) float32

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def dims(self) -> dict[str, int]:
        return {k: v.shape[-1] for k, v in self.splits["train"].features.items()}


def read_classes(features_dir: Path) -> pa.Table:
    path = features_dir / "classes.parquet"
    table = read_parquet(path)
    expected = classes_schema(table.schema.field("text_embedding").type.list_size
                              if "text_embedding" in table.schema.names
                              and pa.types.is_fixed_size_list(table.schema.field("text_embedding").type) else 1)
    if not table.schema.equals(expected, check_metadata=False):
        raise StageError(path, f"wrong schema: expected {expected.names} with a fixed-size text_embedding, "
                               f"got {table.schema}")
    ids = table["class_id"].to_pylist()
    if ids != list(range(len(ids))):
        raise StageError(path, f"class_id must be 0..{len(ids) - 1} in order, got {ids[:10]}")
    if not np.isfinite(feature_matrix(table, "text_embedding")).all():
        raise StageError(path, "non-finite text embeddings")
    return table


def load_subset(features_dir: Path, videos: pd.DataFrame, segments: pd.DataFrame, subset: str,
                num_classes: int, validate: bool) -> Videos:
    rows = videos[videos["subset"] == subset]
    tables = []
    for vid, n in zip(rows["video_id"], rows["n_snippets"]):
        path = snippet_path(features_dir, vid)
        table = read_parquet(path)
        if table.num_rows != n:
            raise StageError(path, f"{table.num_rows} snippets, videos.parquet says {n}")
        tables.append(table)
    if validate:
        validate_snippet_tables(dict(zip(rows["video_id"], tables)), str(features_dir / "snippets"))
    n, t_max = len(tables), max((t.num_rows for t in tables), default=1)
    dims = {k: (tables[0].schema.field(k).type.list_size if tables else 1) for k in FEATURE_KEYS}
    features = {k: np.zeros((n, t_max, d), np.float32) for k, d in dims.items()}
    mask, times = np.zeros((n, t_max), bool), np.zeros((n, t_max, 2), np.float32)
    labels = np.zeros((n, num_classes), np.float32)
    for i, (table, ls) in enumerate(zip(tables, rows["labels"])):
        t = table.num_rows
        for k in FEATURE_KEYS:
            if table.schema.field(k).type.list_size != dims[k]:
                raise StageError(snippet_path(features_dir, rows["video_id"].iloc[i]),
                                 f"{k} has width {table.schema.field(k).type.list_size}, other videos {dims[k]}")
            features[k][i, :t] = feature_matrix(table, k)
        mask[i, :t] = True
        times[i, :t, 0], times[i, :t, 1] = table["t_start"].to_numpy(), table["t_end"].to_numpy()
        labels[i, list(ls)] = 1.0
    ids = rows["video_id"].tolist()
    return Videos(ids, features, mask, times, labels, rows["duration"].to_numpy(np.float32),
                  segments[segments["video_id"].isin(ids)].reset_index(drop=True))


def load_localization(features_dir: str | Path, validate: bool = True) -> LocalizationData:
    """Reads (and validates) a features directory into padded per-split arrays."""
    features_dir = Path(features_dir)
    classes = read_classes(features_dir)
    num_classes = classes.num_rows
    videos_path, segments_path = features_dir / "videos.parquet", features_dir / "segments.parquet"
    videos = read_parquet(videos_path, VIDEOS_SCHEMA).to_pandas()
    segments = read_parquet(segments_path, SEGMENTS_SCHEMA).to_pandas()
    if validate:
        validate_videos(videos, num_classes, str(videos_path))
        validate_segments(segments, videos, num_classes, str(segments_path))
    splits = {}
    for subset in SPLITS:
        if not (videos["subset"] == subset).any():
            raise StageError(videos_path, f"no {subset} videos")
        splits[subset] = load_subset(features_dir, videos, segments, subset, num_classes, validate)
    return LocalizationData(splits, classes["name"].to_pylist(), classes["prompt"].to_pylist(),
                            feature_matrix(classes, "text_embedding"))
