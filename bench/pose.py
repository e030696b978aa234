"""Accuracy of the default pose estimator (training/pose.py) against known synthetic rotations.

    python bench/pose.py            # ~15 s on 2 cores; writes bench/results/pose.json, prints a table

Faces: scikit-image's astronaut (the only real face photo it ships) and its mirror image, cropped as
training/preprocess.py crops (side 1.92 x the Haar box, 256 px). The photo's own pose is unknown, so
every error is relative: (estimate on the warped crop - estimate on the unwarped crop) - applied angle.
  * roll: the photo rotated in-plane about the face centre, then cropped: exact ground truth;
  * yaw / pitch, planar proxy: the crop as a plane rotated about the vertical / horizontal axis through
    the face centre, perspective with focal length 256 px (a homography). A plane has no depth, so the
    nose does not move against the cheeks: this proxy underestimates real 3D head-rotation effects;
  * yaw / pitch, ellipsoid proxy: the face texture on an ellipsoid (semi-axes 0.6, 0.75, 0.6 x the box
    width) rotated about its centre, orthographic: features move against the outline as on a head.
Per axis and proxy: MAE over |angle| <= 30, the share of crops with an estimate, the share of
|angle| >= 10 with the right sign, (yaw) the share of |angle| > 60 read as |yaw| > 60, how far the yaw
estimate moves when only pitch changes (pitch warps, yaw_shift_max) and the pitch estimate when only
yaw changes within +-30 (yaw warps, pitch_shift_max). pitch_<proxy>_yaw+-20: pitch -30..30 combined with
yaw +-20 (the rotation applies pitch first, then yaw), errors against the unwarped crop's pitch, so the
yaw's own effect on pitch counts as error. The pitch gains, thresholds and prior JAW_FRONTAL were fitted
on pitch_ellipsoid (yaw 0) of these two crops: that row is in-sample.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avatar.portrait import crop_box, detect_face  # noqa: E402
from training.pose import JAW_FRONTAL, PITCH_GAIN_DOWN, PITCH_GAIN_UP, YAW_GAIN, _cascade, frame_controls  # noqa: E402

SIZE, CROP_SCALE = 256, 1.92
ROLLS = np.arange(-30, 31, 5)
YAWS = np.arange(-80, 81, 5)
PITCHES = np.arange(-30, 31, 5)


def rotation(yaw: float, pitch: float) -> np.ndarray:
    """Head-to-camera rotation in OpenCV camera axes (x right, y down, z forward): yaw > 0 turns the face
    normal toward image left, pitch > 0 toward image down (training/pose.py's convention)."""
    a, p = np.radians(yaw), np.radians(pitch)
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    return ry @ rx


def planar(img: np.ndarray, yaw: float, pitch: float, centre, f: float = SIZE) -> np.ndarray:
    """img as a plane at distance f through centre, rotated, seen by a pinhole camera of focal length f."""
    h, w = img.shape[:2]
    cx, cy = centre
    r = rotation(yaw, pitch)
    k = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1]])
    hom = k @ np.column_stack([r[:, 0], r[:, 1], [0, 0, f]]) @ np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
    return cv2.warpPerspective(img, hom, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def ellipsoid(img: np.ndarray, yaw: float, pitch: float, centre, axes) -> np.ndarray:
    """img's pixels inside the ellipse of `axes` painted (front projection) on an ellipsoid, rotated and
    seen orthographically; pixels off the ellipsoid keep the background."""
    h, w = img.shape[:2]
    cx, cy = centre
    r = rotation(yaw, pitch)
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    o = np.stack([u - cx, v - cy, np.zeros_like(u)], -1) @ r      # camera rays into head axes (r^T)
    d = np.array([0.0, 0.0, 1.0]) @ r
    o_, d_ = o / axes, d / np.asarray(axes)
    qa, qb, qc = (d_ ** 2).sum(), 2 * (o_ * d_).sum(-1), (o_ ** 2).sum(-1) - 1
    disc = qb ** 2 - 4 * qa * qc
    p = o + ((-qb - np.sqrt(np.maximum(disc, 0))) / (2 * qa))[..., None] * d   # first hit, the face side
    hit = (disc > 0) & (p[..., 2] < 0)
    mx = np.where(hit, p[..., 0] + cx, u).astype(np.float32)
    my = np.where(hit, p[..., 1] + cy, v).astype(np.float32)
    return cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def summary(angles, est, base: float | None = None) -> dict:
    """Errors of est - base against angles; base defaults to the estimate at angle 0 of the same series."""
    est = np.asarray(est, dtype=np.float64)
    base = est[list(angles).index(0)] if base is None else base
    err = est - base - angles
    ok = ~np.isnan(err)
    core = ok & (np.abs(angles) <= 30)
    signed = ok & (np.abs(angles) >= 10)
    return {"angles": angles.tolist(), "estimate": [None if np.isnan(e) else round(float(e), 2) for e in est],
            "at_zero": None if np.isnan(base) else round(float(base), 2),
            "mae_within_30": round(float(np.abs(err[core]).mean()), 2) if core.any() else None,
            "max_err_within_30": round(float(np.abs(err[core]).max()), 2) if core.any() else None,
            # least-squares gain of (estimate - estimate at 0) on the angle: 1 = right scale
            "gain_within_30": round(float(np.dot(est[core] - base, angles[core]) / np.dot(angles[core], angles[core])), 2)
            if core.any() and np.abs(est[core] - base).sum() > 0 else None,
            "detected": round(float(ok.mean()), 3),
            "sign_right_beyond_10": round(float((np.sign(est[signed] - base) == np.sign(angles[signed])).mean()), 3)
            if signed.any() else None,
            # what preprocess's max_yaw=60 filter sees: frames beyond 60 that read beyond 60
            "beyond_60_flagged": round(float((np.abs(est[np.abs(angles) > 60]) > 60).mean()), 3)
            if (np.abs(angles) > 60).any() else None}


def main() -> int:
    from skimage.data import astronaut

    cascades = _cascade("eye"), _cascade("profileface")
    results = {"platform": platform.platform(), "yaw_gain": YAW_GAIN, "jaw_frontal": JAW_FRONTAL,
               "pitch_gain_down": PITCH_GAIN_DOWN, "pitch_gain_up": PITCH_GAIN_UP, "faces": {}}
    for name, photo in (("astronaut", astronaut()), ("astronaut_mirror", np.ascontiguousarray(astronaut()[:, ::-1]))):
        box = detect_face(photo)
        x0, y0, x1, y1 = crop_box(box, photo.shape, CROP_SCALE)
        centre = (box[0] + box[2] / 2, box[1] + box[3] / 2)

        def crop(img):
            return cv2.resize(np.ascontiguousarray(img[y0:y1, x0:x1]), (SIZE, SIZE), interpolation=cv2.INTER_AREA)

        base = crop(photo)
        fb = detect_face(base)
        fc, bw = (fb[0] + fb[2] / 2, fb[1] + fb[3] / 2), fb[2]
        axes = (0.6 * bw, 0.75 * bw, 0.6 * bw)
        rolled = [crop(cv2.warpAffine(photo, cv2.getRotationMatrix2D(centre, float(a), 1.0), photo.shape[1::-1],
                                      borderMode=cv2.BORDER_REFLECT)) for a in ROLLS]
        res = {"roll": summary(ROLLS, [frame_controls(c, *cascades)[2] for c in rolled])}
        for proxy, warp in (("planar", lambda y, p: planar(base, y, p, fc)),
                            ("ellipsoid", lambda y, p: ellipsoid(base, y, p, fc, axes))):
            yawed = np.array([frame_controls(warp(a, 0), *cascades) for a in YAWS])
            res[f"yaw_{proxy}"] = summary(YAWS, yawed[:, 0])
            pitched = np.array([frame_controls(warp(0, a), *cascades) for a in PITCHES])
            res[f"pitch_{proxy}"] = summary(PITCHES, pitched[:, 1])
            # cross-talk: how far yaw moves when only pitch changes, and pitch when only yaw changes (|yaw| <= 30)
            dy = np.abs(pitched[:, 0] - pitched[list(PITCHES).index(0), 0])
            res[f"pitch_{proxy}"]["yaw_shift_max"] = None if np.isnan(dy).all() else round(float(np.nanmax(dy)), 2)
            core = np.abs(YAWS) <= 30
            dp = np.abs(yawed[core, 1] - yawed[list(YAWS).index(0), 1])
            res[f"yaw_{proxy}"]["pitch_shift_max"] = None if np.isnan(dp).all() else round(float(np.nanmax(dp)), 2)
            # combined: pitch -30..30 at yaw +-20, errors relative to the unwarped crop's pitch
            for y in (-20, 20):
                both = np.array([frame_controls(warp(y, a), *cascades) for a in PITCHES])
                res[f"pitch_{proxy}_yaw{y:+d}"] = summary(PITCHES, both[:, 1], base=pitched[list(PITCHES).index(0), 1])
        results["faces"][name] = res
    out = ROOT / "bench" / "results" / "pose.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'face':<17} {'axis/proxy':<22} {'MAE<=30':>8} {'max<=30':>8} {'found':>6} {'sign>=10':>8} {'gain':>5} {'>60':>5} "
          f"{'at 0':>6}")
    for name, res in results["faces"].items():
        for key, s in res.items():
            print(f"{name:<17} {key:<22} {s['mae_within_30']!s:>8} {s['max_err_within_30']!s:>8} {s['detected']:>6} "
                  f"{s['sign_right_beyond_10']!s:>8} {s['gain_within_30']!s:>5} {s.get('beyond_60_flagged')!s:>5} {s['at_zero']!s:>6}")
    for name, res in results["faces"].items():
        print(name, "yaw shift under pitch -30..30 (max):", res["pitch_planar"]["yaw_shift_max"], "planar,",
              res["pitch_ellipsoid"]["yaw_shift_max"], "ellipsoid;", "pitch shift under yaw -30..30 (max):",
              res["yaw_planar"]["pitch_shift_max"], "planar,", res["yaw_ellipsoid"]["pitch_shift_max"], "ellipsoid")
        for key in ("roll", "yaw_ellipsoid", "yaw_planar", "pitch_ellipsoid", "pitch_ellipsoid_yaw-20",
                    "pitch_ellipsoid_yaw+20", "pitch_planar"):
            print(name, key, dict(zip(res[key]["angles"], res[key]["estimate"])))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
