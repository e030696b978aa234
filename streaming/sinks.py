"""Where released frames go. Sink protocol: ``await open(spec)``, ``await write(av_frame)``, ``await aclose()``,
and optionally ``await abort()`` (the session was cut short: discard rather than finish).

Sinks never pace (the clock does). Each sink gets frames through its own queue and task (clock.Outlet), so
a slow sink delays only itself; a sink whose work blocks (encoding, a window, a device call) is a
BlockingSink and does that work on a thread of its own, off the event loop. Optional devices
(pyvirtualcam, sounddevice, an OpenCV GUI) are imported when a sink opens, and what is missing is named in
one AnitalkerError line.
"""
from __future__ import annotations

import asyncio
import collections
import glob
import math
import os
import platform
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from avatar.media import VideoWriter, check_output
from avatar.timebase import FPS, OUT_RATE, AvFrame
from models.errors import AnitalkerError

from .clock import StreamSpec

MODPROBE = "sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=AniTalker"


class Sink(Protocol):
    async def open(self, spec: StreamSpec) -> None: ...

    async def write(self, frame: AvFrame) -> None: ...

    async def aclose(self) -> None: ...


class BlockingSink:
    """A sink whose work blocks: open_sync / write_sync / close_sync (and abort_sync) run in order on one
    thread of its own, so neither the event loop nor any other sink waits for them."""

    async def open(self, spec: StreamSpec) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=type(self).__name__)
        await self._call(self.open_sync, spec)

    async def write(self, frame: AvFrame) -> None:
        await self._call(self.write_sync, frame)

    async def aclose(self) -> None:
        await self._finish(self.close_sync)

    async def abort(self) -> None:
        await self._finish(self.abort_sync)

    async def _finish(self, fn) -> None:
        try:
            await self._call(fn)
        finally:
            self._thread.shutdown(wait=False)

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def open_sync(self, spec: StreamSpec) -> None:
        pass

    def write_sync(self, frame: AvFrame) -> None:
        raise NotImplementedError

    def close_sync(self) -> None:
        pass

    def abort_sync(self) -> None:
        self.close_sync()


class NullSink:
    """Counts frames (benchmarks)."""

    def __init__(self):
        self.frames = 0

    async def open(self, spec): pass

    async def write(self, frame):
        self.frames += 1

    async def aclose(self): pass


class QueueSink:
    """Frames for a consumer in the same program (Session.frames()); a slow consumer loses the oldest.
    get() raises EOFError once the session has closed its outputs and nothing is left."""

    def __init__(self, maxlen: int = 50):
        self._frames = collections.deque(maxlen=maxlen)
        self._ready = asyncio.Event()
        self.dropped = 0
        self.closed = False

    async def open(self, spec): pass

    async def write(self, frame):
        self.dropped += len(self._frames) == self._frames.maxlen
        self._frames.append(frame)
        self._ready.set()

    async def get(self) -> AvFrame:
        while not self._frames:
            if self.closed:
                raise EOFError("the session has ended")
            self._ready.clear()
            await self._ready.wait()
        return self._frames.popleft()

    async def aclose(self):
        self.closed = True
        self._ready.set()

    abort = aclose


class FileSink(BlockingSink):
    """A video file (mp4, mov or mkv by the name), encoded on its own thread by avatar.media.VideoWriter
    (its live settings: x264's fastest preset, one thread) as frames arrive and renamed into place at
    close, never a half file. The sound is the frames' 48 kHz (meta["audio48k"]), 1,920 samples a frame.
    keep(), asked at close, says whether the recording is wanted: False (the session failed, or an
    interrupt cut its input short) discards it and leaves an existing file untouched; so do abort() (the
    session failed) and a failed write."""
    max_queue = 250             # 10 s: an encoder slower than real time for a while loses nothing

    def __init__(self, path, keep=None):
        self.path = os.fspath(path)
        check_output(self.path)              # the name, the folder and its permissions, before models load
        self.keep = keep or (lambda: True)
        self.writer = None
        self.frames = 0

    def open_sync(self, spec: StreamSpec) -> None:
        self.writer = VideoWriter(self.path, spec.fps, spec.sample_rate, live=True)

    def write_sync(self, frame: AvFrame) -> None:
        self.writer.write(frame.image, frame.meta["audio48k"])     # discards the file itself if encoding fails
        self.frames += 1

    def close_sync(self) -> None:
        if self.writer is not None:
            self.writer.close() if self.keep() else self.writer.discard()

    def abort_sync(self) -> None:
        if self.writer is not None:
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


