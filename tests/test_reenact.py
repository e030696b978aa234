"""Face reenactment (avatar/reenact.py): parity of absolute mode, relative calibration, lost-face handling,
the One-Euro filter, the face tracker, the frame hand-offs and reenact_file end to end."""
from __future__ import annotations

import threading
import time

import av
import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut

from avatar.media import read_video_frames, read_video_info, write_mp4
from avatar.offline import reenact_file
from avatar.pipeline import Models, encode_portrait, load_models
from avatar.portrait import prepare_portrait, to_tensor, to_uint8
from avatar.reenact import FaceTracker, LatestFrame, OneEuro, ReenactConfig, Reenactor, TimedFrames
from avatar.timebase import AudioChunk
from conftest import make_checkpoint_folder, tiny_stage1, tone
from models.errors import AnitalkerError

ASTRO = astronaut()[0:300, 60:360]  # 300x300 around the face
FACE = (117, 67, 96, 96)            # Haar box of the face inside ASTRO


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def canvas(x: int = 100, y: int = 60) -> np.ndarray:
    """640x480 driving frame with the astronaut's head at (x, y)."""
    img = np.full((480, 640, 3), 90, np.uint8)
    img[y:y + 300, x:x + 300] = ASTRO
    return img


BLANK = np.full((480, 640, 3), 90, np.uint8)


@pytest.fixture(scope="module")
def tiny():
    models = Models(tiny_stage1(), None, None, torch.device("cpu"))
    code = encode_portrait(models, to_tensor(prepare_portrait(astronaut()).image))
    return models, code


@torch.inference_mode()
def reconstruction(models, code) -> np.ndarray:
    return to_uint8(models.stage1.render(code.wa, code.alpha0, code.feats))[0]


# ---- parity ----------------------------------------------------------------------------------------

def test_absolute_mode_reproduces_the_parity_fixture():
    from parity_fixtures import CASE_A, load
    from test_parity import stage1_model, u8_close

    case = CASE_A
    a = load(case, "stage1.npz")
    models = Models(stage1_model(case), None, None, torch.device("cpu"))
    code = encode_portrait(models, torch.from_numpy(a["image_in"]))
    r = Reenactor(models, code, TimedFrames([(0.0, a["drive_image_u8"])]),
                  ReenactConfig(crop=False, resume_s=0.0))
    (frame,) = r.push(AudioChunk(np.zeros(640, np.float32)))
    alpha = r.motion(None, 0.0)                       # no new frame: the motion just shown
    assert np.abs(alpha.numpy().astype(np.float64) - a["drive_alpha"]).max() <= 1e-4
    u8_close(frame.image, a["drive_frame_u8"], "reenacted frame")
    assert frame.meta == {"source_t": 0.0, "face": True}


# ---- relative mode ---------------------------------------------------------------------------------

def test_relative_calibration_frame_renders_the_portrait_bit_exact(tiny):
    models, code = tiny
    frames = [(i / 25, canvas()) for i in range(3)]
    r = Reenactor(models, code, TimedFrames(frames), ReenactConfig(mode="relative"))
    out = r.push(AudioChunk(np.zeros(3 * 640, np.float32)))
    rec = reconstruction(models, code)
    for f in out:
        assert np.array_equal(f.image, rec)
        assert f.meta["face"]
    assert r.stats["calibrations"] == 1 and r.stats["driven"] == 3


def test_calibrate_with_a_frame_from_another_thread(tiny):
    models, code = tiny
    still, moved = canvas(), canvas(160, 100)
    r = Reenactor(models, code, None, ReenactConfig(mode="relative", crop=False, resume_s=0.0))
    r.motion(still, 0.0)                              # first frame: auto calibration
    assert not torch.equal(r.motion(moved, 0.04), code.alpha0)
    t = threading.Thread(target=r.calibrate, args=(moved,))
    t.start()
    t.join()
    assert torch.equal(r.motion(moved, 0.08), code.alpha0)
    assert r.stats["calibrations"] == 2
    r.calibrate()                                     # the next tracked frame becomes the calibration
    assert torch.equal(r.motion(still, 0.12), code.alpha0)


# ---- lost face -------------------------------------------------------------------------------------

