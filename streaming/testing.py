"""A cheap Animator for tests and benchmarks: no models, exact frames, optional compute delay.

Frame p shows its pts as 16 black/white bars (decode_pts reads it back) and carries exactly the 640
samples it was given, so tests can check A/V pairing, continuity and counts on real output.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time

import numpy as np

from avatar.timebase import SAMPLES_PER_FRAME, AvFrame, AudioChunk

BITS = 16
CODE_STEP = 0.01            # a ToneAnimator frame's motion code is the previous one + this (a known ramp)


def encode_pts(pts: int, size: int = 64) -> np.ndarray:
    bits = (int(pts) >> np.arange(BITS)) & 1
    row = np.repeat(bits * 255, size // BITS).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(row[None, :, None], (size, len(row), 3)))


def decode_pts(image: np.ndarray) -> int:
    step = image.shape[1] // BITS
    bits = image[image.shape[0] // 2, step // 2::step, 0][:BITS] > 127
    return int(np.sum(bits.astype(np.int64) << np.arange(BITS)))


class ToneAnimator:
    """delay: seconds of compute per push that yields frames, spent with spend() (time.sleep, or a FakeTime's
    spend for an engine that is slow in virtual time). hop: frames come out only in groups
    of hop (a windowed model). hiccup=(pts, n): frames from pts on are held back for n further frames of
    audio (a late engine), then come out in a burst. latency_frames: what it declares to the session.
    meta["motion"] follows a ramp (CODE_STEP per frame) that continues across reset(last) from last's code,
    as a real engine's motion continues from the frame shown last."""

    def __init__(self, size: int = 64, delay: float = 0.0, hop: int = 1, hiccup=None, latency_frames: int = 0,
                 spend=time.sleep):
        self.size, self.delay, self.hop, self.hiccup, self.spend = size, delay, hop, hiccup, spend
        self.latency_frames = latency_frames
        self.resets = -1            # reset() below makes it 0
        self.reset()

    def reset(self, last=None) -> None:
        """Drop what was pushed and not returned; the motion ramp continues from ``last``'s code."""
        self._buf = np.zeros(0, np.float32)
        self._next = None           # pts of the next frame
        self._held = []
        self.resets += 1
        if last is not None and last.meta.get("motion") is not None:
            self._code = float(last.meta["motion"][0]) + CODE_STEP
        elif not hasattr(self, "_code"):
            self._code = 0.0

    def push(self, chunk: AudioChunk) -> list[AvFrame]:
        pushed = time.monotonic()
        if self._next is None:
            self._next = chunk.pts // SAMPLES_PER_FRAME
        self._buf = np.concatenate([self._buf, np.asarray(chunk.samples, np.float32)])
        self._cut(pushed)
        if self.hiccup and self._held and self._held[0].pts <= self.hiccup[0] < self._next:
            if self._next - self.hiccup[0] <= self.hiccup[1]:
                return []
            self.hiccup = None
        return self._emit() if len(self._held) >= self.hop else []

    def _cut(self, pushed: float) -> None:
        n = len(self._buf) // SAMPLES_PER_FRAME
        for i in range(n):
            audio = self._buf[i * SAMPLES_PER_FRAME:(i + 1) * SAMPLES_PER_FRAME].copy()
            self._held.append(AvFrame(encode_pts(self._next, self.size), audio, self._next, pushed,
                                      meta={"motion": np.array([self._code], np.float32)}))
            self._next += 1
            self._code += CODE_STEP
        self._buf = self._buf[n * SAMPLES_PER_FRAME:]

    def flush(self) -> list[AvFrame]:
        if len(self._buf):           # the last partial frame, padded with silence
            self._buf = np.concatenate([self._buf, np.zeros(SAMPLES_PER_FRAME - len(self._buf), np.float32)])
            self._cut(time.monotonic())
        self.hiccup = None
        return self._emit()

    def _emit(self) -> list[AvFrame]:
        out, self._held = self._held, []
        if out and self.delay:
            self.spend(self.delay)
        done = time.monotonic()
        return [AvFrame(f.image, f.audio, f.pts, f.pushed_at, done, f.meta) for f in out]


