"""Data preparation: talking-face videos -> the training data format (see training/data.py).

Input: ``src`` is a folder with one sub-folder per identity holding the clips, or a CSV with the
columns ``clip,identity`` (paths relative to the CSV). Per clip:
  * frames at 25 fps (nearest frame when the video has another rate);
  * one fixed square face box: the median centre and size of face detections every
    ``detect_every`` frames, side = ``crop_scale`` x the box (1.6 x a FaceBoxes box, as the
    official preprocessing; the Haar boxes of the default detector are ~1.2x tighter, hence 1.92);
  * filters (paper appendix A): face box smaller than ``min_face`` px, blurry crops (variance of the
    Laplacian of the 256 px crop below ``min_sharpness``), |yaw| beyond ``max_yaw`` degrees when a pose
    estimator gives yaw; rejected clips are listed with the reason in ``rejected.jsonl``;
  * frames cropped and resized to 256x256, 16 kHz mono audio, MFCC (100 Hz) and, with a HuBERT folder,
    all HuBERT hidden states (25, 2T, 1024) stored as float16;
  * per-frame controls from the estimator: pose (yaw, pitch, roll in degrees), location and scale.

Estimators are pluggable (``estimator=package.module:factory``; the factory returns an object with
``estimate(frames (T, 256, 256, 3) uint8) -> {"pose"?: (T, 3) degrees, "location"?: (T,), "scale"?: (T,)}``).
The default, ``training.pose:HaarPoseEstimator``, needs nothing beyond OpenCV's bundled cascades and
works offline: roll within ~1 degree, yaw within ~3-4 degrees MAE on an ellipsoid head proxy up to
+-30 (profiles read as +-70), pitch coarse (3.5-12 degrees MAE on the proxies, from the jaw outline
against a frontal reference taken from one face, so expect a per-person offset), location/scale from the
Haar box (a few % of the crop width); training/pose.py has the method and the measurements. Plug in a
landmark / 3DMM estimator (e.g. 3DDFA_V2, as the official data used) for accurate pitch and yaw.

A run that stops is resumed by running it again: finished and rejected clips are skipped.

    python -m training.preprocess --config configs/train_preprocess.yaml src=VIDEOS out=DATA \
        hubert=ckpts/chinese-hubert-large
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
from tqdm import tqdm

from avatar.media import load_audio
from avatar.portrait import crop_box
from models.errors import AnitalkerError
from models.frontend import mfcc_features

from .config import load_config
from .data import MANIFEST, DataError

VIDEO_EXT = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}
FPS, RATE = 25, 16000


@dataclass(frozen=True)
class PreprocessConfig:
    src: str = "videos"
    out: str = "data"
    hubert: str = ""                  # chinese-hubert-large folder; empty: no HuBERT features
    device: str = "cpu"
    size: int = 256
    crop_scale: float = 1.92          # x the detector box (1.6 x FaceBoxes = ~1.92 x Haar)
    detect_every: int = 25
    min_face: int = 64                # px of the detector box in the source video
    min_sharpness: float = 20.0       # variance of the Laplacian of the grey 256 px crop (mean over samples)
    max_yaw: float = 60.0
    min_frames: int = 26              # shorter clips cannot give one 1-s window plus its hint frame
    clips_per_shard: int = 1000
    estimator: str = "training.pose:HaarPoseEstimator"
    detector: str = "avatar.portrait:detect_face"
    progress: bool = True


class Rejected(Exception):
    pass


def _load(spec: str):
    mod, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise DataError(f"cannot load {spec!r} (module:name): {e}") from None


def list_clips(src: Path) -> list[tuple[str, str, Path]]:
    """(clip id, identity, path), sorted, from a folder of identity folders or a clip,identity CSV."""
    if src.is_file():
        with src.open() as f:
            rows = list(csv.DictReader(f))
        if rows and not {"clip", "identity"} <= rows[0].keys():
            raise DataError(f"{src} needs the columns clip,identity")
        out = [(Path(r["clip"]).with_suffix("").as_posix(), r["identity"], src.parent / r["clip"]) for r in rows]
    elif src.is_dir():
        out = [(p.relative_to(src).with_suffix("").as_posix(), p.parent.name, p)
               for p in src.rglob("*") if p.suffix.lower() in VIDEO_EXT and p.parent != src]
    else:
        raise DataError(f"no videos at {src}: give a folder of identity folders or a clip,identity CSV")
    return sorted(out)


def read_frames_25fps(path: Path) -> np.ndarray:
    """All frames as (T, H, W, 3) uint8 RGB, resampled to 25 fps by nearest timestamp."""
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        frames, times = [], []
        for fr in c.decode(vs):
            frames.append(fr.to_ndarray(format="rgb24"))
            times.append(float(fr.time) if fr.time is not None else len(times) / float(vs.average_rate))
    if not frames:
        raise Rejected("no video frames")
    times = np.asarray(times) - times[0]
    n = int(np.floor(times[-1] * FPS + 1e-6)) + 1
    idx = np.searchsorted(times, np.arange(n) / FPS - 0.5 / float(vs.average_rate or FPS))
    return np.stack([frames[min(i, len(frames) - 1)] for i in idx])


def sharpness(crops: np.ndarray) -> float:
    sample = crops[:: max(1, len(crops) // 8)]
    return float(np.mean([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() for f in sample]))


def process_clip(path: Path, cfg: PreprocessConfig, detector, estimator, hubert) -> dict[str, np.ndarray]:
    video = read_frames_25fps(path)
    T = len(video)
    if T < cfg.min_frames:
        raise Rejected(f"{T} frames < {cfg.min_frames}")
    boxes = [b for b in (detector(video[i]) for i in range(0, T, cfg.detect_every)) if b is not None]
    if not boxes:
        raise Rejected("no face found")
    x, y, w, h = np.median(np.asarray(boxes, dtype=np.float64), axis=0)
    if max(w, h) < cfg.min_face:
        raise Rejected(f"face {max(w, h):.0f} px < {cfg.min_face}")
    x0, y0, x1, y1 = crop_box((x, y, w, h), video.shape[1:], cfg.crop_scale)
    crops = np.stack([cv2.resize(np.ascontiguousarray(f[y0:y1, x0:x1]), (cfg.size, cfg.size),
                                 interpolation=cv2.INTER_AREA) for f in video])
    sharp = sharpness(crops)
    if sharp < cfg.min_sharpness:
        raise Rejected(f"blurry (Laplacian variance {sharp:.1f} < {cfg.min_sharpness})")
    controls = {k: np.asarray(v, np.float32) for k, v in estimator.estimate(crops).items()}
    if "pose" in controls and np.abs(controls["pose"][:, 0]).max() > cfg.max_yaw:
        raise Rejected(f"yaw beyond {cfg.max_yaw} degrees")
    audio = load_audio(path)
    audio = np.pad(audio, (0, max(0, T * RATE // FPS - len(audio))))[: T * RATE // FPS]
    out = {"frames": crops, "audio": audio, "mfcc": mfcc_features(audio).astype(np.float32), **controls}
    if hubert is not None:
        st = hubert.states(audio).float().cpu().numpy()                     # (L, 2T(+-1), H)
        st = np.pad(st, ((0, 0), (0, max(0, 2 * T - st.shape[1])), (0, 0)), mode="edge")[:, : 2 * T]
        out["hubert"] = st.astype(np.float16)
    return out


def _read_done(path: Path) -> list[dict]:
    """Lines of a jsonl written by appending; a line cut by a crash is dropped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def preprocess(cfg: PreprocessConfig) -> dict:
    """Returns counts {"done", "rejected", "skipped"} for this run."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clips = list_clips(Path(cfg.src))
    manifest, rejected = _read_done(out / MANIFEST), _read_done(out / "rejected.jsonl")
    # rewrite without a cut-off last line before appending again
    (out / MANIFEST).write_text("".join(json.dumps(e) + "\n" for e in manifest))
    seen = {e["id"] for e in manifest} | {e["id"] for e in rejected}
    detector, estimator = _load(cfg.detector), _load(cfg.estimator)()
    hubert = None
    if cfg.hubert:
        from models.frontend import load_hubert
        hubert = load_hubert(cfg.hubert, cfg.device)
    counts = {"done": 0, "rejected": 0, "skipped": 0}
    for k, (cid, ident, path) in enumerate(tqdm(clips, desc="preprocess", disable=not cfg.progress)):
        if cid in seen:
            counts["skipped"] += 1
            continue
        try:
            arrays = process_clip(path, cfg, detector, estimator, hubert)
        except (Rejected, av.FFmpegError, AnitalkerError) as e:   # a broken file must not stop the run
            with (out / "rejected.jsonl").open("a") as f:
                f.write(json.dumps({"id": cid, "path": str(path), "reason": str(e)}) + "\n")
            counts["rejected"] += 1
            continue
        shard = f"shard-{k // cfg.clips_per_shard:05d}"
        (out / shard).mkdir(exist_ok=True)
        files = {}
        for name, a in arrays.items():
            rel = f"{shard}/{k:07d}.{name}.npy"
            tmp = out / f"{rel}.tmp.npy"
            np.save(tmp, a)
            tmp.replace(out / rel)
            files[name] = rel
        entry = {"id": cid, "identity": ident, "frames": len(arrays["frames"]), "source": str(path), "files": files}
        with (out / MANIFEST).open("a") as f:   # the clip counts as done only once this line exists
            f.write(json.dumps(entry) + "\n")
        counts["done"] += 1
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/train_preprocess.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. src=VIDEOS out=DATA hubert=DIR")
    a = p.parse_args(argv)
    counts = preprocess(load_config(PreprocessConfig, a.config, a.overrides))
    print(f"{counts['done']} clip(s) prepared, {counts['rejected']} rejected (see rejected.jsonl), "
          f"{counts['skipped']} already done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