def test_lost_face_holds_eases_to_neutral_and_resumes_without_a_jump(tiny):
    models, code = tiny
    cfg = ReenactConfig(detect_every=1, hold_s=0.3, ease_s=1.0, resume_s=0.2)
    r = Reenactor(models, code, None, cfg)
    face = canvas()
    drive = [face] * 10 + [BLANK] * 40 + [face] * 10
    out = np.stack([r.motion(img, i / 25).numpy()[0] for i, img in enumerate(drive)])
    alpha0 = code.alpha0.numpy()[0]
    tracked = out[9]
    assert np.array_equal(out[5], tracked)            # resume_s after the first face frame: the raw code
    assert not np.array_equal(tracked, alpha0)
    # last face at t=0.36: hold until 0.66 (frame 16), neutral from 0.36+1.3 (frame 42)
    for i in range(10, 17):
        assert np.array_equal(out[i], tracked), i
    dist = np.abs(out - alpha0).max(axis=1)
    assert np.all(np.diff(dist[16:43]) <= 0) and dist[17] < dist[16]
    for i in range(42, 50):
        assert np.array_equal(out[i], alpha0), i
    # face back at frame 50: starts where the output was, reaches the code over resume_s, no jump
    assert np.array_equal(out[50], alpha0) and np.array_equal(out[55], tracked)
    steps = np.abs(np.diff(out[49:56], axis=0)).max(axis=1)
    assert steps.max() <= 0.35 * np.abs(tracked - alpha0).max()
    assert r.stats["driven"] == 20


def test_push_contract_and_render_reuse(tiny):
    models, code = tiny
    calls = []
    render = models._render

    def counting(*args):
        calls.append(1)
        return render(*args)

    m = Models(models.stage1, None, None, models.device)
    m._render = counting
    clock = iter(np.arange(100.0))
    r = Reenactor(m, code, TimedFrames([(0.1, canvas())]), ReenactConfig(resume_s=0.0),
                  now=lambda: float(next(clock)))
    wave = tone(0.3)
    out = r.push(AudioChunk(wave[:1000]))
    assert [f.pts for f in out] == [0] and np.array_equal(out[0].audio, wave[:640])
    assert np.array_equal(out[0].image, reconstruction(models, code))   # no driving frame yet: neutral
    assert out[0].meta == {"source_t": None, "face": False}
    out += r.push(AudioChunk(wave[1000:3000], 1000))
    r.reset()                                         # drops the 120 pending samples
    out += r.push(AudioChunk(wave[3000:3700], 3000))
    out += r.flush()
    assert [f.pts for f in out] == list(range(6))
    assert np.array_equal(out[3].audio, wave[1920:2560])
    assert np.array_equal(out[4].audio, wave[3000:3640])
    assert np.array_equal(out[5].audio[:60], wave[3640:3700]) and not out[5].audio[60:].any()
    assert all(len(f.audio) == 640 for f in out)
    assert out[3].meta == {"source_t": 0.1, "face": True}
    # frame 0: neutral; frames 1, 2: neutral (no driving frame is due before 0.1 s); 3: the face; 4, 5 reuse it
    assert len(calls) == 2 and out[4].image is out[3].image and out[2].image is out[0].image
    assert all(f.produced_at >= f.pushed_at for f in out)


# ---- One-Euro --------------------------------------------------------------------------------------

def test_one_euro():
    f = OneEuro(min_cutoff=1.0, beta=0.5)
    x = np.array([0.3, -0.7, 0.1])
    assert all(np.array_equal(f(x, i / 25), x) for i in range(50))   # constant in, constant out

    rng = np.random.default_rng(0)
    noisy = 0.2 + 0.05 * rng.standard_normal((200, 2))
    f = OneEuro(min_cutoff=np.array([np.inf, 1.0]), beta=0.0)
    out = np.stack([f(v, i / 25) for i, v in enumerate(noisy)])
    assert np.array_equal(out[:, 0], noisy[:, 0])                    # strength 0: raw
    assert out[50:, 1].var() < 0.25 * noisy[50:, 1].var()
    f.reset()
    assert np.array_equal(f(noisy[7], 9.0), noisy[7])                # first call after reset: x itself


