"""The one program clock: it releases one AvFrame per 1/25 s slot to every sink.

Pacing lives here and nowhere else: sources are read as fast as the session's bounded buffers allow,
sinks never sleep. Slot k is due at t0 + k/25, always measured from the same anchor t0, so wake-up jitter
never accumulates into drift, and the slot count (the output pts) never resets between utterances.
When the engine has nothing ready the clock repeats the last image with 640 samples of silence (counted as
a repeat), so a viewer never sees fewer than 25 frames a second; when the engine is early, its frames wait.
A frame the engine had no time to draw (image None) shows the last image with its own audio (counted as
held). Audio and video of a slot leave in the same AvFrame, so they leave together.

The time source is injectable: RealTime for use, FakeTime (virtual seconds) for tests and the soak bench.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from avatar.timebase import FPS, OUT_RATE, SAMPLES_PER_FRAME, AvFrame

DONE = object()          # next_frame() returns it when the stream has ended
MAX_LATE_S = 0.5         # behind by more than this (a suspended laptop): re-anchor instead of bursting


class RealTime:
    virtual = False

    def now(self) -> float:
        return time.monotonic()

    def spend(self, seconds: float) -> None:
        """Compute that takes this long (test engines): here, a real sleep."""
        time.sleep(seconds)

    async def sleep_until(self, t: float) -> None:
        # yields even when already late, so consumers and the source reader still get their turn
        await asyncio.sleep(max(0.0, t - time.monotonic()))


class FakeTime:
    """Virtual seconds that jump straight to each deadline: fast and deterministic.

    jitter() -> extra lateness of one wake-up (simulates a busy scheduler). The engine runs on its own
    thread, as it does in real time: a test engine that calls spend(s) from that thread is busy for s
    virtual seconds while the clock goes on ticking (releasing frames, feeding audio), so an engine slower
    than real time behaves as it would on a slow machine. Before time moves to a deadline, settle() (set by
    the session) waits until the engine thread is idle with every answer delivered, or blocked in spend();
    an engine that wakes before the deadline is woken at its own wake time first. Engines that do not call
    spend() take no virtual time at all.
    """
    virtual = True

    def __init__(self, start: float = 0.0, jitter=None):
        self.t = float(start)
        self.jitter = jitter
        self.settle = None            # async () -> None, waits until the engine is idle or in spend()
        self.on_block = None          # called (engine thread) when the engine starts waiting in spend()
        self.blocked_until = None     # the wake time of the engine waiting in spend(), else None
        self.on_advance = []          # callables(t) run each time the clock moves (device doubles)
        self._cond = threading.Condition()

    def now(self) -> float:
        return self.t

    def spend(self, seconds: float) -> None:
        """Engine thread: block until the clock has moved `seconds` past now."""
        with self._cond:
            wake = self.t + seconds
            if seconds <= 0:
                return
            self.blocked_until = wake
            if self.on_block is not None:
                self.on_block()
            while self.t < wake:
                self._cond.wait()

    async def sleep_until(self, t: float) -> None:
        while True:
            if self.settle is not None:
                await self.settle()
            wake = self.blocked_until
            if wake is None or wake > t:
                break
            with self._cond:                  # run the engine up to its wake time, then settle again
                self.t, self.blocked_until = max(self.t, wake), None
                self._cond.notify_all()
        with self._cond:
            self.t = max(self.t, t) + (self.jitter() if self.jitter else 0.0)
            self._cond.notify_all()
        for advance in list(self.on_advance):
            advance(self.t)
        await asyncio.sleep(0)


@dataclass
class ClockStats:
    frames: int = 0              # slots released
    repeats: int = 0             # slots the engine missed: the last image and silence
    held: int = 0                # engine frames shown with the last image (not drawn in time)
    late_max_s: float = 0.0      # worst wake-up lateness
    slips: int = 0               # re-anchors after falling more than MAX_LATE_S behind
    # slots each of the recent pictures stayed on screen (held and repeated slots included): 1 at the full
    # frame rate; runs of several slots are what a viewer sees as the picture freezing
    shown_for: collections.deque = field(default_factory=lambda: collections.deque(maxlen=5000))


class Outlet:
    """One sink's own ordered queue and task, so a slow sink delays only itself: the clock hands a frame
    over without waiting, and the sink writes its frames in order. A sink that falls ``max_queue`` frames
    behind (``sink.max_queue``, default 50) loses its oldest ones, counted in ``dropped``."""

    def __init__(self, sink):
        self.sink = sink
        self.q = collections.deque()
        self.max_queue = int(getattr(sink, "max_queue", 50))
        self.dropped = 0
        self.error = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = self._opened = False
        self._task = None

    def put(self, frame: AvFrame, spec: StreamSpec) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run(spec))
        if len(self.q) >= self.max_queue:
            self.q.popleft()
            self.dropped += 1
        self.q.append(frame)
        self._idle.clear()
        self._wake.set()

    async def _run(self, spec: StreamSpec) -> None:
        try:
            await self.sink.open(spec)
            self._opened = True
            while True:
                while not self.q:
                    self._idle.set()
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                await self.sink.write(self.q.popleft())
        except Exception as e:           # noqa: BLE001 -- the clock raises it on its next slot
            self.error = e
            self.q.clear()
            self._idle.set()

    async def drained(self) -> None:
        await self._idle.wait()

    async def aclose(self, failed: bool = False) -> None:
        """Write what is queued, then close the sink; failed: the session ended on an error or a signal,
        so a sink that can (a file) discards its output instead of finishing it."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            if failed:
                self.q.clear()
            await self._task
        if self._opened:
            abort = getattr(self.sink, "abort", None)
            await (abort() if failed and abort is not None else self.sink.aclose())

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class Clock:
    """Run with next_frame(k) -> AvFrame (show it) | None (nothing ready: repeat) | DONE (stop).

    Sinks are opened with the first frame's size and get frames re-stamped with the slot number k, each
    through its own Outlet. on_release(frame, t), if given, sees every released frame with its release
    time (metrics). A sink that fails ends the run with its error at the next slot.
    """

    def __init__(self, sinks=(), time_source=None, on_release=None):
        self.sinks = list(sinks)
        self.time = time_source or RealTime()
        self.on_release = on_release
        self.stats = ClockStats()
        self.k = 0
        self.slot_time = None    # when the slot being decided is due (next_frame may read it)
        self._last = None        # the last frame drawn: what the viewer sees now
        self._shown = 0          # slots it has been on screen
        self.outlets: dict[int, Outlet] = {}

    async def run(self, next_frame) -> None:
        period = 1.0 / FPS
        # The anchor is the first frame, not the start: polling once a period until the engine answers
        # (each poll lets the session feed it, exactly as a repeated slot would).
        self.slot_time = self.time.now()
        frame = next_frame(0)
        while frame is None:
            await self.time.sleep_until(self.time.now() + period)
            self.slot_time = self.time.now()
            frame = next_frame(0)
        t0 = self.time.now()
        while frame is not DONE:
            await self._release(frame, self.time.now())
            self.k += 1
            due = t0 + self.k * period
            await self.time.sleep_until(due)
            late = self.time.now() - due
            self.stats.late_max_s = max(self.stats.late_max_s, late)
            if late > MAX_LATE_S:
                t0 += late
                self.stats.slips += 1
            self.slot_time = t0 + self.k * period
            frame = next_frame(self.k)

    async def _release(self, frame, t: float) -> None:
        if frame is None:
            frame = AvFrame(self._last.image, np.zeros(SAMPLES_PER_FRAME, np.float32), self.k,
                            meta={"repeat": True})
            self.stats.repeats += 1
        elif frame.image is None:
            if self._last is None:
                raise RuntimeError("the engine held a frame before it had drawn one")
            frame = AvFrame(self._last.image, frame.audio, self.k, frame.pushed_at, frame.produced_at,
                            {**frame.meta, "held": True})
            self.stats.held += 1
        else:
            frame = AvFrame(frame.image, frame.audio, self.k, frame.pushed_at, frame.produced_at, frame.meta)
            if self._last is not None:
                self.stats.shown_for.append(self._shown)
            self._last, self._shown = frame, 0
        self._shown += 1
        self.stats.frames += 1
        if self.on_release is not None:
            self.on_release(frame, t)
        for outlet in self.outlets.values():
            if outlet.error is not None:
                raise outlet.error
        live = {id(sink) for sink in self.sinks}
        for key in [k for k in self.outlets if k not in live]:      # a frames() reader that left
            self.outlets.pop(key).cancel()
        spec = StreamSpec(frame.image.shape[1], frame.image.shape[0])
        for sink in self.sinks:
            if id(sink) not in self.outlets:
                self.outlets[id(sink)] = Outlet(sink)
            self.outlets[id(sink)].put(frame, spec)

    async def drained(self) -> None:
        """Every sink has written what it was given (FakeTime: sinks take no virtual time)."""
        for outlet in list(self.outlets.values()):
            await outlet.drained()

    @property
    def last_drawn(self) -> AvFrame | None:
        """The frame whose picture the viewer sees now (repeats and held frames show it)."""
        return self._last

    async def aclose(self, failed: bool = False) -> None:
        outlets, self.outlets = list(self.outlets.values()), {}
        errors = []
        for outlet in outlets:
            try:
                await outlet.aclose(failed)
            except Exception as e:      # noqa: BLE001 -- close every sink, then report the first failure
                errors.append(e)
        if errors and not failed:
            raise errors[0]


@dataclass(frozen=True)
class StreamSpec:
    width: int
    height: int
    fps: int = FPS
    sample_rate: int = OUT_RATE           # the outputs' sound (frame.meta["audio48k"])
