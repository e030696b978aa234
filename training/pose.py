"""Default controls estimator for data preparation: head pose, face location and face scale from
OpenCV's bundled Haar cascades, offline, no model files (training/preprocess.py calls ``estimate``).

Per 256 px crop (~70 ms on this 2-core machine, ~50 of them the face detection preprocess already paid;
the pitch cue adds < 0.1 ms):
  * face box: the frontal-face cascade (avatar.portrait.detect_face) on the crop de-rotated by
    0, +-20, +-35 degrees, the first angle where the box also holds an eye pair, because the cascade
    misses faces rolled beyond ~20 degrees;
  * roll: that angle minus the slope of the line through the two eyes (eye cascade in the upper 60 %
    of the box, the best candidate on each side of the box centre);
  * yaw: where the eye midpoint sits between the left and right edges of the skin at cheek height
    (skin = Mahalanobis distance in CrCb to a patch under the eyes), in the face levelled by its roll:
    on a head the eyes move toward the side the face turns to while the cheek outline stays, so
    offset / half width = YAW_GAIN sin(yaw); YAW_GAIN was fitted on the ellipsoid proxy below.
    Crops where only the profile cascade fires (|yaw| > ~45) get +-PROFILE_YAW (70);
  * pitch: how far below the eye line the face narrows (jaw_drop): in the same levelled face and skin
    mask, the rows below the eyes where the skin (within +-1.6 eye distances of the eye midpoint) gets
    narrower than 1.9, 2.0, 2.1, 2.2 eye distances, i.e. the jaw outline, averaged, in eye distances
    below the eye line. Looking down the eyes move down toward the jaw outline, looking up away from it:
    JAW_FRONTAL - drop = gain sin(pitch), gain PITCH_GAIN_DOWN (0.60) or PITCH_GAIN_UP (0.47). Absolute,
    no per-clip neutral, through a PRIOR: JAW_FRONTAL = 0.672 is the astronaut's own value (mean of the
    photo and its mirror, which read -4 and +3 against it) taken as pitch 0; the population value is
    unmeasured. The thresholds and both gains were chosen and fitted on the ellipsoid proxy at yaw 0.
    Rejected, same warps (ellipsoid and planar, yaw 0 and +-20; each fitted like this one; MAE within
    +-30, always-0 scores 16): eye height in the Haar box (the box follows the features: gain 0.017 box
    heights per sin, MAE 12-56), eye line between the top and bottom skin edges at the midline (blond
    hair and the neck are skin-coloured, the edges jump: 28-67), eye-to-mouth over eye distance or box
    height (about cos(pitch), no sign; the darkest band jumps below the mouth looking down: 15-20), the
    skin's lower end in fixed columns beside the mouth (6-8 at yaw 0, 7-39 with yaw), one width threshold
    (1.8 eye distances: 44, the width profile plateaus near it; 2.0 alone is as good as the four);
  * location = box centre x / 256 and scale = 0.95 x box height / 256 (a Haar box spans mid-forehead to
    lower lip; 0.95 h approximates the paper's inner brows to chin; not calibrated against its
    68-landmark definition, expect errors of a few % of the crop width).
Frames without a face, or without an eye pair (no yaw/roll), are filled by linear interpolation between
neighbours (yaw/roll 0 in a clip without any eye pair), then every series is smoothed by a running
median over 5 frames (0.2 s): NaN-free output.

Sign convention, that of 3DDFA_V2 (utils/pose.py, matrix2angle on its y-up camera frame), which made
AniTalker's training poses; the model takes degrees / 90. yaw > 0: the nose points to image left (the
subject turns to their right); pitch > 0: looking down; roll > 0: the face rotated counter-clockwise in
the image (the eye on the image right is higher). Derived from that code, not checked by running it.

Accuracy, ``python bench/pose.py`` (bench/results/pose.json): the astronaut photo and its mirror image,
errors relative to the estimate on the unwarped crop (the photo's own pose is unknown), per-crop
values without smoothing; MAE and max over |angle| <= 30, gain = fitted slope of estimate on angle.
  axis, proxy                          MAE     max    gain    notes
  roll, in-plane rotation (exact)      0.6-0.7 1.9    0.97    -30..30, all found
  yaw, ellipsoid head (in-sample gain) 3.2-4.1 7.5-15 1.02    right sign from |yaw| >= 10; >45: profile 70
  yaw, planar homography (f = 256 px)  7.5-9.1 23     0.5     right sign 92-100 %; reads half the angle
  pitch, ellipsoid head, yaw 0         3.5-3.7 6-12   1.0     in-sample (gains, prior, thresholds); sign 100 %
  pitch, ellipsoid head, yaw +-20      3.5-12  6-30   0.4-1.1 sign 60-100 % (worst: mirror, yaw -20, looking up)
  pitch, planar homography, yaw 0      7.2-8.0 15-20  0.5     sign 100 %; reads half the angle
  pitch, planar homography, yaw +-20   7.4-13  17-27  0.4-0.6 sign 80-100 %
  (before the pitch cue: pitch = 0 always, MAE 16.2, max 30 on every row)
  pitch at the unwarped crop (absolute): -4.1 photo, +3.3 mirror (the prior is their mean)
  cross-talk, single frames: yaw moves by up to 12-32 deg under pitch-only warps of +-30, pitch by up to
  13-32 deg under yaw-only warps of +-30 (the running median damps such outliers)
The planar proxy (a photo tilted about an axis through the face centre) has no depth, so the nose does
not move against the cheeks nor the eyes against the jaw: it underestimates real 3D head-rotation
effects, and this method reads about half the angle on it. The ellipsoid proxy moves features against
the outline as a head does, but YAW_GAIN, the pitch gains, thresholds and prior were fitted on it, so real
heads (a protruding nose, a jaw whose outline is a true occluding contour, hair over the cheeks or jaw,
beards, a skin-coloured neck under a raised chin) will differ by an unmeasured factor and offset; one
face is all the prior rests on. Use this estimator for roll, coarse yaw, coarse pitch and the |yaw|
filter; plug in a landmark or 3DMM estimator (e.g. 3DDFA_V2, as the official data) for accurate pose.
"""
from __future__ import annotations

