"""Face reenactment: a driving face (webcam, video file) moves the portrait; no audio model runs.

    driver.take(pts) -> newest driving frame -> FaceTracker (crop like the training data)
                     -> stage-1 motion encoder -> alpha (absolute, or relative to a calibration frame)
                     -> One-Euro smoothing -> lost-face hold / ease / resume -> renderer -> AvFrame

The Reenactor is an Animator paced by audio: the realtime shell feeds it audio (the webcam's microphone,
or silence) and every complete 640-sample frame shows the newest driving frame available at that moment,
so audio and video stay in sync by construction and the microphone is delayed exactly as much as the
video. Its time base is the output frame time pts/25 (the shell's clock keeps that in step with the wall
clock while the engine keeps up), which also makes every run over the same frames deterministic.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from models.errors import AnitalkerError

from .pipeline import Models, PortraitCode
from .portrait import CROP_SCALE, crop_box, detect_face, to_tensor, to_uint8
from .timebase import FPS, SAMPLES_PER_FRAME, AudioChunk, AvFrame

# One-Euro settings. Motion codes live in about [-1, 1]; a fast lip or head move changes them by several
# units a second, and beta lets such moves through the filter while a still face loses its jitter.
MOTION_BETA = 1.0
# smoothing strength s in (0, 1] -> min_cutoff = MIN_CUTOFF_HZ / s^2 (s=1: 0.25 Hz, 0.5: 1 Hz, 0.2: 6 Hz)
MIN_CUTOFF_HZ = 0.25
# The tracker's box in units of the image's short side: detections jitter by a few pixels, a moving
# head travels a fraction of the frame per second.
BOX_MIN_CUTOFF, BOX_BETA = 1.0, 5.0
# A live driver (camera) that gives no frame for this long has stopped (unplugged, the page's camera
# switched off): that counts as a lost face, so the portrait eases to neutral instead of freezing.
STALL_S = 0.5
# A live camera frame is sampled as late as the frame's due time allows: due - (the slowest recent
# take-to-image time) - this margin, so it is as fresh as possible when shown.
LATE_MARGIN_S = 0.005


class OneEuro:
    """One-Euro filter (Casiez, Roussel, Vogel, CHI 2012), vectorised over numpy arrays.

    Cutoff = min_cutoff + beta * |filtered speed|: slow changes (jitter) are smoothed hard, fast ones pass
    with little lag. min_cutoff may be an array (one per dimension); an infinite cutoff passes that
    dimension through unchanged.
    """

    def __init__(self, min_cutoff=1.0, beta: float = 0.0, d_cutoff: float = 1.0):
        self.min_cutoff = np.asarray(min_cutoff, np.float64)
        self.beta, self.d_cutoff = float(beta), float(d_cutoff)
        self.reset()

    def reset(self) -> None:
        self._x = self._dx = self._t = None

    @staticmethod
    def _alpha(dt: float, cutoff):
        with np.errstate(divide="ignore"):
            tau = 1.0 / (2 * np.pi * cutoff)            # inf cutoff -> tau 0 -> alpha 1
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        x = np.asarray(x, np.float64)
        finite = np.isfinite(x)
        if self._x is None:
            if not finite.all() or not math.isfinite(t):   # a NaN state would never recover: do not keep it
                return x.copy()
            self._x, self._dx, self._t = x, np.zeros_like(x), t
            return x.copy()
        dt = t - self._t
        if not dt > 0:                                   # no time passed (or a NaN time): nothing to filter by
            return self._x.copy()
        x = np.where(finite, x, self._x)                 # a non-finite value holds that dimension
        dx = (x - self._x) / dt
        self._dx = self._dx + self._alpha(dt, self.d_cutoff) * (dx - self._dx)
        a = self._alpha(dt, self.min_cutoff + self.beta * np.abs(self._dx))
        # prev + a (x - prev) keeps a constant input exactly constant; a = 1 returns x itself
        self._x = np.where(a >= 1.0, x, self._x + a * (x - self._x))
        self._t = t
        return self._x.copy()


@dataclass(frozen=True)
class ReenactConfig:
    mode: str = "absolute"          # "absolute" (paper: the driving frame's motion code) | "relative"
    crop: bool = True               # track + crop driving frames like the training data; False: whole frame
    detect_every: int = 5           # run the face detector every N driving frames (every frame while lost)
    smoothing: float | tuple = 0.0  # per-dimension smoothing strength in [0, 1] (scalar or 20 values)
    hold_s: float = 0.3             # face lost: hold the last motion this long,
    ease_s: float = 1.0             # then ease to the neutral pose (the portrait's own alpha0) over this long
    resume_s: float = 0.2           # face back: blend from the current output to the tracked motion

    def __post_init__(self):
        if self.mode not in ("absolute", "relative"):
            raise AnitalkerError(f"unknown reenactment mode {self.mode!r}; use absolute or relative")
        if int(self.detect_every) != self.detect_every or self.detect_every < 1:
            raise AnitalkerError(f"detect_every must be a whole number >= 1, not {self.detect_every}")
        s = self.smoothing
        values = np.asarray(s, np.float64).reshape(-1)
        if values.size not in (1, 20) or not np.all((values >= 0) & (values <= 1)):
            raise AnitalkerError(f"smoothing must be one value or 20 values in [0, 1], not {s!r}")
        if not np.isscalar(s):
            object.__setattr__(self, "smoothing", tuple(float(v) for v in values))
        for name in ("hold_s", "ease_s", "resume_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise AnitalkerError(f"{name} must be a number of seconds >= 0, not {v!r}")

    def min_cutoff(self, dims: int) -> np.ndarray | None:
        """One-Euro min_cutoff per motion dimension (inf = raw), or None when nothing is smoothed."""
        s = np.broadcast_to(np.asarray(self.smoothing, np.float64).reshape(-1), (dims,))
        if not s.any():
            return None
        with np.errstate(divide="ignore"):
            return np.where(s > 0, MIN_CUTOFF_HZ / s ** 2, np.inf)


def as_rgb(img: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3): grey is repeated, alpha dropped."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or img.shape[0] < 1 or img.shape[1] < 1:
        raise AnitalkerError(f"a driving frame must be an (H, W, 3) RGB image, not shape {img.shape}")
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[:, :, :3] if img.shape[2] == 4 else img


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[:2] == (size, size):
        return np.ascontiguousarray(img)
    shrink = img.shape[0] > size or img.shape[1] > size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


class FaceTracker:
    """Crops driving frames around the face as the training data (and prepare_portrait) crop them.

    The detector (Haar, 10-30 ms at 640x480 on 2 cores) runs every ``detect_every`` frames and on every
    frame while the face is lost; between detections the last box is reused. Box centre and side are
    One-Euro filtered so the crop does not jitter. Lost = the last detection found no face.
    """

    def __init__(self, detect_every: int = 5, scale: float = CROP_SCALE, size: int = 256):
        self.detect_every, self.scale, self.size = int(detect_every), scale, size
        self._filter = OneEuro(BOX_MIN_CUTOFF, BOX_BETA)
        self.detections = 0
        self.reset()

    def reset(self) -> None:
        self.box = None
        self._shape = None         # (H, W) of the frame the box belongs to
        self._since = 0            # frames since the last detection
        self._filter.reset()

    def __call__(self, rgb: np.ndarray, t: float) -> np.ndarray | None:
        """(size, size, 3) uint8 crop of the face, or None while the face is lost."""
        rgb = as_rgb(rgb)
        if rgb.shape[:2] != self._shape:   # a new frame size (a browser adapting its camera): the box and
            self.reset()                   # its filter are in the old frame's pixels, so detect afresh
            self._shape = rgb.shape[:2]
        if self.box is None or self._since >= self.detect_every:
            self._detect(rgb, t)
        self._since += 1
        if self.box is None:
            return None
        x0, y0, x1, y1 = self.box
        return _resize(rgb[y0:y1, x0:x1], self.size)

    def _detect(self, rgb: np.ndarray, t: float) -> None:
        self.detections += 1
        self._since = 0
        face = detect_face(rgb)
        if face is None:
            self.box = None
            self._filter.reset()   # a face that comes back elsewhere is taken where it is, not slid to
            return
        h, w = rgb.shape[:2]
        x0, y0, x1, y1 = crop_box(face, rgb.shape, self.scale)
        unit = min(h, w)
        cx, cy, side = self._filter(np.array([x0 + x1, y0 + y1, 2 * (x1 - x0)]) / (2 * unit), t) * unit
        side = max(1, min(round(side), h, w))
        x0 = min(max(round(cx - side / 2), 0), w - side)
        y0 = min(max(round(cy - side / 2), 0), h - side)
        self.box = (x0, y0, x0 + side, y0 + side)


class LatestFrame:
    """Newest-wins slot between a capture thread (webcam, WebRTC track) and the engine: the engine never
    waits for a frame and never shows an old one; frames it had no time for are dropped and counted."""

    live = True                    # its times are capture times on the wall clock (see Reenactor meta)

    def __init__(self):
        self._lock = threading.Lock()
        self._slot = None
        self.captured = 0          # frames put
        self.stale = 0             # frames overwritten before being taken

    def put(self, image: np.ndarray, t: float | None = None) -> None:
        """t: capture time on time.monotonic()'s clock (default: now)."""
        item = (image, time.monotonic() if t is None else float(t))
        with self._lock:
            self.stale += self._slot is not None
            self._slot = item
            self.captured += 1

    def take(self, pts: int) -> tuple[np.ndarray, float] | None:
        """The newest (image, t) not taken before, or None."""
        with self._lock:
            item, self._slot = self._slot, None
        return item


