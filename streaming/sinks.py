"""Where released frames go. Sink protocol: ``await open(spec)``, ``await write(av_frame)``, ``await aclose()``.

Sinks never pace (the clock does) and must return quickly. Optional devices (pyvirtualcam, sounddevice,
an OpenCV GUI) are imported when a sink opens, and what is missing is named in one AnitalkerError line.
"""
from __future__ import annotations

import asyncio
import collections
import glob
import os
import platform
import re
from typing import Protocol

import numpy as np

from avatar.media import VideoWriter, check_output
from avatar.timebase import FPS, SAMPLE_RATE, AvFrame
from models.errors import AnitalkerError

from .clock import StreamSpec

MODPROBE = "sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=AniTalker"


class Sink(Protocol):
    async def open(self, spec: StreamSpec) -> None: ...

    async def write(self, frame: AvFrame) -> None: ...

    async def aclose(self) -> None: ...


class NullSink:
    """Counts frames (benchmarks)."""

    def __init__(self):
        self.frames = 0

    async def open(self, spec): pass

    async def write(self, frame):
        self.frames += 1

    async def aclose(self): pass


class QueueSink:
    """Frames for a consumer in the same program (Session.frames()); a slow consumer loses the oldest."""

    def __init__(self, maxlen: int = 50):
        self._frames = collections.deque(maxlen=maxlen)
        self._ready = asyncio.Event()
        self.dropped = 0

    async def open(self, spec): pass

    async def write(self, frame):
        self.dropped += len(self._frames) == self._frames.maxlen
        self._frames.append(frame)
        self._ready.set()

    async def get(self) -> AvFrame:
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        return self._frames.popleft()

    async def aclose(self): pass


class FileSink:
    """A video file (mp4, mov or mkv by the name), encoded as frames arrive by avatar.media.VideoWriter and
    renamed into place at close, never a half file. keep(), asked at close, says whether the recording is
    wanted: False (the session failed, or an interrupt cut its input short) discards it and leaves an
    existing file untouched; a failed write discards it too."""

    def __init__(self, path, keep=None):
        self.path = os.fspath(path)
        check_output(self.path)              # the name, the folder and its permissions, before models load
        self.keep = keep or (lambda: True)
        self.writer = None
        self.frames = 0

    async def open(self, spec: StreamSpec) -> None:
        self.writer = VideoWriter(self.path, spec.fps, spec.sample_rate)

    async def write(self, frame: AvFrame) -> None:
        self.writer.write(frame.image, frame.audio)     # discards the file itself if encoding fails
        self.frames += 1

    async def aclose(self) -> None:
        if self.writer is None:
            return
        if self.keep():
            self.writer.close()
        else:
            self.writer.discard()


def vcam_problem() -> str | None:
    """What stops a virtual camera on this machine, as one line with the fix; None if nothing is known to.
    On Windows and macOS the OBS camera is only found by opening it; VirtualCamSink.open() then names OBS."""
    try:
        import pyvirtualcam  # noqa: F401
    except ImportError:
        return "pyvirtualcam is not installed: pip install 'anitalker-live[vcam]'"
    if platform.system() == "Linux" and not glob.glob("/sys/devices/virtual/video4linux/video*"):
        return f"no v4l2loopback device: install v4l2loopback (apt install v4l2loopback-dkms) and run: {MODPROBE}"
    return None


class VirtualCamSink:
    """pyvirtualcam webcam. Video is held back by whole frames to match the voice's output latency: delay_s,
    or sync_with.latency_s of a SpeakerSink opened before this sink."""

    def __init__(self, backend: str | None = None, device: str | None = None, delay_s: float = 0.0):
        self.backend, self.device, self.delay_s = backend, device, delay_s
        self.sync_with = None
        self._delay = collections.deque()
        self.frames = 0

    async def open(self, spec: StreamSpec) -> None:
        self._hold = round((self.sync_with.latency_s if self.sync_with else self.delay_s) * FPS)
        if self.backend is None and (problem := vcam_problem()):
            raise AnitalkerError(problem)
        import pyvirtualcam
        try:
            self.cam = pyvirtualcam.Camera(width=spec.width, height=spec.height, fps=spec.fps,
                                           fmt=pyvirtualcam.PixelFormat.RGB, backend=self.backend,
                                           device=self.device)
        except (RuntimeError, KeyError) as e:
            hint = MODPROBE if platform.system() == "Linux" else "install OBS Studio 30+, start its Virtual Camera once"
            raise AnitalkerError(f"virtual camera unavailable ({str(e).splitlines()[0]}); {hint}") from None

    async def write(self, frame: AvFrame) -> None:
        self._delay.append(frame.image)
        if len(self._delay) > self._hold:
            self.cam.send(self._delay.popleft())
            self.frames += 1

    async def aclose(self) -> None:
        if hasattr(self, "cam"):
            self.cam.close()


