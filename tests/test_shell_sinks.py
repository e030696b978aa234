"""Sinks with their real libraries: mp4 through PyAV, pyvirtualcam's real Camera over a fake backend,
and the live/devices commands."""
import argparse
import asyncio
import time
import wave

import numpy as np
import pytest

from avatar.media import VideoWriter, read_video_info
from models.errors import AnitalkerError
from streaming.clock import FakeTime
from streaming.live import add_live_parser, cmd_devices, cmd_live
from streaming.session import Session
from streaming.sinks import FileSink, NullSink, PreviewSink, VirtualCamSink, vcam_problem
from streaming.sources import FileSource
from streaming.testing import ToneAnimator


def write_wav(path, seconds, rate=44100):
    x = 0.3 * np.sin(2 * np.pi * 220 * np.arange(int(rate * seconds)) / rate)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.stack([x, x], 1) * 32767).astype(np.int16).tobytes())
    return path


def test_file_sink_writes_a_decodable_mp4(tmp_path):
    wav, out = write_wav(tmp_path / "a.wav", 2.0), tmp_path / "out.mp4"
    null = NullSink()
    s = asyncio.run(Session(ToneAnimator(size=64), [FileSink(out), null], time_source=FakeTime())
                    .run(FileSource(wav)))
    info = read_video_info(out)
    assert info["frames"] == s["frames"] == null.frames == 50
    assert (info["width"], info["height"], info["fps"]) == (64, 64, 25.0)
    assert info["audio_seconds"] == pytest.approx(2.0, abs=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "out.mp4"]   # no temporary file left
    # recorded beside a live engine: x264's fastest preset (subme 0) on one thread
    opts = x264_options(out)
    assert (opts["subme"], opts["threads"]) == ("0", "1")


def x264_options(path) -> dict:
    """The encoder settings x264 writes into the stream (its SEI "options:" line)."""
    data = path.read_bytes()
    line = data[data.index(b"options: ") + 9:].split(b"\x00", 1)[0].decode()
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def test_video_writer_keeps_quality_settings_off_live(tmp_path):
    """An offline render is not racing an engine: x264's default preset (medium: subme 7) stays."""
    frames = np.random.default_rng(0).integers(0, 255, (10, 64, 64, 3), np.uint8)
    for live, subme in ((False, "7"), (True, "0")):
        w = VideoWriter(tmp_path / f"{live}.mp4", audio=False, live=live)
        for f in frames:
            w.write(f)
        w.close()
        assert x264_options(tmp_path / f"{live}.mp4")["subme"] == subme


class FakeCamBackend:
    """pyvirtualcam's backend interface; records what the real Camera sends it."""
    sent = []

    def __init__(self, *, width, height, fps, fourcc, device, **kw):
        self.size, self.fps = (width, height), fps
        FakeCamBackend.opened = self

    def send(self, frame):
        FakeCamBackend.sent.append((time.monotonic(), frame.copy()))

    def close(self):
        FakeCamBackend.closed = True

    def device(self):
        return "fake0"

    def native_fourcc(self):
        return None


def test_virtual_camera_gets_frames_at_declared_size_and_rate(tmp_path):
    pyvirtualcam = pytest.importorskip("pyvirtualcam")
    pyvirtualcam.register_backend("fake", FakeCamBackend)
    FakeCamBackend.sent = []
    sink = VirtualCamSink(backend="fake")
    s = asyncio.run(Session(ToneAnimator(size=96), [sink]).run(FileSource(write_wav(tmp_path / "a.wav", 1.0))))
    cam = FakeCamBackend.opened
    assert cam.size == (96, 96) and cam.fps == 25 and FakeCamBackend.closed
    assert len(FakeCamBackend.sent) == s["frames"] >= 25
    assert all(f.size == 96 * 96 * 3 and f.dtype == np.uint8 for _, f in FakeCamBackend.sent)
    span = FakeCamBackend.sent[-1][0] - FakeCamBackend.sent[0][0]
    assert 0.5 < (len(FakeCamBackend.sent) - 1) / 25 / span < 2.0      # paced at 25 fps (generous bounds)


