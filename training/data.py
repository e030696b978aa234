"""The training data format and the two datasets.

A dataset is a folder with ``manifest.jsonl`` (one JSON object per clip) and ``.npy`` arrays in shard
folders, read with memory mapping so only the sampled window is paged in:

    {"id": "spk1/clip007", "identity": "spk1", "frames": 250,
     "files": {"frames": "shard-00000/000007.frames.npy", ...}}

Per-clip arrays (T = video frames at 25 fps; any field may be missing when no stage needs it):
    frames    (T, 256, 256, 3) uint8   face crops (stage 1)
    audio     (N,) float32             16 kHz mono
    hubert    (25, T50, 1024) f16/f32  all HuBERT hidden states at 50 Hz (T50 >= 2T, edge-padded)
    mfcc      (T100, 39) float32       MFCC + deltas at 100 Hz (T100 >= 4T)
    pose      (T, 3) float32           yaw, pitch, roll in degrees
    location  (T,) float32             nose-tip x / crop width, 0..1
    scale     (T,) float32             inner-brow-midpoint-to-chin distance / crop width, 0..1
    alpha     (T, 20) float32          stage-1 motion codes (written by extract_latents)
    wa        (T, 512) or (512,)       stage-1 appearance latents, per frame or one per clip
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from models.errors import AnitalkerError

MANIFEST = "manifest.jsonl"


class DataError(AnitalkerError):
    pass


def manifest_path(data) -> Path:
    p = Path(data)
    return p / MANIFEST if p.is_dir() else p


def read_manifest(data) -> list[dict]:
    path = manifest_path(data)
    if not path.is_file():
        raise DataError(f"no dataset manifest at {path} (make one with `anitalker preprocess`)")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def write_manifest(data, entries: list[dict]) -> None:
    """Atomic rewrite, so an interrupted run never leaves half a manifest."""
    path = manifest_path(data)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for e in entries:
            f.write(json.dumps(e) + "\n")
    os.replace(tmp, path)


def open_array(root: Path, entry: dict, field: str) -> np.ndarray:
    rel = entry["files"].get(field)
    if rel is None:
        raise DataError(f"clip {entry['id']} has no {field!r} array")
    return np.load(root / rel, mmap_mode="r")


class EpochSampler(Sampler):
    """Item order of one process: a seeded permutation per epoch, dealt round-robin to the ranks
    (every rank gets the same count; tiny datasets are repeated), starting after ``skip`` items.
    The skip is what lets a resumed run continue mid-epoch exactly where it stopped."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.per_rank = max(n, world) // world
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        perm = (perm * self.world)[: self.per_rank * self.world]
        return iter(perm[self.rank::self.world][self.skip:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip)


def epoch_loader(ds: Dataset, cfg, rt) -> tuple[EpochSampler, DataLoader]:
    """This rank's sampler and loader for ``ds`` (cfg: batch_size, workers, seed; rt: rank, world, device).
    A rank with fewer items than a batch keeps its last partial batch rather than train on nothing."""
    sampler = EpochSampler(len(ds), cfg.seed, rt.rank, rt.world)
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        drop_last=sampler.per_rank >= cfg.batch_size, pin_memory=rt.device.type == "cuda")
    return sampler, loader


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    # Every (epoch, item) draws the same window in any worker and on any rank: reproducible runs.
    return np.random.default_rng([seed, epoch, index])


def _cut(a: np.ndarray, start: int, stop: int, axis: int) -> np.ndarray:
    """a[start:stop] along axis, edge-padded when the array is shorter (audio features end early)."""
    sl = [slice(None)] * a.ndim
    sl[axis] = slice(start, min(stop, a.shape[axis]))
    out = np.asarray(a[tuple(sl)], dtype=np.float32)
    short = stop - start - out.shape[axis]
    if short > 0:
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, short)
        out = np.pad(out, pad, mode="edge")
    return out