class VirtualCamSink(BlockingSink):
    """pyvirtualcam webcam. Video is held back by whole frames to match the voice's output delay: delay_s,
    or the delay of a SpeakerSink opened before this sink (sync_with), which keeps its own delay at a whole
    number of frames however its device clock drifts."""

    def __init__(self, backend: str | None = None, device: str | None = None, delay_s: float = 0.0):
        self.backend, self.device, self.delay_s = backend, device, delay_s
        self.sync_with = None
        self._delay = collections.deque()
        self.frames = 0

    @property
    def hold(self) -> int:
        """Frames the picture is held back."""
        return self.sync_with.delay_frames if self.sync_with is not None else round(self.delay_s * FPS)

    def open_sync(self, spec: StreamSpec) -> None:
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

    def write_sync(self, frame: AvFrame) -> None:
        self._delay.append(frame.image)
        while len(self._delay) > self.hold:
            self.cam.send(self._delay.popleft())
            self.frames += 1

    def close_sync(self) -> None:
        if hasattr(self, "cam"):
            self.cam.close()


class SpeakerSink:
    """The voice to an output device (e.g. a virtual cable into the call) at the device's own rate, from the
    frames' 48 kHz sound (meta["audio48k"]).

    The device pulls from a buffer in its callback; a short buffer is silence (counted), never a stall.
    Each frame's audio should start playing exactly delay_frames / 25 s after it is written: a whole
    number of frames, which a VirtualCamSink (sync_with) holds its picture back by, so picture and voice
    leave the machine together. When the first sample will play follows from what the device reports in
    its callback (outputBufferDacTime, then the block it took) plus what is still buffered. The device's
    clock is not the program's: one running 0.1 % fast or slow would drain or fill the buffer by 3.6 s an
    hour. So every write corrects the error by stretching or shrinking that frame's audio by at most
    MAX_STRETCH (inaudible); an error beyond 10 ms (a burst of frames that waited while the device opened,
    a stall) is put right at once by dropping the oldest samples or inserting silence (counted in
    resyncs), and the buffer never holds more than MAX_BUFFER_S. stream_factory (sounddevice.OutputStream's
    signature) lets tests use a device double.
    """
    MIN_BUFFER_S = 0.06         # the loop writes 40 ms at a time; the device pulls in smaller blocks
    MAX_BUFFER_S = 1.0
    MAX_STRETCH = 0.005         # at most 0.5 % longer or shorter per frame
    GAIN = 0.05                 # of the error corrected per frame
    BAND_S = 0.01               # beyond this, jump back at once (half the 20 ms sync budget)

    def __init__(self, device=None, latency="low", stream_factory=None, now=time.monotonic):
        self.device, self.latency, self.stream_factory, self.now = device, latency, stream_factory, now
        self.underruns = 0
        self.overflow_samples = 0       # dropped to put a burst right, or beyond MAX_BUFFER_S
        self.resyncs = 0                # jumps back on time (a burst or a stall), after the start
        self.delay_frames = 1
        self.played = 0                 # samples the device has taken
        self.log = None                 # a list, if set: (when the block reaches the DAC on now()'s clock,
                                        # its samples), as the device reports it: A/V measurement
        self.clock_offset = None        # our clock minus the device's stream clock, known once it runs
        self._buf = collections.deque()
        self._level = 0                 # samples in _buf
        self._play_at = None            # when the first sample in _buf will play, as of the last pull
        self._lock = threading.Lock()
        self._started = False

    async def open(self, spec: StreamSpec) -> None:
        import av
        if self.stream_factory is None:
            sd = import_sounddevice()
            self.rate = int(sd.query_devices(self.device, "output")["default_samplerate"])
            factory = sd.OutputStream
        else:
            self.rate, factory = int(getattr(self.stream_factory, "samplerate", 48000)), self.stream_factory
        self._swr = av.AudioResampler(format="flt", layout="mono", rate=self.rate)
        self._stream = factory(device=self.device, samplerate=self.rate, channels=1, dtype="float32",
                               callback=self._callback, latency=self.latency)
        self._stream.start()
        self.clock_offset = self.now() - float(self._stream.time)   # the device's stream clock -> ours
        self.device_latency = float(self._stream.latency)
        self._plan()

    def _plan(self) -> None:
        self._planned_latency = self.device_latency
        self.delay_frames = max(1, math.ceil((self.device_latency + self.MIN_BUFFER_S) * FPS))

    @property
    def buffered_s(self) -> float:
        return self._level / self.rate

    def _callback(self, out, frames, time_info, _status):
        n = 0
        with self._lock:
            while n < frames and self._buf:
                x = self._buf.popleft()
                take = min(len(x), frames - n)
                out[n:n + take, 0] = x[:take]
                if take < len(x):
                    self._buf.appendleft(x[take:])
                n += take
            self._level -= n
            dac = float(time_info.outputBufferDacTime)
            if dac > 0:                    # what the device says, which may exceed what open() reported
                self.device_latency = dac - float(time_info.currentTime) + frames / self.rate
                if self.clock_offset is not None:
                    self._play_at = dac + self.clock_offset + frames / self.rate
        if n < frames:
            out[n:, 0] = 0
            self.underruns += self._started
        if self.log is not None and self.clock_offset is not None:
            self.log.append((time_info.outputBufferDacTime + self.clock_offset, out[:, 0].copy()))
        self.played += frames

    async def write(self, frame: AvFrame) -> None:
        import av
        af = av.AudioFrame.from_ndarray(np.asarray(frame.meta["audio48k"], np.float32)[None], format="flt",
                                        layout="mono")
        af.sample_rate = OUT_RATE
        parts = [f.to_ndarray()[0] for f in self._swr.resample(af)]
        x = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if abs(self.device_latency - self._planned_latency) > 0.005:   # the device said more than open() did
            self._plan()
        now = self.now()
        with self._lock:
            play_at = now + self.device_latency if self._play_at is None else max(self._play_at, now)
            # > 0: this frame would start late (the buffer holds too much: a slow device clock, a burst)
            err = round((play_at + self._level / self.rate - now - self.delay_frames / FPS) * self.rate)
        band = round(self.BAND_S * self.rate)
        if not self._started or err < -band:
            x = np.concatenate([np.zeros(-err if err < 0 else 0, np.float32), x])
            self.resyncs += self._started
            self._started = True
            err = max(err, 0)
        elif abs(err) <= band and len(x):
            limit = max(1, int(self.MAX_STRETCH * len(x)))
            cut = int(np.clip(round(err * self.GAIN), -limit, limit))
            if cut:
                x = np.interp(np.linspace(0, len(x) - 1, len(x) - cut), np.arange(len(x)), x).astype(np.float32)
        with self._lock:
            self._buf.append(x)
            self._level += len(x)
            self.resyncs += err > band
            extra = err if err > band else self._level - int(self.MAX_BUFFER_S * self.rate)
            while extra > 0 and self._buf:       # the oldest samples go
                y = self._buf.popleft()
                drop = min(len(y), extra)
                if drop < len(y):
                    self._buf.appendleft(y[drop:])
                self._level -= drop
                self.overflow_samples += drop
                extra -= drop

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


class PreviewSink(BlockingSink):
    """An OpenCV window on its own thread; needs a GUI build of OpenCV and a display (checked when the sink
    is made, before any model loads). on_key(char), if set, gets the keys pressed in the window (reenact:
    "c" calibrates), on the window's thread."""

    def __init__(self, title: str = "anitalker", on_key=None):
        if problem := preview_problem():
            raise AnitalkerError(problem)
        self.title, self.on_key = title, on_key

    def open_sync(self, spec: StreamSpec) -> None:
        import cv2
        self._cv2 = cv2

    def write_sync(self, frame: AvFrame) -> None:
        self._cv2.imshow(self.title, frame.image[:, :, ::-1])
        key = self._cv2.waitKey(1)
        if key >= 0 and self.on_key is not None:
            self.on_key(chr(key & 0xFF))

    def close_sync(self) -> None:
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