import cv2
import numpy as np

from avatar.portrait import detect_face

ROLL_SEARCH = (0.0, 20.0, -20.0, 35.0, -35.0)   # de-rotations tried until a face with two eyes is found
YAW_GAIN = 0.48          # eye-midpoint offset / skin half width per unit sin(yaw), fitted on the ellipsoid proxy
SKIN_DIST = 9.0          # squared Mahalanobis distance in CrCb that still counts as skin (3 sigma)
# pitch cue (see jaw_drop): the rows where the skin narrows to JAW_WIDTHS eye distances lie on average
# JAW_FRONTAL eye distances below the eye line on a frontal face (a prior: the astronaut's value, taken
# as pitch 0) and rise toward the eyes by PITCH_GAIN_DOWN sin(pitch) looking down, fall by PITCH_GAIN_UP
# sin(-pitch) looking up; all four fitted on the ellipsoid proxy at yaw 0 (bench/pose.py)
JAW_WIDTHS = (1.9, 2.0, 2.1, 2.2)
JAW_FRONTAL = 0.672
PITCH_GAIN_DOWN = 0.60
PITCH_GAIN_UP = 0.47
SMOOTH = 5               # running-median width, frames
# OpenCV's profile cascade fires on faces whose nose points to image left, from yaw ~45 (ellipsoid proxy)
# to 80; frames seen only by it get this |yaw|, so clips of profiles meet preprocess's max_yaw filter
PROFILE_YAW = 70.0


def _cascade(name: str) -> cv2.CascadeClassifier:
    return cv2.CascadeClassifier(cv2.data.haarcascades + f"haarcascade_{name}.xml")