class PortraitAnimator(ToneAnimator):
    """The portrait it was made with (rgb, or a grey picture for None), resized to size x size, with the
    pts bars across the middle: a model-free engine whose clients can tell their avatars apart."""

    def __init__(self, rgb=None, size: int = 64, **kw):
        from PIL import Image
        super().__init__(size=size, **kw)
        self.portrait = (np.full((size, size, 3), 128, np.uint8) if rgb is None else
                         np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size))))

    def _emit(self) -> list[AvFrame]:
        strip = slice(self.size // 2 - self.size // 32, self.size // 2 + self.size // 32)
        out = []
        for f in super()._emit():
            image = self.portrait.copy()
            image[strip] = f.image[strip]
            out.append(AvFrame(image, f.audio, f.pts, f.pushed_at, f.produced_at, f.meta))
        return out


# ---- A/V sync: a flash and a click at the same pts, found again where a receiver sees them --------------
FLASH_PERIOD = 25           # one flash a second
CLICK = (0.8 * np.cos(2 * np.pi * 1000 * np.arange(80) / 16000)).astype(np.float32)  # 5 ms, loud from its 1st sample


class SyncAnimator(ToneAnimator):
    """The test pattern: every FLASH_PERIOD-th frame is white and its audio starts with a 5 ms click; the
    others are black and silent. A thin strip of pts bars runs across the middle (decode_pts reads it).
    Input audio only paces it. Offsets between flashes and clicks measured at a sink's output are what a
    viewer of that output sees."""

    def _emit(self) -> list[AvFrame]:
        return [self._pattern(f) for f in super()._emit()]

    def _pattern(self, f: AvFrame) -> AvFrame:
        flash = f.pts % FLASH_PERIOD == 0
        image = np.full((self.size, self.size, 3), 255 if flash else 0, np.uint8)
        strip = slice(self.size // 2 - self.size // 32, self.size // 2 + self.size // 32)
        image[strip] = f.image[strip]
        audio = np.zeros(SAMPLES_PER_FRAME, np.float32)
        if flash:
            audio[:len(CLICK)] = CLICK
        return AvFrame(image, audio, f.pts, f.pushed_at, f.produced_at, f.meta)


def is_flash(image: np.ndarray) -> bool:
    """A white top-left corner (an eighth of each side): the whole picture for SyncAnimator, a patch that
    mark() paints on a real engine's frames."""
    h, w = image.shape[0] // 8 or 1, image.shape[1] // 8 or 1
    return float(np.asarray(image[:h, :w], np.float32).mean()) > 128


class Marked:
    """A real engine with the test pattern stamped on its output: every `period`-th frame that comes out
    of a stretch of silence gets a white corner and a click, the others a black corner. What happens to
    the pair after the engine (the session, the clock, the sinks) is what bench/soak.py measures."""

    def __init__(self, engine, period: int = 125):
        self.engine, self.period = engine, period
        self._quiet = 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def push(self, chunk):
        return list(self.push_iter(chunk))

    def flush(self):
        return list(self.flush_iter())

    def push_iter(self, chunk):
        return map(self._mark, self.engine.push_iter(chunk))

    def flush_iter(self):
        return map(self._mark, self.engine.flush_iter())

    def reset(self, last=None):
        self.engine.reset(last)

    def _mark(self, f: AvFrame) -> AvFrame:
        silent = not np.abs(f.audio).max() > 1e-3
        self._quiet = self._quiet + 1 if silent else 0
        flash = silent and self._quiet >= 5 and f.pts % self.period == 0
        audio = f.audio
        if flash:
            audio = f.audio.copy()
            audio[:len(CLICK)] = CLICK
        if f.image is None:                       # held: the picture shown is the last one, unmarked
            return AvFrame(None, audio, f.pts, f.pushed_at, f.produced_at, f.meta)
        image = f.image.copy()
        image[:image.shape[0] // 8, :image.shape[1] // 8] = 255 if flash else 0
        return AvFrame(image, audio, f.pts, f.pushed_at, f.produced_at, f.meta)


def flash_times(images_and_times) -> list[float]:
    """The times of the frames where the picture turns white (each flash counted once)."""
    out, before = [], False
    for t, image in images_and_times:
        now = is_flash(image)
        if now and not before:
            out.append(float(t))
        before = now
    return out


def click_times(audio: np.ndarray, rate: int, t0: float = 0.0, threshold: float = 0.2) -> list[float]:
    """The times of click onsets in a mono track (a sample above threshold after 100 ms of quiet);
    sample i is at t0 + i / rate."""
    loud = np.flatnonzero(np.abs(np.asarray(audio, np.float32)) > threshold)
    quiet = int(0.1 * rate)
    onsets = [i for k, i in enumerate(loud) if k == 0 or i - loud[k - 1] > quiet]
    return [t0 + i / rate for i in onsets]


def av_offsets(flashes, clicks, window: float = 0.5) -> list[float]:
    """Click time - flash time (seconds, positive: sound late) for each flash with a click within window."""
    clicks = np.asarray(clicks, float)
    out = []
    for t in flashes:
        if len(clicks):
            d = clicks - t
            i = int(np.argmin(np.abs(d)))
            if abs(d[i]) <= window:
                out.append(float(d[i]))
    return out


class FakeOutputStream:
    """A sound device double with its own clock: it pulls `blocksize` samples every blocksize / rate
    seconds of *its* clock, which runs `skew` faster than the time source's (0.001: 0.1 % fast), and says
    when each block reaches its DAC (outputBufferDacTime: pull time + latency, on the time source's clock).
    On a FakeTime it is driven by the clock (on_advance); on real time it pulls from a thread of its own,
    as PortAudio does. Same signature as sounddevice.OutputStream."""
    samplerate = 48000

    def __init__(self, clock, skew: float = 0.0, blocksize: int = 480, device_latency: float = 0.02):
        self.clock, self.skew, self.blocksize, self.device_latency = clock, skew, blocksize, device_latency

    def __call__(self, *, device=None, samplerate, channels, dtype, callback, latency):
        self.samplerate, self.callback, self.latency = samplerate, callback, self.device_latency
        return self

    @property
    def time(self) -> float:
        return self.clock.now()

    def start(self) -> None:
        self.next = self.clock.now()
        self._stop = threading.Event()
        if hasattr(self.clock, "on_advance"):
            self.clock.on_advance.append(self.run_until)
        else:
            threading.Thread(target=self._pull, name="sound-card", daemon=True).start()

    def _pull(self) -> None:
        while not self._stop.wait(max(0.0, self.next - self.clock.now())):
            self.run_until(self.clock.now())

    def run_until(self, t: float) -> None:
        period = self.blocksize / self.samplerate / (1 + self.skew)
        while self.next <= t:
            out = np.zeros((self.blocksize, 1), np.float32)
            info = type("TimeInfo", (), dict(currentTime=self.next, outputBufferDacTime=self.next + self.latency))
            self.callback(out, self.blocksize, info, None)
            self.next += period

    def close(self) -> None:
        self._stop.set()
        if hasattr(self.clock, "on_advance") and self.run_until in self.clock.on_advance:
            self.clock.on_advance.remove(self.run_until)


@contextlib.contextmanager
def chromium(url: str, profile, *extra_flags):
    """Debian's headless Chromium on url, its fake microphone (a beep) and camera allowed without asking, a
    new profile in `profile`; killed (with its helpers) on exit. The flags keep it off the network."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise RuntimeError("needs Debian's chromium (apt install chromium)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--autoplay-policy=no-user-gesture-required",
             "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             "--remote-debugging-port=0", *extra_flags]
    browser = subprocess.Popen([exe, *flags, url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        yield browser
    finally:
        os.killpg(browser.pid, signal.SIGKILL)       # Chromium and its helpers: one group, started here
        browser.wait(10)


def stand_in_room(identity: str = "agent"):
    """A LiveKit room for tests and benchmarks without a server (needs the [livekit] extra): connected, no
    one else in it, and its local participant records the tracks it is asked to publish (in
    track_publications, as the real one does) instead of sending them anywhere."""
    from livekit import rtc

    class Publication:
        def __init__(self, track, options):
            self.track, self.kind, self.source, self.sid = track, track.kind, options.source, f"TR_{id(track)}"

        async def wait_for_subscription(self):
            return None

    class LocalParticipant:
        kind = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

        def __init__(self, room):
            self.room, self.identity, self.track_publications = room, identity, {}

        async def publish_track(self, track, options):
            pub = Publication(track, options)
            self.track_publications[pub.sid] = pub
            self.room.emit("local_track_published", pub, track)
            return pub

    class Room(rtc.EventEmitter):
        name = "stand-in"

        def __init__(self):
            super().__init__()
            self.local_participant = LocalParticipant(self)
            self.remote_participants = {}

        def isconnected(self):
            return True

    return Room()


async def ws_status(uri: str, **kw) -> int:
    """The HTTP status a WebSocket handshake with the server gets: 101 when it is accepted."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus
    try:
        async with connect(uri, **kw):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


async def until(check, timeout: float, every: float = 0.05) -> bool:
    """Poll check() every ``every`` seconds: True once it is true, False when ``timeout`` seconds pass first."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(every)
    return True
