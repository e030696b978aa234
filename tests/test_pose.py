"""The default pose estimator (training/pose.py) on the astronaut photo under known synthetic rotations;
tolerances from bench/pose.py (roll max error 1.9 deg, yaw MAE 3-4 deg and pitch MAE 3.5-3.7 deg at yaw 0
on the ellipsoid proxy, the proxy both gains were fitted on)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from avatar.portrait import crop_box, detect_face
from training.pose import HaarPoseEstimator, _cascade, frame_controls

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pose", ROOT / "bench" / "pose.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def photo():
    """(astronaut, its face box, the 256 px crop box as preprocess cuts it)."""
    from skimage.data import astronaut

    img = astronaut()
    box = detect_face(img)
    return img, box, crop_box(box, img.shape, 1.92)


def cut(img, crop):
    x0, y0, x1, y1 = crop
    return cv2.resize(np.ascontiguousarray(img[y0:y1, x0:x1]), (256, 256), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def crop256(photo):
    """The 256 px crop, its face centre and the ellipsoid head proxy's axes around it."""
    img, _, crop = photo
    base = cut(img, crop)
    fx, fy, fw, fh = detect_face(base)
    return base, (fx + fw / 2, fy + fh / 2), (0.6 * fw, 0.75 * fw, 0.6 * fw)


@pytest.fixture(scope="module")
def cascades():
    return _cascade("eye"), _cascade("profileface")


def test_roll_follows_in_plane_rotation(photo, cascades):
    img, (x, y, w, h), crop = photo
    centre = (x + w / 2, y + h / 2)

    def roll(deg):   # cv2: positive = counter-clockwise, the convention's positive roll
        m = cv2.getRotationMatrix2D(centre, deg, 1.0)
        return frame_controls(cut(cv2.warpAffine(img, m, img.shape[1::-1], borderMode=cv2.BORDER_REFLECT), crop),
                              *cascades)[2]

    base = roll(0)
    assert abs(base) < 8                       # the astronaut tilts her head a little
    for deg in (-25, -10, 10, 25):
        assert roll(deg) - base == pytest.approx(deg, abs=4)


def test_yaw_sign_on_warped_crops(crop256, cascades, bench):
    base, centre, axes = crop256
    yaw = lambda im: frame_controls(im, *cascades)[0]   # noqa: E731
    y0 = yaw(base)
    # planar perspective proxy: right sign, about half the angle (no depth to move the nose)
    assert yaw(bench.planar(base, -30, 0, centre)) < y0 - 5 < y0 + 5 < yaw(bench.planar(base, 30, 0, centre))
    # ellipsoid proxy: sign and magnitude
    for deg in (-25, 25):
        assert yaw(bench.ellipsoid(base, deg, 0, centre, axes)) - y0 == pytest.approx(deg, abs=10)
    # the mirror image turns the other way
    assert np.sign(yaw(np.ascontiguousarray(base[:, ::-1]))) == -np.sign(y0)


def test_pitch_sign_and_magnitude_on_warped_crops(crop256, cascades, bench):
    base, centre, axes = crop256
    pitch = lambda im: frame_controls(im, *cascades)[1]   # noqa: E731
    p0 = pitch(base)
    assert abs(p0) < 10          # absolute: JAW_FRONTAL is this face's own value, read as pitch 0
    ell = lambda y, p: pitch(bench.ellipsoid(base, y, p, centre, axes))   # noqa: E731
    # ellipsoid proxy (the gains' fitting set): magnitude at yaw 0, sign at every step from 10 deg
    for deg in (-20, 20):
        assert ell(0, deg) - p0 == pytest.approx(deg, abs=8)
    for deg in (10, 15, 25, 30):
        assert np.sign(ell(0, deg) - p0) == 1 and np.sign(ell(0, -deg) - p0) == -1
    # > 0 is looking down: the face turned toward image down reads positive, also with yaw
    assert ell(-20, -20) < p0 - 5 < p0 + 5 < ell(-20, 20)
    # planar proxy: right sign at +-30 (about half the angle, as for yaw)
    assert pitch(bench.planar(base, 0, -30, centre)) < p0 - 5 < p0 + 5 < pitch(bench.planar(base, 0, 30, centre))


def test_estimate_contract_and_gaps(photo):
    img, (x, y, w, h), crop = photo
    face = cut(img, crop)
    grey = np.full_like(face, 128)
    noise = np.random.default_rng(0).integers(0, 256, face.shape, dtype=np.uint8)
    frames = np.stack([face, grey, noise, face, grey, face])
    est = HaarPoseEstimator().estimate(frames)
    assert set(est) == {"pose", "location", "scale"}
    assert est["pose"].shape == (6, 3) and est["location"].shape == (6,) and est["scale"].shape == (6,)
    for a in est.values():
        assert a.dtype == np.float32 and np.isfinite(a).all()
    assert np.abs(est["pose"][:, 1]).max() < 20                 # a near-frontal face, gaps interpolated
    assert 0.4 < est["location"].mean() < 0.6 and 0.3 < est["scale"].mean() < 0.7
    assert HaarPoseEstimator().estimate(np.stack([grey, noise])) == {}   # no face at all: no controls


def test_preprocess_default_estimator_fills_pose(photo, tmp_path):
    from avatar.media import write_mp4
    from conftest import tone
    from training.preprocess import PreprocessConfig, preprocess
    from training.data import read_manifest

    img = photo[0]
    (tmp_path / "videos" / "ann").mkdir(parents=True)
    frames = [np.ascontiguousarray(img[10 + t: 330 + t, 60 + 2 * t: 380 + 2 * t]) for t in range(26)]
    write_mp4(tmp_path / "videos" / "ann" / "clip.mp4", frames, tone(26 / 25))
    cfg = PreprocessConfig(src=str(tmp_path / "videos"), out=str(tmp_path / "data"), progress=False)
    assert preprocess(cfg)["done"] == 1
    entry = read_manifest(tmp_path / "data")[0]
    pose = np.load(tmp_path / "data" / entry["files"]["pose"])
    assert pose.shape == (26, 3) and np.isfinite(pose).all()
    assert np.abs(pose[:, 0]).max() < 30 and np.abs(pose[:, 2]).max() < 10     # a near-frontal, upright face
    assert np.abs(pose[:, 1]).max() < 20