def test_smoothing_strength_per_dimension(tiny):
    models, code = tiny
    s = (0.0,) * 10 + (0.8,) * 10
    r = Reenactor(models, code, None, ReenactConfig(crop=False, smoothing=s, resume_s=0.0))
    face = prepare_portrait(astronaut()).image.astype(int)
    rng = np.random.default_rng(1)
    raw, out = [], []
    for i in range(12):                               # 256x256 frames go to the encoder as they are
        img = np.clip(face + rng.integers(-40, 40, face.shape), 0, 255).astype(np.uint8)
        raw.append(r._encode(img))
        out.append(r.motion(img, i / 25).numpy())
    raw, out = np.concatenate(raw), np.concatenate(out)
    assert np.array_equal(out[:, :10], raw[:, :10])
    assert out[1:, 10:].var(axis=0).mean() < raw[1:, 10:].var(axis=0).mean()


def test_config_is_validated():
    for bad in (dict(mode="mirror"), dict(detect_every=0), dict(smoothing=1.5), dict(smoothing=(0.1, 0.2)),
                dict(hold_s=-1), dict(ease_s=float("nan"))):
        with pytest.raises(AnitalkerError):
            ReenactConfig(**bad)
    assert ReenactConfig(smoothing=[0.5] * 20).smoothing == (0.5,) * 20


# ---- tracker and drivers ---------------------------------------------------------------------------

def test_face_tracker_follows_the_face():
    tracker = FaceTracker(detect_every=5)
    errors = []
    for i in range(18):
        x, y = 100 + 6 * i, 60 + 2 * i
        crop = tracker(canvas(x, y), i / 25)
        assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
        x0, y0, x1, y1 = tracker.box
        fx, fy = x + FACE[0] + FACE[2] / 2, y + FACE[1] + FACE[3] / 2
        errors.append(max(abs((x0 + x1) / 2 - fx), abs((y0 + y1) / 2 - fy)) / (x1 - x0))
    assert tracker.detections == 4                    # frames 0, 5, 10, 15
    assert max(errors) < 0.2                          # within a fifth of the crop, detection lag included
    assert tracker(BLANK, 0.72) is not None           # between detections the last box is reused
    assert tracker(BLANK, 0.76) is not None
    assert tracker(BLANK, 0.8) is None and tracker.box is None      # the detection at frame 20 finds nothing
    assert tracker(BLANK, 0.84) is None and tracker.detections == 6  # lost: detect every frame
    assert tracker(canvas(), 0.88) is not None and tracker.detections == 7


def test_latest_frame_newest_wins_across_threads():
    slot = LatestFrame()
    assert slot.take(0) is None
    n = 300
    taken = []

    def capture():
        for i in range(n):
            slot.put(np.full((2, 2, 3), i % 256, np.uint8), t=float(i))
            time.sleep(0.0002)

    t = threading.Thread(target=capture)
    t.start()
    while t.is_alive():
        item = slot.take(len(taken))
        if item is not None:
            taken.append(item[1])
        time.sleep(0.002)
    t.join()
    last = slot.take(0)
    if last is not None:
        taken.append(last[1])
    assert taken[-1] == n - 1 and taken == sorted(set(taken))        # newest wins, nothing twice
    assert slot.captured == n and slot.stale == n - len(taken)
    assert slot.take(0) is None


def test_timed_frames_pick_by_time():
    img = [np.full((2, 2, 3), i, np.uint8) for i in range(10)]
    ten = TimedFrames((i / 10, img[i]) for i in range(10))           # 10 fps clip, lazily consumed
    got = [ten.take(p) for p in range(8)]
    assert [g[1] if g else None for g in got] == [0.0, None, None, 0.1, None, 0.2, None, None]
    fifty = TimedFrames((i / 50, img[i]) for i in range(10))
    assert fifty.take(0)[1] == 0.0 and fifty.take(1)[1] == 0.04 and fifty.take(2)[1] == 0.08
    assert fifty.stale == 2 and fifty.captured == 5


# ---- files and loading -----------------------------------------------------------------------------

def clip(path, seconds: float, fps: int, audio: bool):
    n = round(seconds * fps)
    write_mp4(path, (canvas(100 + 3 * i, 60 + i) for i in range(n)), tone(seconds) if audio else None, fps=fps)