class MotionWindows(Dataset):
    """Stage 2: random windows of ``window`` frames; the frame before the window is the hint.

    Each clip contributes one item per ``window`` frames it holds, so long clips are drawn more
    often. Item: audio (25, 2W, H) or (4W, 39), alpha (W, M) target, alpha0 (M,) and wa (S,) of the
    hint frame, and the controls the model supervises: location (W, 1), scale (W, 1), pose (W, 3)
    as degrees / 90 clamped to [-1, 1] (the official normalisation).
    """

    def __init__(self, data, window: int, audio: str = "hubert", controls=(), seed: int = 0):
        self.root, self.window, self.audio, self.controls, self.seed = manifest_path(data).parent, window, audio, \
            tuple(controls), seed
        need = ("alpha", "wa", audio, *self.controls)
        clips = read_manifest(data)
        for e in clips:
            missing = [f for f in need if f not in e["files"]]
            if missing:
                raise DataError(f"clip {e['id']} lacks {missing} (run extract_latents / preprocess for them)")
        self.clips = [e for e in clips if e["frames"] >= window + 1]
        if not self.clips:
            raise DataError(f"no clip has the {window + 1} frames a window of {window} needs "
                            f"(longest: {max((e['frames'] for e in clips), default=0)})")
        self.items = [i for i, e in enumerate(self.clips) for _ in range(max(1, (e["frames"] - 1) // window))]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        e = self.clips[self.items[index]]
        W = self.window
        s = int(_rng(self.seed, self.epoch, index).integers(1, e["frames"] - W + 1))  # window [s, s+W)
        arr = lambda f: open_array(self.root, e, f)  # noqa: E731
        alpha = arr("alpha")
        wa = arr("wa")
        out = {"alpha": _cut(alpha, s, s + W, 0), "alpha0": np.asarray(alpha[s - 1], dtype=np.float32),
               "wa": np.asarray(wa[s - 1] if wa.ndim == 2 else wa, dtype=np.float32)}
        out["audio"] = _cut(arr("hubert"), 2 * s, 2 * (s + W), 1) if self.audio == "hubert" \
            else _cut(arr("mfcc"), 4 * s, 4 * (s + W), 0)
        for c in self.controls:
            v = _cut(arr(c), s, s + W, 0)
            out[c] = np.clip(v / 90.0, -1.0, 1.0) if c == "pose" else v.reshape(W, 1)
        return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in out.items()}


def to_image(frame: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float in [-1, 1] (the stage-1 input range)."""
    x = torch.from_numpy(np.array(frame)).permute(2, 0, 1).float().div(127.5).sub(1.0)
    if x.shape[-1] != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return x


class FramePairs(Dataset):
    """Stage 1: a source and a target frame of one clip (adjacent with probability ``p_adjacent``,
    otherwise anywhere in the clip), and a frame of a clip of another identity. One item per
    second of video. Item: source, target, other (3, size, size), identity, other_identity (int)."""

    def __init__(self, data, size: int = 256, p_adjacent: float = 0.2, seed: int = 0):
        self.root, self.size, self.p_adjacent, self.seed = manifest_path(data).parent, size, p_adjacent, seed
        self.clips = [e for e in read_manifest(data) if "frames" in e["files"] and e["frames"] >= 2]
        if not self.clips:
            raise DataError("no clip with at least 2 face frames")
        names = sorted({e.get("identity", e["id"]) for e in self.clips})
        self.identities = {n: i for i, n in enumerate(names)}
        self.label = [self.identities[e.get("identity", e["id"])] for e in self.clips]
        self.items = [i for i, e in enumerate(self.clips) for _ in range(max(1, e["frames"] // 25))]
        self.epoch = 0

    @property
    def num_identities(self) -> int:
        return len(self.identities)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        rng = _rng(self.seed, self.epoch, index)
        ci = self.items[index]
        e = self.clips[ci]
        frames = open_array(self.root, e, "frames")
        T = len(frames)
        a = int(rng.integers(0, T))
        if rng.random() < self.p_adjacent:
            b = a + 1 if a + 1 < T else a - 1
        else:
            b = int(rng.integers(0, T))
        oj = ci
        if self.num_identities > 1:   # rejection sampling: O(1) per item however many clips there are
            while self.label[oj] == self.label[ci]:
                oj = int(rng.integers(0, len(self.clips)))
        of = open_array(self.root, self.clips[oj], "frames")
        return {"source": to_image(frames[a], self.size), "target": to_image(frames[b], self.size),
                "other": to_image(of[int(rng.integers(0, len(of)))], self.size),
                "identity": torch.tensor(self.label[ci]), "other_identity": torch.tensor(self.label[oj])}