class TimedFrames:
    """Driving frames by time, for video files: output frame pts shows the newest frame with time <=
    pts/25. The frames (an iterable of (t_seconds, rgb uint8)) are consumed lazily."""

    live = False                   # its times are positions in the clip, not capture times

    def __init__(self, frames):
        self._frames = iter(frames)
        self._next = next(self._frames, None)
        self.captured = 0          # frames read
        self.stale = 0             # frames skipped because a newer one was due at the same output frame

    def take(self, pts: int) -> tuple[np.ndarray, float] | None:
        due = pts / FPS + 1e-6     # frame times and pts/25 may round differently
        newest = None
        while self._next is not None and self._next[0] <= due:
            self.stale += newest is not None
            newest = self._next
            self.captured += 1
            self._next = next(self._frames, None)
        return None if newest is None else (newest[1], float(newest[0]))


def _cosine(x: float) -> float:
    """0 -> 0, 1 -> 1, flat at both ends (no kink when a blend starts or ends)."""
    return 0.5 - 0.5 * math.cos(math.pi * min(max(x, 0.0), 1.0))


def _lerp(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    return b if w >= 1 else a if w <= 0 else a + (b - a) * np.float32(w)


def _ratio(elapsed: float, span: float) -> float:
    return 1.0 if span <= 0 else elapsed / span


class Reenactor:
    """An Animator (push / flush / reset) whose motion comes from a driving face instead of audio.

    driver: anything with ``take(pts) -> (rgb uint8, capture time) | None`` (LatestFrame, TimedFrames), or
    None (the portrait holds still); its ``stale`` count shows up in ``stats``. AvFrame.meta: "source_t":
    the time of the newest driving frame taken (None before the first), "face": whether the output follows
    a tracked face, and "captured_at": the capture time, only on a frame that shows a newly taken frame
    of a live driver (``driver.live``: capture times on the wall clock), so the session measures
    capture -> shown latency once per camera frame. Motion codes are not clamped: absolute codes are what the
    encoder gives (the official code does not clamp them either), and relative codes are
    alpha0 + (alpha_drive - alpha_calibration), which equals alpha0 exactly when the driving face looks as
    it did at calibration.
    """

    latency_frames = 0

    def __init__(self, models: Models, portrait: PortraitCode, driver, config: ReenactConfig = ReenactConfig(),
                 now=time.monotonic, sleep=time.sleep):
        self.models, self.portrait, self.driver, self.config, self.now = models, portrait, driver, config, now
        self.sleep = sleep
        self.tracker = FaceTracker(config.detect_every) if config.crop else None
        self.alpha0 = portrait.alpha0.float().cpu().numpy()
        cutoff = config.min_cutoff(self.alpha0.shape[1])
        self._smooth = OneEuro(cutoff, MOTION_BETA) if cutoff is not None else None
        self.timings = {"track": 0.0, "motion": 0.0, "render": 0.0}
        self._counts = {"driven": 0, "face_lost_frames": 0, "calibrations": 0}
        self._lock = threading.Lock()
        self._calib_request = None           # (image or None,) set by calibrate() on another thread
        self._calib = None                   # raw motion code of the calibration frame (relative mode)
        self._calib_next = False             # the next tracked frame becomes the calibration
        self._following = False              # the output follows a tracked face
        self._seen = -math.inf               # time of the last driving frame with a face
        self._from, self._resume_t = self.alpha0, -math.inf
        self._target = self._held = self._out = self.alpha0
        self._captured_at = None
        self._taken_t = -math.inf            # output time of the last driving frame taken
        self._image = self._image_alpha = None
        self._audio = np.zeros(0, np.float32)
        self._pts = 0
        self._due = None                     # due time of the next frame completed (from AudioChunk.due)
        self._cost = None                    # recent take-to-image seconds per frame (slowest, decaying)

    # ---- the Animator protocol -------------------------------------------------------------------------
    def push(self, chunk: AudioChunk) -> list[AvFrame]:
        """One AvFrame per complete 640 samples, carrying exactly those samples."""
        self._audio = np.concatenate([self._audio, np.asarray(chunk.samples, np.float32).reshape(-1)])
        # the first frame this push completes is the one that holds the chunk's first sample
        self._due = getattr(chunk, "due", None)
        return self._frames(self.now())

    def flush(self) -> list[AvFrame]:
        """The last partial frame, padded with silence."""
        pad = (-len(self._audio)) % SAMPLES_PER_FRAME
        self._audio = np.concatenate([self._audio, np.zeros(pad, np.float32)])
        self._due = None
        return self._frames(self.now())

    def reset(self, last=None) -> None:
        """Interrupt: pending partial audio is dropped; the motion follows the camera, so it needs no
        ``last`` to continue from and the head does not jump."""
        self._audio = np.zeros(0, np.float32)

    def calibrate(self, image: np.ndarray | None = None) -> None:
        """Relative mode: the next tracked driving frame (or this full frame) becomes the neutral pose.
        Safe to call from any thread; the worker applies it at its next frame. Absolute mode ignores it."""
        with self._lock:
            self._calib_request = (image,)

    @property
    def stats(self) -> dict:
        """driven: driving frames with a face that moved the portrait; face_lost_frames: output frames shown
        while no face was followed (holding, easing, or before the first face); detections: face detector
        runs; stale: driving frames dropped unseen (from the driver); calibrations: calibrations taken."""
        return {**self._counts, "detections": self.tracker.detections if self.tracker else 0,
                "stale": getattr(self.driver, "stale", 0)}

    # ---- per frame -----------------------------------------------------------------------------------
    def _frames(self, pushed_at: float) -> list[AvFrame]:
        out = []
        while len(self._audio) >= SAMPLES_PER_FRAME:
            audio, self._audio = self._audio[:SAMPLES_PER_FRAME], self._audio[SAMPLES_PER_FRAME:]
            pts = self._pts
            self._pts += 1
            live = getattr(self.driver, "live", False)
            if live and self._due is not None:
                self._sample_late(self._due)
                self._due += 1.0 / FPS
            start = self.now()
            item = self.driver.take(pts) if self.driver is not None else None
            rgb = None
            meta = {}
            t = pts / FPS
            if item is not None:
                rgb, self._captured_at = item
                self._taken_t = t
                if live:                                     # capture -> shown latency (session metrics)
                    meta["captured_at"] = self._captured_at
            elif live and self._following and t - self._taken_t > STALL_S:
                self._stop_following()                       # the camera stopped: ease from now, no jump
                self._seen = max(self._seen, t - self.config.hold_s)
            self._update(rgb, t)
            if self._image is None or not np.array_equal(self._out, self._image_alpha):
                self._image = self._timed("render", self._render, self._out)
                self._image_alpha = self._out
            if item is not None:
                cost = self.now() - start
                self._cost = cost if self._cost is None else max(cost, 0.9 * self._cost + 0.1 * cost)
            self._counts["face_lost_frames"] += not self._following
            out.append(AvFrame(self._image, audio, pts, pushed_at=pushed_at, produced_at=self.now(),
                               meta={**meta, "source_t": self._captured_at, "face": self._following}))
        return out

    def _sample_late(self, due: float) -> None:
        """Wait until the camera frame must be taken for its image to be ready by `due`. Frames fed a slot
        ahead would otherwise show a camera frame a whole slot old; waits beyond a slot (another clock,
        or a frame due later in a batch) are not taken."""
        if self._cost is None:               # nothing measured yet: take the newest frame now
            return
        wait = due - self._cost - LATE_MARGIN_S - self.now()
        if 0 < wait <= 1.0 / FPS:
            self.sleep(wait)

    @torch.inference_mode()
    def _render(self, alpha: np.ndarray) -> np.ndarray:
        m = self.models
        with m.autocast():
            img = m._render(self.portrait.wa, torch.from_numpy(alpha).to(m.device), self.portrait.feats)
        return to_uint8(img.float())[0]

    def _timed(self, stage: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.timings[stage] += time.perf_counter() - t0
        return out

    @torch.inference_mode()
    def _encode(self, crop: np.ndarray) -> np.ndarray:
        m = self.models
        with m.autocast():
            alpha = m._motion(to_tensor(crop).to(m.device))
        return alpha.float().cpu().numpy()

    def _crop(self, rgb: np.ndarray, t: float) -> np.ndarray | None:
        return self.tracker(rgb, t) if self.tracker is not None else _resize(rgb, 256)

    def _calibration_code(self, image) -> np.ndarray | None:
        """Raw motion code of a whole calibration frame (cropped around its face when crop is on)."""
        image = as_rgb(image)
        if self.config.crop:
            face = detect_face(image)
            if face is None:
                return None
            x0, y0, x1, y1 = crop_box(face, image.shape, CROP_SCALE)
            image = image[y0:y1, x0:x1]
        return self._timed("motion", self._encode, _resize(image, 256))

    def motion(self, rgb: np.ndarray | None, t: float) -> torch.Tensor:
        """(1, M) motion for the driving frame rgb at time t (None: no new frame), on the models' device.

        Following a face: the (relative, smoothed) code of the newest frame, blended in over resume_s
        when the face comes back. A detection that finds no face: hold the last output until hold_s after
        the last face, then ease to alpha0 over ease_s. No new frame changes nothing (a frame stands until
        the next one, as in a video); in push, a live driver that gives nothing for STALL_S counts as a
        lost face.
        """
        self._update(rgb, t)
        return torch.tensor(self._out, device=self.models.device)

    def _update(self, rgb: np.ndarray | None, t: float) -> None:
        cfg = self.config
        if cfg.mode == "relative":
            with self._lock:
                request, self._calib_request = self._calib_request, None
            if request is not None:
                code = self._calibration_code(request[0]) if request[0] is not None else None
                if code is not None:
                    self._set_calibration(code, t)
                else:                        # no image, or no face in it: use the next tracked frame
                    self._calib_next = True
        if rgb is not None:
            rgb = as_rgb(rgb)
            crop = self._timed("track", self._crop, rgb, t)
            if crop is None:
                self._stop_following()
            else:
                code = self._timed("motion", self._encode, crop)
                if cfg.mode == "relative":
                    if self._calib_next or self._calib is None:
                        self._set_calibration(code, t)
                    code = self.alpha0 + (code - self._calib)
                if not self._following:       # face back (or first seen): blend from what is shown
                    self._following = True
                    self._start_resume(t)
                if self._smooth is not None:
                    code = self._smooth(code, t).astype(np.float32)
                self._target, self._seen = code, t
                self._counts["driven"] += 1
        if self._following:
            self._out = _lerp(self._from, self._target, _cosine(_ratio(t - self._resume_t, cfg.resume_s)))
        else:
            w = _cosine(_ratio(t - self._seen - cfg.hold_s, cfg.ease_s)) if t - self._seen > cfg.hold_s else 0.0
            self._out = _lerp(self._held, self.alpha0, w)

    def _set_calibration(self, code: np.ndarray, t: float) -> None:
        self._calib, self._calib_next = code, False
        self._counts["calibrations"] += 1
        if self._following:                  # the offset changes: blend to the new one, do not jump
            self._start_resume(t)

    def _start_resume(self, t: float) -> None:
        self._from, self._resume_t = self._out, t
        if self._smooth is not None:
            self._smooth.reset()

    def _stop_following(self) -> None:
        if self._following:
            self._following = False
            self._held = self._out