class SpeakerSink:
    """The voice to an output device (e.g. a virtual cable into the call) at the device's own rate.

    The device pulls from a buffer in its callback; a short buffer is silence (counted), never a stall.
    latency_s (known after open) is what a VirtualCamSink's delay_s should be for lip sync.
    """

    def __init__(self, device=None, latency="low"):
        self.device, self.latency = device, latency       # latency: "low", "high" or seconds
        self.underruns = 0
        self._buf = collections.deque()
        self.latency_s = 0.0

    async def open(self, spec: StreamSpec) -> None:
        import av
        sd = import_sounddevice()
        rate = int(sd.query_devices(self.device, "output")["default_samplerate"])
        self._swr = av.AudioResampler(format="flt", layout="mono", rate=rate)
        self._stream = sd.OutputStream(device=self.device, samplerate=rate, channels=1, dtype="float32",
                                       callback=self._callback, latency=self.latency)
        self._stream.start()
        self.latency_s = float(self._stream.latency)

    def _callback(self, out, frames, _time, _status):
        n = 0
        while n < frames and self._buf:
            x = self._buf.popleft()
            take = min(len(x), frames - n)
            out[n:n + take, 0] = x[:take]
            if take < len(x):
                self._buf.appendleft(x[take:])
            n += take
        if n < frames:
            out[n:, 0] = 0
            self.underruns += 1

    async def write(self, frame: AvFrame) -> None:
        import av
        af = av.AudioFrame.from_ndarray(np.asarray(frame.audio, np.float32)[None], format="flt", layout="mono")
        af.sample_rate = SAMPLE_RATE
        for f in self._swr.resample(af):
            self._buf.append(f.to_ndarray()[0])

    async def aclose(self) -> None:
        if hasattr(self, "_stream"):
            self._stream.close()


# The default install has OpenCV's headless build (no windows); the GUI build replaces it in place.
PREVIEW_INSTALL = ("bash install.sh preview (or: pip uninstall -y opencv-python-headless && pip install "
                   "opencv-python of the same version)")


def preview_problem() -> str | None:
    """What stops ``--to preview`` here, as one line with the fix; None when a window can open."""
    import cv2
    if re.search(r"GUI:\s*NONE", cv2.getBuildInformation()):
        return f"this OpenCV has no GUI (the headless build, which the default install uses); for --to preview run {PREVIEW_INSTALL}"
    if platform.system() == "Linux" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display for --to preview (DISPLAY is not set)"
    return None


class PreviewSink:
    """An OpenCV window; needs a GUI build of OpenCV and a display (checked when the sink is made, before any
    model loads). on_key(char), if set, gets the keys pressed in the window (reenact: "c" calibrates)."""

    def __init__(self, title: str = "anitalker", on_key=None):
        if problem := preview_problem():
            raise AnitalkerError(problem)
        self.title, self.on_key = title, on_key

    async def open(self, spec: StreamSpec) -> None:
        import cv2
        self._cv2 = cv2

    async def write(self, frame: AvFrame) -> None:
        self._cv2.imshow(self.title, frame.image[:, :, ::-1])
        key = self._cv2.waitKey(1)
        if key >= 0 and self.on_key is not None:
            self.on_key(chr(key & 0xFF))

    async def aclose(self) -> None:
        if hasattr(self, "_cv2"):
            self._cv2.destroyWindow(self.title)


def import_sounddevice():
    """sounddevice, or one line that says which part is missing."""
    try:
        import sounddevice
    except ImportError:
        raise AnitalkerError("sounddevice is not installed: pip install 'anitalker-live[mic]'") from None
    except OSError:
        raise AnitalkerError("the PortAudio library is missing: apt install libportaudio2 "
                             "(macOS: brew install portaudio)") from None
    return sounddevice
