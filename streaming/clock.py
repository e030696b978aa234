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
import time
from dataclasses import dataclass

import numpy as np

from avatar.timebase import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, AvFrame

DONE = object()          # next_frame() returns it when the stream has ended
MAX_LATE_S = 0.5         # behind by more than this (a suspended laptop): re-anchor instead of bursting


class RealTime:
    virtual = False

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, t: float) -> None:
        # yields even when already late, so consumers and the source reader still get their turn
        await asyncio.sleep(max(0.0, t - time.monotonic()))


class FakeTime:
    """Virtual seconds that jump straight to each deadline. jitter() -> extra lateness of one wake-up
    (simulates a busy scheduler). settle, if set, is awaited before time moves, so the engine thread has
    answered everything it was given: a fake clock is then as fast as the CPU and still deterministic."""
    virtual = True

    def __init__(self, start: float = 0.0, jitter=None):
        self.t = float(start)
        self.jitter = jitter
        self.settle = None

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        if self.settle is not None:
            await self.settle()
        self.t = max(self.t, t) + (self.jitter() if self.jitter else 0.0)
        await asyncio.sleep(0)


@dataclass
class ClockStats:
    frames: int = 0              # slots released
    repeats: int = 0             # slots the engine missed: the last image and silence
    held: int = 0                # engine frames shown with the last image (not drawn in time)
    late_max_s: float = 0.0      # worst wake-up lateness
    slips: int = 0               # re-anchors after falling more than MAX_LATE_S behind


class Clock:
    """Run with next_frame(k) -> AvFrame (show it) | None (nothing ready: repeat) | DONE (stop).

    Sinks are opened with the first frame's size and get frames re-stamped with the slot number k.
    on_release(frame, t), if given, sees every released frame with its release time (metrics).
    """

    def __init__(self, sinks=(), time_source=None, on_release=None):
        self.sinks = list(sinks)
        self.time = time_source or RealTime()
        self.on_release = on_release
        self.stats = ClockStats()
        self.k = 0
        self.slot_time = None    # when the slot being decided is due (next_frame may read it)
        self._last = None        # the last frame drawn: what the viewer sees now
        self._opened = set()

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
            self._last = frame
        self.stats.frames += 1
        if self.on_release is not None:
            self.on_release(frame, t)
        for sink in list(self.sinks):
            if id(sink) not in self._opened:
                self._opened.add(id(sink))
                await sink.open(StreamSpec(frame.image.shape[1], frame.image.shape[0]))
            await sink.write(frame)

    @property
    def last_drawn(self) -> AvFrame | None:
        """The frame whose picture the viewer sees now (repeats and held frames show it)."""
        return self._last

    async def aclose(self) -> None:
        for sink in self.sinks:
            if id(sink) in self._opened:
                await sink.aclose()
        self._opened.clear()


@dataclass(frozen=True)
class StreamSpec:
    width: int
    height: int
    fps: int = FPS
    sample_rate: int = SAMPLE_RATE