def test_reenact_file_end_to_end(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    make_checkpoint_folder(folder, infer_types=())      # stage1.ckpt only
    models = load_models(folder, device="cpu", stage1_only=True)
    assert models.stage2 is None and models.infer_type == "stage1_only"
    with pytest.raises(AnitalkerError, match="reenactment only"):
        models.features(np.zeros(16000, np.float32))
    portrait = tmp_path / "portrait.png"
    Image.fromarray(astronaut()).save(portrait)
    for audio in (True, False):
        src, out = tmp_path / f"drive{audio}.mp4", tmp_path / f"out{audio}.mp4"
        clip(src, 1.2, 30, audio)
        timings = reenact_file(models, portrait, src, out, paste_back=not audio, progress=False)
        info = read_video_info(out)
        assert info["frames"] == 30 and info["fps"] == 25
        assert (info["width"], info["height"]) == ((256, 256) if audio else (512, 512))
        assert abs(info["audio_seconds"] - 1.2) < 0.03
        assert {"track", "motion", "render", "encode"} <= set(timings.seconds)


def test_missing_inputs_are_clear(tmp_path):
    with pytest.raises(AnitalkerError, match="anitalker download"):
        load_models(tmp_path, device="cpu", stage1_only=True)
    with pytest.raises(AnitalkerError, match="not found"):
        read_video_frames(tmp_path / "nope.mp4")
    wav = tmp_path / "a.mp4"
    with av.open(str(wav), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(tone(0.2)[None], format="flt", layout="mono")
        frame.sample_rate = 16000
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    with pytest.raises(AnitalkerError, match="no video track"):
        read_video_frames(wav)


# ---- review regressions ----------------------------------------------------------------------------

def test_one_euro_survives_nan_and_bad_times():
    f = OneEuro(min_cutoff=1.0, beta=0.5)
    assert np.isnan(f(np.array([np.nan, 1.0]), 0.0)[0])           # a NaN first value is not kept as state
    x = np.array([0.3, -0.7])
    assert np.array_equal(f(x, 0.04), x)
    held = f(np.array([np.nan, -0.6]), 0.08)
    assert held[0] == 0.3 and np.isfinite(held).all()             # the NaN dimension holds
    assert np.array_equal(f(x + 1, float("nan")), held)           # a NaN time passes no time
    assert np.array_equal(f(x + 1, 0.08), held)                   # nor does the same time
    assert np.isfinite(f(x, 0.12)).all()


def test_face_tracker_follows_a_change_of_frame_size_and_takes_grey_or_rgba():
    tracker = FaceTracker(detect_every=5)
    assert tracker(canvas(300, 160), 0.0) is not None             # face right and low in 640x480
    small = cv2.resize(canvas(300, 160), (320, 240), interpolation=cv2.INTER_AREA)
    crop = tracker(small, 0.04)                                   # the old box lies outside this frame
    assert crop is not None and crop.shape == (256, 256, 3)
    x0, y0, x1, y1 = tracker.box
    assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 240
    grey = cv2.cvtColor(canvas(), cv2.COLOR_RGB2GRAY)
    assert tracker(grey, 0.08).shape == (256, 256, 3)
    rgba = np.concatenate([canvas(), np.full((480, 640, 1), 255, np.uint8)], axis=2)
    assert tracker(rgba, 0.12).shape == (256, 256, 3)


def test_grey_and_rgba_driving_frames(tiny):
    models, code = tiny
    r = Reenactor(models, code, None, ReenactConfig(mode="relative", crop=False, resume_s=0.0))
    face = canvas()
    r.motion(face, 0.0)
    rgba = np.concatenate([face, np.zeros((480, 640, 1), np.uint8)], axis=2)
    assert torch.equal(r.motion(rgba, 0.04), code.alpha0)          # the same picture, alpha dropped
    r.calibrate(cv2.cvtColor(face, cv2.COLOR_RGB2GRAY))
    assert r.motion(cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)[:, :, None], 0.08).shape == code.alpha0.shape
    with pytest.raises(AnitalkerError, match="RGB"):
        r.motion(np.zeros((4, 4, 2), np.uint8), 0.12)


def test_a_camera_that_stops_counts_as_a_lost_face(tiny):
    models, code = tiny
    slot = LatestFrame()
    r = Reenactor(models, code, slot, ReenactConfig(detect_every=1, hold_s=0.3, ease_s=1.0, resume_s=0.0))
    face = canvas()
    frames, outs = [], []
    for i in range(60):
        if i < 10 or i >= 50:
            slot.put(face, t=i / 25)                              # the camera gives nothing in 10..49
        frames += r.push(AudioChunk(np.zeros(640, np.float32)))
        outs.append(r.motion(None, i / 25).numpy()[0])
    alpha0, tracked = code.alpha0.numpy()[0], outs[9]
    assert not np.array_equal(tracked, alpha0)
    # last frame at 0.36; stalled after 0.5 s without one (frame 22), then eases over 1 s: no freeze
    assert all(np.array_equal(outs[i], tracked) for i in range(10, 23))
    assert [f.meta["face"] for f in frames[20:24]] == [True, True, False, False]
    dist = np.abs(np.stack(outs) - alpha0).max(axis=1)
    assert np.all(np.diff(dist[22:49]) <= 0) and dist[23] > 0.9 * dist[22]   # no jump when it starts
    assert np.array_equal(outs[48], alpha0) and np.array_equal(outs[49], alpha0)
    assert frames[50].meta["face"] and np.array_equal(outs[50], tracked)     # the camera is back


def test_video_with_a_display_rotation_is_read_upright(tmp_path):
    path = tmp_path / "phone.mp4"
    upright = canvas()
    with av.open(str(path), "w") as c:                            # stored sideways, shown upright
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 480, 640, "yuv420p"
        s.set_display_rotation(90)
        for i in range(3):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.rot90(upright, -1)), format="rgb24")
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    t, img = next(read_video_frames(path))
    assert img.shape == (480, 640, 3)
    assert np.abs(img.astype(int) - upright).mean() < 4
    assert FaceTracker()(img, 0.0) is not None