def test_virtual_camera_preflight_names_the_missing_driver():
    problem = vcam_problem()
    if problem is None:
        pytest.skip("this machine has a virtual camera")
    assert "\n" not in problem and ("exclusive_caps=1" in problem or "OBS" in problem or "pip install" in problem)
    with pytest.raises(AnitalkerError, match="v4l2loopback|OBS|pip install"):
        asyncio.run(VirtualCamSink().open(type("Spec", (), dict(width=64, height=64, fps=25))()))


def test_preview_says_why_it_cannot_open():
    import cv2
    if "NONE" not in cv2.getBuildInformation().split("GUI:")[1].split("\n")[0]:
        pytest.skip("OpenCV has a GUI here")
    with pytest.raises(AnitalkerError, match="no GUI"):
        asyncio.run(PreviewSink().open(None))


def parse(argv):
    p = argparse.ArgumentParser()
    add_live_parser(p.add_subparsers(dest="command"))
    return p.parse_args(argv)


def test_live_command_end_to_end(tmp_path, capsys):
    wav, out, metrics = write_wav(tmp_path / "a.wav", 1.0), tmp_path / "o.mp4", tmp_path / "m.json"
    args = parse(["live", "--test-pattern", "--audio", str(wav), "--to", f"file:{out},null",
                  "--metrics-every", "0", "--metrics-json", str(metrics)])
    assert cmd_live(args, time_source=FakeTime()) == 0
    err = capsys.readouterr().err
    assert "configured latency 120 ms" in err and "metrics: frames 25" in err
    assert read_video_info(out)["frames"] == 25 and metrics.exists()


def test_live_command_refuses_unknown_or_missing_outputs(tmp_path):
    with pytest.raises(AnitalkerError, match="unknown output"):
        cmd_live(parse(["live", "--test-pattern", "--tts", "hi", "--to", "tv"]))
    if vcam_problem():
        with pytest.raises(AnitalkerError, match="v4l2loopback|OBS|pip install"):
            cmd_live(parse(["live", "--test-pattern", "--tts", "hi", "--to", "vcam"]))


def test_devices_lists_what_is_missing(capsys):
    assert cmd_devices(None) == 0
    out = capsys.readouterr().out
    assert "virtual camera:" in out and "preview:" in out and "tts:" in out


def test_virtual_camera_holds_video_back_by_the_voice_delay(tmp_path):
    pyvirtualcam = pytest.importorskip("pyvirtualcam")
    pyvirtualcam.register_backend("fake", FakeCamBackend)
    FakeCamBackend.sent = []
    sink = VirtualCamSink(backend="fake", delay_s=0.2)
    s = asyncio.run(Session(ToneAnimator(), [sink], time_source=FakeTime())
                    .run(FileSource(write_wav(tmp_path / "a.wav", 1.0))))
    assert len(FakeCamBackend.sent) == s["frames"] - 5          # 200 ms = 5 frames still in the delay line


@pytest.mark.parametrize("blocking", [True, False])
def test_a_slow_sink_does_not_delay_the_others(blocking):
    """A sink that takes 100 ms per frame (blocking work on its own thread, or an async write that awaits
    that long) gets its frames late and loses its oldest; a fast sink beside it still gets every frame on
    time, 40 ms apart."""
    from streaming.clock import RealTime
    from streaming.sinks import BlockingSink

    class SlowThread(BlockingSink):
        max_queue = 10
        frames = 0

        def write_sync(self, frame):
            time.sleep(0.1)
            SlowThread.frames += 1

    class SlowAsync:
        max_queue = 10
        frames = 0

        async def open(self, spec): pass

        async def write(self, frame):
            await asyncio.sleep(0.1)
            SlowAsync.frames += 1

        async def aclose(self): pass

    class Stamps:
        def __init__(self):
            self.times = []

        async def open(self, spec): pass

        async def write(self, frame):
            self.times.append(time.monotonic())

        async def aclose(self): pass

    slow, fast = (SlowThread() if blocking else SlowAsync()), Stamps()

    async def main():
        session = Session(ToneAnimator(), [slow, fast], time_source=RealTime())
        asyncio.get_running_loop().call_later(2.0, session.stop)
        return await session.run(), session

    s, session = asyncio.run(main())
    gaps = np.diff(fast.times)
    assert len(fast.times) == s["frames"] >= 45
    assert np.median(gaps) == pytest.approx(0.04, abs=0.005) and gaps.max() < 0.09, gaps.max()
    assert type(slow).frames < 0.7 * len(fast.times)          # it could not keep up, and lost its oldest