def _rotate(img: np.ndarray, deg: float) -> tuple[np.ndarray, np.ndarray]:
    """img rotated counter-clockwise by deg about its centre, and the 2x3 map from img's pixels to it."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
    return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT), m


def eye_pair(grey: np.ndarray, box, cascade) -> tuple[np.ndarray, np.ndarray] | None:
    """Centres (x, y) of the image-left and image-right eye inside a face box, or None."""
    x, y, w, h = box
    roi = grey[y: y + int(0.6 * h), x: x + w]
    found, hits = cascade.detectMultiScale2(roi, 1.05, 2, minSize=(int(0.15 * w),) * 2, maxSize=(int(0.4 * w),) * 2)
    if len(found) == 0:
        return None
    centres = [(x + ex + ew / 2, y + ey + eh / 2, n) for (ex, ey, ew, eh), n in zip(found, np.ravel(hits))]
    left = [c for c in centres if c[0] < x + w / 2]
    right = [c for c in centres if c[0] >= x + w / 2]
    if not left or not right:
        return None
    el, er = (np.array(max(side, key=lambda c: c[2])[:2]) for side in (left, right))
    return (el, er) if abs(er[1] - el[1]) < 0.5 * (er[0] - el[0]) else None   # steeper than 27 deg: not a pair


def skin_mask(rgb: np.ndarray, el: np.ndarray, er: np.ndarray) -> np.ndarray | None:
    """Pixels whose CrCb is within SKIN_DIST (squared Mahalanobis) of a patch under the eyes, or None."""
    mid, d = (el + er) / 2, float(er[0] - el[0])
    ycc = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)[..., 1:].astype(np.float32)
    # skin colour model from cheeks and nose, below the eyes, where hair and eyebrows do not reach
    patch = ycc[int(mid[1] + 0.3 * d): int(mid[1] + 0.8 * d), int(mid[0] - 0.5 * d): int(mid[0] + 0.5 * d)]
    s = patch.reshape(-1, 2)
    if len(s) < 20:
        return None
    diff = ycc - s.mean(0)
    dist = np.einsum("...i,ij,...j->...", diff, np.linalg.inv(np.cov(s.T) + 4 * np.eye(2)), diff)
    return dist < SKIN_DIST


def skin_offset(skin: np.ndarray, el: np.ndarray, er: np.ndarray) -> float | None:
    """(eye midpoint x - skin centre x) / skin half width at cheek height, in an upright face; None when
    the skin region is implausible."""
    mid, d = (el + er) / 2, float(er[0] - el[0])
    c, lefts, rights = int(mid[0]), [], []
    for r in range(int(mid[1] + 0.2 * d), min(int(mid[1] + 0.9 * d), skin.shape[0])):
        row = skin[r]
        if not row[c]:
            continue
        # the skin run through the midline, bridging gaps of < 3 px (eyebrow hairs, specular spots)
        gaps_l = np.flatnonzero(~np.convolve(row[:c + 1], np.ones(3), "same").astype(bool))
        gaps_r = np.flatnonzero(~np.convolve(row[c:], np.ones(3), "same").astype(bool))
        lefts.append(gaps_l[-1] + 1 if len(gaps_l) else 0)
        rights.append(c + (gaps_r[0] - 1 if len(gaps_r) else len(row) - 1 - c))
    if len(lefts) < 3:
        return None
    lo, hi = float(np.median(lefts)), float(np.median(rights))
    half = (hi - lo) / 2
    if not 0.5 * d < half < 2.5 * d:
        return None
    return (mid[0] - (lo + hi) / 2) / half


def jaw_drop(skin: np.ndarray, el: np.ndarray, er: np.ndarray) -> float | None:
    """How far below the eye line the face narrows, in eye distances, in an upright face: per row below
    the eyes, the skin pixels within +-1.6 eye distances of the eye midpoint (mask closed 5x5, rows
    averaged over 5), divided by the eye distance; for each of JAW_WIDTHS the first row narrower than it;
    their mean - eye row. None when the face is too small or the face never narrows in the crop."""
    mid, d = (el + er) / 2, float(er[0] - el[0])
    if d < 8:
        return None
    lo, hi = max(int(mid[0] - 1.6 * d), 0), min(int(mid[0] + 1.6 * d), skin.shape[1])
    top, bottom = int(mid[1] + 0.3 * d), min(int(mid[1] + 2.5 * d), skin.shape[0])
    if bottom - top < 5:
        return None
    band = cv2.morphologyEx(skin[:bottom, lo:hi].astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    width = np.convolve(band.sum(1) / d, np.ones(5) / 5, "same")[top:bottom]
    rows = [np.flatnonzero(width < t) for t in JAW_WIDTHS]
    rows = [r[0] for r in rows if len(r)]
    return None if not rows else (top + float(np.mean(rows)) - mid[1]) / d


def pitch_from_jaw(drop: float) -> float:
    """Degrees, > 0 looking down, from jaw_drop: JAW_FRONTAL - drop = gain sin(pitch), gain by side."""
    gain = PITCH_GAIN_DOWN if drop < JAW_FRONTAL else PITCH_GAIN_UP
    return float(np.degrees(np.arcsin(np.clip((JAW_FRONTAL - drop) / gain, -1, 1))))


def profile_yaw(rgb: np.ndarray, cascade) -> float:
    """+-PROFILE_YAW when the profile cascade finds a face in the crop (nose to image left) or in its
    mirror image (nose to image right), else NaN."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    for sign, img in ((1.0, grey), (-1.0, np.ascontiguousarray(grey[:, ::-1]))):
        if len(cascade.detectMultiScale(img, 1.1, 4, minSize=(grey.shape[1] // 4,) * 2)):
            return sign * PROFILE_YAW
    return np.nan


def frame_controls(rgb: np.ndarray, eye_cascade, profile_cascade) -> tuple[float, float, float, float, float]:
    """(yaw, pitch, roll, location, scale) of one crop, NaN where not found."""
    size = rgb.shape[1]
    first = None
    for r0 in ROLL_SEARCH:
        up, m = _rotate(rgb, -r0)
        box = detect_face(up)
        if box is None:
            continue
        x, y, w, h = box
        cx = (cv2.invertAffineTransform(m) @ np.array([x + w / 2, y + h / 2, 1.0]))[0]
        loc, scale = cx / size, 0.95 * h / size
        first = first or (loc, scale)
        # a box without an eye pair at a tried angle is often chin or hair: try the next angle
        eyes = eye_pair(cv2.cvtColor(up, cv2.COLOR_RGB2GRAY), box, eye_cascade)
        if eyes is not None:
            break
    else:   # no frontal face with two eyes: a profile, or nothing
        return (profile_yaw(rgb, profile_cascade), np.nan, np.nan) + (first or (np.nan, np.nan))
    el, er = eyes
    tilt = np.degrees(np.arctan2(er[1] - el[1], er[0] - el[0]))   # image y points down: > 0 is clockwise
    roll = r0 - tilt
    if abs(tilt) > 3:   # offsets are measured along image rows: level the eye line first
        up, m = _rotate(up, tilt)
        el, er = (m @ np.append(e, 1.0) for e in (el, er))
    skin = skin_mask(up, el, er)
    off = None if skin is None else skin_offset(skin, el, er)
    yaw = np.nan if off is None else -np.degrees(np.arcsin(np.clip(off / YAW_GAIN, -1, 1)))
    drop = None if skin is None else jaw_drop(skin, el, er)
    pitch = np.nan if drop is None else pitch_from_jaw(drop)
    return yaw, pitch, roll, loc, scale


def fill_and_smooth(a: np.ndarray, default: float) -> np.ndarray:
    """NaNs linearly interpolated from their neighbours (default when all are NaN), then a running median."""
    ok = ~np.isnan(a)
    if not ok.any():
        return np.full(len(a), default, np.float32)
    t = np.arange(len(a))
    a = np.interp(t, t[ok], a[ok])
    pad = np.pad(a, SMOOTH // 2, mode="edge")
    return np.median(np.lib.stride_tricks.sliding_window_view(pad, SMOOTH), axis=1).astype(np.float32)


class HaarPoseEstimator:
    """Pose (yaw, pitch, roll) in degrees, location and scale of every crop (see the module docstring)."""

    def __init__(self):
        self.eye, self.profile = _cascade("eye"), _cascade("profileface")

    def estimate(self, frames: np.ndarray) -> dict:
        per = np.array([frame_controls(f, self.eye, self.profile) for f in frames], dtype=np.float64).reshape(-1, 5)
        if np.isnan(per[:, 3]).all():
            return {}
        yaw, pitch, roll, loc, scale = (fill_and_smooth(per[:, k], 0.0) for k in range(5))
        return {"pose": np.stack([yaw, pitch, roll], 1), "location": loc, "scale": scale}