def test_odd_sized_driving_clip(tmp_path):
    path = tmp_path / "odd.mp4"
    with av.open(str(path), "w") as c:                            # 301x221 (odd): yuv444p keeps every pixel
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 301, 221, "yuv444p"
        for i in range(2):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(canvas()[100:321, 50:351]), format="rgb24")
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    shapes = [img.shape for _, img in read_video_frames(path)]
    assert shapes == [(221, 301, 3)] * 2


def test_speed_modes_stay_close_to_fp32(tiny):
    """bf16 and torch.compile (which also compiles the motion encoder) are opt-in: codes and pictures stay
    close to exact fp32; a broken mode gives NaN, black or garbage frames."""
    from avatar.pipeline import Speed
    models, code = tiny
    drive = [(i / 25, canvas(100 + 6 * i, 60)) for i in range(4)]

    def run(speed):
        m = Models(models.stage1, None, None, models.device, speed)
        r = Reenactor(m, code, TimedFrames(drive), ReenactConfig())
        frames = r.push(AudioChunk(np.zeros(4 * 640, np.float32)))
        return np.stack([f.image for f in frames]).astype(int), r._target

    ref, ref_code = run(Speed())
    for speed in (Speed(precision="bf16"), Speed(compile=True)):
        got, got_code = run(speed)
        assert np.abs(got_code - ref_code).max() < 0.05, speed
        assert np.abs(got - ref).mean() < 8.0 and got.std() > 10, speed


def test_a_live_camera_is_sampled_as_late_as_the_render_allows(tiny):
    """A frame due at `due` takes its camera frame at due - (recent take-to-image time) - margin, so the
    picture is as fresh as it can be; without a due time (files, offline) nothing waits."""
    from avatar.reenact import LATE_MARGIN_S
    models, code = tiny
    clock = {"t": 100.0}
    taken, slept = [], []

    class Camera(LatestFrame):
        def take(self, pts):
            taken.append(clock["t"])
            self.put(canvas(), clock["t"])
            return super().take(pts)

    m = Models(models.stage1, None, None, models.device)
    render = m._render

    def slow_render(*args):                      # 10 ms of compute on the fake clock
        clock["t"] += 0.010
        return render(*args)
    m._render = slow_render
    r = Reenactor(m, code, Camera(), ReenactConfig(crop=False), now=lambda: clock["t"],
                  sleep=lambda d: (slept.append(d), clock.__setitem__("t", clock["t"] + d)))
    r.push(AudioChunk(np.zeros(640, np.float32)))                  # no due: no wait; learns the cost
    assert slept == [] and taken == [100.0]
    due = clock["t"] + 0.040
    r.push(AudioChunk(np.zeros(1280, np.float32), 640, due))       # two frames, due a slot apart
    assert taken[1] == pytest.approx(due - 0.010 - LATE_MARGIN_S)
    assert taken[2] == pytest.approx(due + 0.040 - 0.010 - LATE_MARGIN_S)
    assert len(slept) == 2
    r.push(AudioChunk(np.zeros(640, np.float32), 1920, clock["t"] - 1.0))   # already late: no wait
    assert len(slept) == 2
