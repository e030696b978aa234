"""``anitalker reenact`` and its realtime parts: the command (offline and live), the webcam thread over a
real clip, a Session paced by a clip, the page with headless Chromium's fake camera, calibrate, and the
WebSocket API's live flag. Tiny stage-1 weights on CPU; the driving face is scikit-image's astronaut."""
from __future__ import annotations

import asyncio
import json
import shutil
import time

import cv2
import numpy as np
import pytest
import torch

from avatar.media import read_video_frames, read_video_info, write_mp4
from avatar.pipeline import Models, encode_portrait
from avatar.portrait import prepare_portrait, to_tensor
from avatar.reenact import LatestFrame, ReenactConfig, Reenactor, TimedFrames
from avatar.timebase import AvFrame
from conftest import make_checkpoint_folder, tiny_stage1, tone
from models.errors import AnitalkerError
from streaming.cli import build_parser, main
from streaming.clock import FakeTime
from streaming.reenact import WebcamCapture, clip_audio, cmd_reenact
from streaming.session import Session
from streaming.testing import ToneAnimator, chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def astronaut(i: int, size: int) -> np.ndarray:
    """Frame i of the moving astronaut: the whole picture, scaled to size, sliding and nodding a little."""
    from skimage.data import astronaut as image
    img = cv2.resize(image(), (size, size), interpolation=cv2.INTER_AREA)
    dx, dy = 0.04 * size * np.sin(2 * np.pi * i / 25), 0.02 * size * np.cos(2 * np.pi * i / 25)
    m = cv2.getRotationMatrix2D((size / 2, size / 2), 4 * np.sin(2 * np.pi * i / 25), 1.0)
    m[:, 2] += (dx, dy)
    return cv2.warpAffine(img, m, (size, size), borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("reenact")
    frames = [astronaut(i, 320) for i in range(50)]
    write_mp4(d / "clip.mp4", frames, tone(2.0))                     # 2 s with a tone
    write_mp4(d / "silent.mp4", frames[:25], None)                   # 1 s, no audio track
    cv2.imwrite(str(d / "portrait.png"), cv2.cvtColor(astronaut(0, 512), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(d / "blank.png"), np.full((256, 256, 3), 128, np.uint8))
    make_checkpoint_folder(d / "ckpts", ())                          # stage1.ckpt alone is all reenact needs
    return d


@pytest.fixture(scope="module")
def engine(media, one_thread):
    """Tiny stage-1 models and the astronaut's portrait code: a Reenactor factory."""
    models = Models(tiny_stage1(), None, None, torch.device("cpu"))
    code = encode_portrait(models, to_tensor(prepare_portrait(astronaut(0, 512)).image))
    return lambda driver, **kw: Reenactor(models, code, driver, ReenactConfig(**kw))


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main(["reenact", *map(str, argv)])
    return rc, capsys.readouterr().err


def test_offline_reenact_writes_the_clip_with_its_audio(media, capsys, one_thread):
    out = media / "out.mp4"
    rc, err = run_cli(capsys, "--checkpoints", media / "ckpts", "--portrait", media / "portrait.png",
                      "--video", media / "clip.mp4", "--to", f"file:{out}", "--device", "cpu")
    assert rc == 0, err
    info = read_video_info(out)
    assert (info["width"], info["height"]) == (256, 256) and abs(info["frames"] - 50) <= 1, info
    assert abs(info["audio_seconds"] - 2.0) < 0.1, info


@pytest.mark.parametrize("argv, says", [
    (["--video", "missing.mp4", "--to", "file:x.mp4"], "video file not found"),
    (["--portrait", "blank.png", "--video", "clip.mp4", "--to", "file:x.mp4"], "face"),
    (["--webcam", "0", "--video", "clip.mp4"], "one driving source"),
    (["--video", "clip.mp4", "--mic"], "--mic"),
    (["--serve", "--smoothing", "2"], "--smoothing"),
    # review regressions: the portrait and the outputs are checked before the models load (none here)
    (["--checkpoints", "missing-ckpts", "--portrait", "blank.png", "--video", "clip.mp4", "--to", "file:x.mp4"],
     "face"),
    (["--checkpoints", "missing-ckpts", "--video", "clip.mp4", "--to", "file:x.mp4,file:nodir/y.mp4"],
     "output folder does not exist"),
    (["--webcam", "nope.mp4", "--to", "null"], "no such file"),
])
def test_bad_input_is_one_line(media, capsys, argv, says):
    argv = [f"file:{media / a[5:]}" if a.startswith("file:") else str(media / a) if a.endswith((".mp4", ".png"))
            else a for a in argv]
    rc, err = run_cli(capsys, "--checkpoints", media / "ckpts", "--device", "cpu", *argv)
    last = err.strip().splitlines()[-1]                               # (after a status line, if any)
    assert rc == 1 and last.startswith("error: ") and says in last and "Traceback" not in err, err


def test_webcam_capture_over_a_clip_behaves_like_a_camera(media):
    with pytest.raises(AnitalkerError, match="anitalker devices"):
        WebcamCapture(str(media / "nope.mp4"))
    cap = WebcamCapture(str(media / "clip.mp4")).start()             # paced at the clip's 25 fps
    try:
        deadline = time.monotonic() + 20
        while cap.slot.captured < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        first = cap.slot.take(0)
        assert first is not None and first[0].shape == (320, 320, 3) and first[0].dtype == np.uint8
        while cap.slot.captured < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        newest = cap.slot.take(1)                                    # frames nobody took were dropped
        assert newest is not None and newest[1] > first[1] and cap.slot.stale > 0
        again = cap.slot.take(2)
        assert again is None or again[1] > newest[1]                 # nothing twice
    finally:
        cap.stop()
    assert not cap._thread.is_alive() and cap.frames == cap.slot.captured


class ListSink:
    def __init__(self):
        self.frames = []

    async def open(self, spec): pass

    async def write(self, frame):
        self.frames.append(frame)

    async def aclose(self): pass


def test_session_plays_a_clip_driving_the_portrait(media, engine):
    animator = engine(TimedFrames(read_video_frames(media / "clip.mp4")))
    sink = ListSink()
    session = Session(animator, [sink], time_source=FakeTime(), lead_frames=1, max_lead_frames=2)
    summary = asyncio.run(session.run(clip_audio(str(media / "clip.mp4"))))
    frames = [f for f in sink.frames if not f.meta.get("repeat")]
    assert 48 <= len(frames) <= 52 and summary["frames"] >= len(frames), summary
    assert animator.stats["driven"] >= 40 and sum(f.meta["face"] for f in frames) >= 40, animator.stats
    shown = [f.meta["source_t"] for f in frames if f.meta["source_t"] is not None]
    assert all(b >= a for a, b in zip(shown, shown[1:])) and shown[-1] > 1.5     # the clip, in order
    images = np.stack([f.image for f in frames]).astype(np.float32)
    assert np.abs(np.diff(images, axis=0)).mean() > 0.1               # the face moves with the clip
    audio = np.concatenate([f.audio for f in frames])
    assert np.abs(audio[:16000]).max() > 0.1                          # the clip's own sound


def mux(path, frames, wave) -> None:
    """An mp4 whose audio track is exactly ``wave`` (write_mp4 would fit it to the video)."""
    import av
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=25)
        v.width, v.height, v.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            c.mux(v.encode(f))
        af = av.AudioFrame.from_ndarray(wave[None], format="flt", layout="mono")
        af.sample_rate, af.pts = 16000, 0
        c.mux(a.encode(af))
        c.mux(v.encode(None))
        c.mux(a.encode(None))


@pytest.mark.parametrize("video_s, audio_s", [(2.0, 0.5), (1.0, 2.0)])
def test_live_clip_plays_for_its_video_length(media, engine, video_s, audio_s):
    """As offline: the clip's video length, its sound cut or padded with silence to that."""
    path = media / f"v{video_s}a{audio_s}.mp4"
    mux(path, [astronaut(i, 160) for i in range(round(video_s * 25))], tone(audio_s))
    sink = ListSink()
    session = Session(engine(TimedFrames(read_video_frames(path))), [sink], time_source=FakeTime(),
                      lead_frames=1, max_lead_frames=2)
    asyncio.run(session.run(clip_audio(str(path))))
    frames = [f for f in sink.frames if not f.meta.get("repeat")]
    assert abs(len(frames) - video_s * 25) <= 1, len(frames)
    audio = np.concatenate([f.audio for f in frames])
    assert np.abs(audio[:int(min(audio_s, video_s) * 16000) - 2000]).max() > 0.1   # its own sound first


def test_live_command_with_a_silent_clip(media, capsys, one_thread):
    out, metrics = media / "live.mp4", media / "metrics.json"
    args = build_parser().parse_args([
        "reenact", "--checkpoints", str(media / "ckpts"), "--portrait", str(media / "portrait.png"),
        "--video", str(media / "silent.mp4"), "--to", f"file:{out},null", "--device", "cpu",
        "--metrics-every", "0", "--metrics-json", str(metrics), "--mode", "relative"])
    assert cmd_reenact(args, time_source=FakeTime()) == 0
    m = json.loads(metrics.read_text())
    assert m["driven"] >= 20 and m["calibrations"] == 1, m           # relative: calibrated at start
    info = read_video_info(out)
    assert abs(info["frames"] - 25) <= 2, info


def served(coro_fn, animator, camera=None):
    """Run coro_fn(server, session) against a reenactment server on a free port."""
    pytest.importorskip("aiortc")
    from streaming.server import AvatarServer
    from streaming.webrtc import WebRTCSink

    async def go():
        sink = WebRTCSink()
        session = Session(animator, [sink], lead_frames=1, max_lead_frames=2)
        task = asyncio.create_task(session.run())
        try:
            async with AvatarServer(session, sink, port=0, camera=camera) as server:
                await asyncio.wait_for(coro_fn(server, session), 90)
        finally:
            await sink.aclose()
            session.stop()
            await task
    asyncio.run(go())


async def reply(ws) -> dict:
    while (msg := json.loads(await ws.recv()))["op"] == "metrics":
        pass
    return msg


def test_calibrate_reaches_the_reenactor(engine):
    from websockets.asyncio.client import connect
    slot = LatestFrame()
    animator = engine(slot, mode="relative")

    async def go(server, session):
        async def camera():                                           # a driving face at 25 fps
            for i in range(10 ** 6):
                slot.put(astronaut(i % 25, 320))
                await asyncio.sleep(0.04)
        feed = asyncio.create_task(camera())
        try:
            async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
                config = json.loads(await ws.recv())
                assert config["mode"] == "reenact" and config["camera"] and config["calibrate"]
                while animator.stats["calibrations"] < 1:             # the first face calibrates
                    await asyncio.sleep(0.05)
                await ws.send(json.dumps({"op": "calibrate"}))
                while animator.stats["calibrations"] < 2:             # and so does the request
                    await asyncio.sleep(0.05)
        finally:
            feed.cancel()
    served(go, animator, camera=slot)

    async def refused(server, session):
        async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            assert json.loads(await ws.recv())["mode"] == "audio"
            await ws.send(json.dumps({"op": "calibrate"}))
            assert "reenact" in (await reply(ws))["error"]
    served(refused, ToneAnimator(size=64))


def test_calibrate_in_absolute_mode_says_so(engine):
    from websockets.asyncio.client import connect

    async def go(server, session):
        async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            config = json.loads(await ws.recv())
            assert config["mode"] == "reenact" and config["calibrate"] is False     # the page hides its button
            await ws.send(json.dumps({"op": "calibrate"}))
            assert "--mode relative" in (await reply(ws))["error"]
    served(go, engine(LatestFrame()))


def test_the_webcam_is_released_when_the_command_fails(media, capsys, monkeypatch):
    stopped = []
    stop = WebcamCapture.stop
    monkeypatch.setattr(WebcamCapture, "stop", lambda self, *a: stopped.append(self) or stop(self, *a))
    rc, err = run_cli(capsys, "--checkpoints", media / "ckpts", "--device", "cpu", "--portrait",
                      media / "blank.png", "--webcam", media / "clip.mp4", "--to", "null")
    assert rc == 1 and "face" in err.strip().splitlines()[-1]
    assert len(stopped) == 1 and not stopped[0]._cap.isOpened()


def test_preview_hotkey():
    from streaming.sinks import PreviewSink

    class Window:                       # OpenCV's window calls, with "c" pressed
        imshow, destroyWindow = staticmethod(lambda *a: None), staticmethod(lambda *a: None)
        waitKey = staticmethod(lambda ms: ord("c"))

    keys = []
    sink = PreviewSink(on_key=keys.append)
    sink._cv2 = Window()
    sink.write_sync(AvFrame(np.zeros((8, 8, 3), np.uint8), np.zeros(640, np.float32), 0))
    assert keys == ["c"]


def test_websocket_live_flag_bounds_latency():
    from websockets.asyncio.client import connect
    second = np.full(16000, 0.5, "<f4")

    async def go(server, session):
        async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            await ws.recv()
            await ws.send(json.dumps({"op": "audio", "rate": 16000, "format": "f32", "live": "yes"}))
            assert "live" in (await reply(ws))["error"]
            await ws.send(json.dumps({"op": "audio", "rate": 16000, "format": "f32", "live": True}))
            await ws.send(np.tile(second, 3).tobytes())              # 3 s at once: far behind real time
            while session.feed.dropped_samples < 16000:           # most of it goes, not its latency
                await asyncio.sleep(0.05)
            dropped = session.feed.dropped_samples
            await ws.send(json.dumps({"op": "audio", "rate": 16000, "format": "f32"}))   # live: false
            await ws.send(np.tile(second, 2).tobytes())
            loud = 0
            async for frame in session.frames():                     # all 2 s of it play
                loud += float(np.abs(frame.audio).max()) > 0.4
                if loud >= 50:
                    break
            assert session.feed.dropped_samples == dropped
    served(go, ToneAnimator(size=64))


def write_y4m(path, frames) -> None:
    """YUV4MPEG2 4:2:0, the format Chromium's --use-file-for-fake-video-capture plays (looped)."""
    h, w = frames[0].shape[:2]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            f.write(b"FRAME\n" + cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes())


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")
def test_browser_camera_drives_the_avatar(tmp_path, engine):
    frames = []
    for i in range(25):                        # the astronaut, moving, in a 640x480 camera picture
        canvas = np.full((480, 640, 3), 90, np.uint8)
        canvas[:, 80:560] = astronaut(i, 480)
        frames.append(canvas)
    write_y4m(tmp_path / "camera.y4m", frames)
    slot = LatestFrame()
    animator = engine(slot)

    async def go(server, session):
        with chromium(f"http://127.0.0.1:{server.port}/?camera", tmp_path / "profile",
                      f"--use-file-for-fake-video-capture={tmp_path / 'camera.y4m'}"):
            stats = {}
            for _ in range(600):               # 60 s at most; a few seconds when the machine is idle
                await asyncio.sleep(0.1)
                stats = next((c.stats for c in server.clients if c.stats), {})
                if stats.get("framesDecoded", 0) >= 25 and animator.stats["driven"] >= 25:
                    break
            print("browser:", stats, "engine:", animator.stats, "camera:", slot.captured, slot.stale)
            assert stats.get("cameraFramesSent", 0) > 0, stats          # the page sent its camera
            assert slot.captured > 0                                   # it arrived over WebRTC
            assert animator.stats["driven"] >= 25, animator.stats      # and the face in it was found
            assert stats.get("framesDecoded", 0) >= 25, stats          # the avatar came back
            assert (stats["width"], stats["height"]) == (256, 256)
        for _ in range(100):                           # the peer's camera is let go with its connection
            if not server.sink.viewers:
                break
            await asyncio.sleep(0.1)
        assert not server.sink.viewers
    served(go, animator, camera=slot)


def test_one_browser_camera_drives_at_a_time():
    """Two pages sending cameras: the first keeps the face until it has been quiet for a second."""
    pytest.importorskip("aiortc")
    from streaming.server import CAMERA_HANDOVER_S, AvatarServer, Client
    from streaming.webrtc import WebRTCSink

    slot = LatestFrame()
    server = AvatarServer(Session(ToneAnimator()), WebRTCSink(), camera=slot)
    a, b = Client(None), Client(None)
    server.clients |= {a, b}
    frame = lambda v: np.full((4, 4, 3), v, np.uint8)          # noqa: E731
    server._camera(a, frame(1), 10.0)
    server._camera(b, frame(2), 10.1)                           # ignored: a is driving
    assert slot.take(0)[0][0, 0, 0] == 1
    server._camera(b, frame(2), 10.0 + CAMERA_HANDOVER_S + 0.1)  # a went quiet: b takes over
    assert slot.take(0)[0][0, 0, 0] == 2
    server.clients.discard(b)
    server._camera(a, frame(3), 11.2)                           # b left: a may drive again at once
    assert slot.take(0)[0][0, 0, 0] == 3
