"""A session: one avatar's input -> the engine worker -> the clock -> every sink.

    source --reader task--> Feed (input queue, pending, lead) --jobs--> EngineWorker (thread, owns the Animator)
                                                                             | call_soon_threadsafe, frame by frame
    sinks <-- Clock (one frame per slot) <-- output deque <-- _on_frame <-----+

Several sessions can share one EngineWorker (``engine=``): each has its own Animator, feed, clock and
metrics; the worker serves them in fair rounds (streaming/worker.py).

The clock's tick drives everything: the feed decides what the engine gets this slot (streaming/feed.py),
the worker computes it, the output deque holds frames until their slot, Metrics observes what is released.
`interrupt()` beats data: it empties every queue at once, bumps a generation number so frames still being
computed are dropped on arrival, and resets the engine to continue from the frame the viewer saw last;
the next slot (at most one frame period later) is silent.

Errors: a bad argument to push/set_controls raises at the caller. An item the engine fails on is reported
(metrics, ``on_error`` callbacks) and the session goes on after resetting the engine; only a fatal engine
failure (the models cannot run) ends the session, raising that error from run().

Python API (the README example; tests/test_shell_session.py runs it):

    async with Session(animator) as avatar:      # no source: idles (feeds silence) until audio is pushed
        avatar.push(pcm, rate=48000)             # mono, any rate; chunks or whole utterances
        avatar.push(mic, rate=48000, live=True, stream="mic")   # realtime input: latency stays bounded
        async for frame in avatar.frames():      # AvFrame: image (H, W, 3) uint8, audio (640,) float32
            show(frame.image, frame.audio)
            if done_talking:
                avatar.interrupt()               # drop queued speech: the next frame is silent
"""
from __future__ import annotations

import asyncio
import collections

import numpy as np

from avatar.media import Splitter, Upsampler
from avatar.openmp import release_openmp_threads
from avatar.timebase import SAMPLE_RATE, SAMPLES_PER_FRAME
from models.errors import AnitalkerError

from .clock import DONE, Clock, RealTime
from .feed import END, JITTER_FRAMES, Feed, Piece
from .metrics import Metrics
from .worker import EngineWorker

__all__ = ["Session", "JITTER_FRAMES"]


class Session:
    def __init__(self, animator, sinks=(), *, time_source=None, lead_frames=None, max_lead_frames=None,
                 input_chunks=64, preempt_idle: bool = True, engine=None):
        """lead_frames: audio fed ahead of the clock (default: the engine's latency + jitter margin); it
        grows while the engine misses slots, up to max_lead_frames (default: 2 s more). A reenactment
        engine shows the newest camera frame, so it caps the lead low: skip frames rather than queue them.
        preempt_idle: speech that arrives while only idle silence is in flight drops that silence (see
        streaming/feed.py), counted as `preempted`.
        engine: a started EngineWorker shared with other sessions (one thread owns the models and serves
        them all); the session attaches to it while it runs and leaves it running. Without one, the
        session runs its own worker and stops it at the end."""
        self.animator = animator
        self.engine = engine
        self.preempt_idle = preempt_idle
        self.time = time_source or RealTime()
        engine_frames = int(getattr(animator, "latency_frames", 0))
        lead = lead_frames if lead_frames is not None else engine_frames + JITTER_FRAMES
        self.feed = Feed(self.time, lead, max_lead_frames, input_chunks)
        self.clock = Clock(sinks, self.time, self._on_release)
        self.metrics = Metrics()
        self.on_error: list = []                # callbacks(message: str) for errors the session survived
        self.source = None
        self.stop_at_end = True
        self.worker = None
        self._out = collections.deque()
        self._gen = 0                           # bumped by interrupt(); older results are dropped
        self._progress = asyncio.Event()
        self._ended = False
        self._push_resamplers = {}
        self._upsample = Upsampler()            # the outputs' 48 kHz where the input had none
        self._readers = set()                   # the QueueSinks of frames() iterations
        self._fatal = None

    @property
    def lead(self) -> int:
        """Frames fed ahead of the clock now (the configured lead plus what a late engine borrowed)."""
        return self.feed.lead_now

    # ---- the public API ---------------------------------------------------------------------------
    async def run(self, source=None, *, stop_at_end: bool = True) -> dict:
        """Run until the source ends (stop_at_end) or stop(); returns the metrics summary.
        Without a source the session idles and plays what push() gives it."""
        self.source, self.stop_at_end = source, stop_at_end and source is not None
        self.feed.paced = source is None or bool(getattr(source, "live", False))
        loop = asyncio.get_running_loop()
        if getattr(self.time, "virtual", False):
            self.time.settle = self._settle
            self.time.on_block = lambda: loop.call_soon_threadsafe(self._progress.set)
        # the models run on the engine's thread from here; this thread's idle OpenMP workers (left from
        # loading and measuring them) would make GNU OpenMP throttle the engine's (avatar/openmp.py)
        release_openmp_threads()
        engine = self.engine or EngineWorker().start()
        self.worker = engine.attach(self.animator, loop, lambda: self._gen, self._on_frame, self._on_done,
                                    self._on_engine_error, self.time.now)
        reader = asyncio.create_task(self._read(source)) if source is not None else None
        await asyncio.sleep(0)                    # let the reader queue what it already has
        failed = True
        try:
            await self.clock.run(self._tick)
            failed = self._fatal is not None
        except BaseException as e:                # a sink failed: recorded first, so outputs are discarded
            self._fatal = self._fatal or e
            raise
        finally:
            if reader is not None:
                reader.cancel()
            await self.clock.aclose(failed)
            for reader in list(self._readers):    # frames() readers end, even those that never got a frame
                await reader.aclose()
            await asyncio.to_thread(self.worker.detach)
            if self.engine is None:
                await asyncio.to_thread(engine.stop)
        if self._fatal is not None:
            raise self._fatal
        summary = self.summary()
        if hasattr(source, "overflows"):
            summary["input_overflows"] = source.overflows
        return summary

    def summary(self) -> dict:
        return self.metrics.summary(self.clock, self.feed.dropped_samples)

    def line(self) -> str:
        return self.metrics.line(self.clock, self.feed.dropped_samples)

    @property
    def error(self) -> BaseException | None:
        """What made the session fail, or None; set before the sinks close (a file sink then discards)."""
        return self._fatal

    def push(self, samples, rate: int = SAMPLE_RATE, *, live: bool = False, stream=None, tag=None,
             hi=None) -> None:
        """Queue mono audio at any rate. Call it on the loop's thread (other threads: call_soon_threadsafe).

        live=True marks realtime input (a microphone): when the engine falls behind, its oldest audio is
        dropped so latency stays bounded; other audio (TTS, whole utterances) is always played in full.
        Each stream (any hashable naming one input) keeps its own resampler, so inputs do not mix state.
        tag (any hashable): the frames that hold this audio carry it in frame.meta["tags"].
        hi: the same audio at 48 kHz (3 samples per 16 kHz one, as a source's AudioChunk.hi carries it),
        for 16 kHz samples already split from a higher rate: the outputs then play it instead of an
        upsampled copy."""
        x = np.asarray(samples, np.float32).reshape(-1)
        if not np.isfinite(x).all():            # a broken decoder or client: silence, not NaN motion
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        if hi is not None:
            if rate != SAMPLE_RATE or len(hi) != 3 * len(x):
                raise ValueError(f"hi must be 48 kHz beside 16 kHz samples: 3 x {len(x)} samples, got {len(hi)}")
            hi = np.clip(np.nan_to_num(np.asarray(hi, np.float32).reshape(-1)), -1.0, 1.0)
        elif rate != SAMPLE_RATE:               # the models get 16 kHz, the outputs keep 48 kHz of it
            x, hi = self._resampler(stream, rate)(x)
            hi = np.clip(hi, -1.0, 1.0)
        x = np.clip(x, -1.0, 1.0)           # a full-scale tone overshoots a little when resampled
        self._put(Piece(x, self.time.now(), live, tag, hi=hi))

    def end_segment(self, tag, stream=None) -> None:
        """The audio pushed with `tag` is complete: the frame holding its last sample carries the tag in
        frame.meta["ended"] when shown. The stream's resampler gives up its last few ms first."""
        for key in [k for k in self._push_resamplers if k[0] == stream]:
            tail, hi = self._push_resamplers.pop(key).flush()
            if len(tail):
                self._put(Piece(np.clip(tail, -1.0, 1.0), self.time.now(), False, tag, hi=np.clip(hi, -1.0, 1.0)))
        self._put(Piece(np.zeros(0, np.float32), self.time.now(), False, tag, mark=True))

    def _resampler(self, stream, rate: int) -> Splitter:
        if not 1000 <= int(rate) <= 384000:
            raise AnitalkerError(f"sample rate {rate} is out of range (1000-384000 Hz)")
        return self._push_resamplers.setdefault((stream, int(rate)), Splitter(int(rate)))

    def _put(self, piece: Piece) -> None:
        try:
            self.feed.put_nowait(piece)
        except asyncio.QueueFull:
            raise AnitalkerError("the session's input queue is full; push larger chunks or less often") from None

    def close_stream(self, stream) -> None:
        """Forget the resampler state of a pushed input that has ended (a client that left)."""
        for key in [k for k in self._push_resamplers if k[0] == stream]:
            del self._push_resamplers[key]

    def set_controls(self, controls) -> None:
        """New pose / location / scale for the engine, from the next motion window. A control the model
        lacks, or a value that is not finite or out of range, raises AnitalkerError here, at the caller."""
        setter = getattr(self.animator, "set_controls", None)
        if setter is None:
            raise AnitalkerError("this avatar has no head-pose or face controls (reenactment follows the face)")
        setter(controls)

    @property
    def controls(self) -> tuple[str, ...]:
        """Names of the controls the engine takes (pose, location, scale), for a page to show."""
        return tuple(getattr(self.animator, "control_names", ()))

    def interrupt(self) -> None:
        """Drop all queued speech now; the next frame (within one frame period) is silent. Loop thread only."""
        self._restart()
        self.metrics.interrupts += 1
        if hasattr(self.source, "interrupt"):
            self.source.interrupt()

    def _restart(self, queued: bool = True) -> None:
        """Forget what is in flight (and queued, for an interrupt); the engine continues from the picture
        shown last."""
        self._gen += 1
        self.feed.clear(queued)
        self._out.clear()
        if self.worker is not None:
            self.worker.discard_queued()
            self.worker.submit("reset", self._gen, self.clock.last_drawn)

    async def frames(self):
        """Iterate the frames as the clock releases them (a bounded queue: a slow reader loses the oldest).
        The iteration ends with the session, raising its error if it failed."""
        from .sinks import QueueSink
        sink = QueueSink()
        self.clock.sinks.append(sink)
        self._readers.add(sink)
        try:
            while True:
                try:
                    frame = await sink.get()
                except EOFError:
                    if self._fatal is not None:
                        raise self._fatal from None
                    return
                yield frame
        finally:
            self._readers.discard(sink)
            if sink in self.clock.sinks:
                self.clock.sinks.remove(sink)

    def stop(self) -> None:
        """End the session at the next slot (what is queued is dropped; outputs are finished)."""
        self._ended, self.feed.source_done, self._out = True, True, collections.deque()
        self.stop_at_end = True

    async def __aenter__(self):
        self._task = asyncio.create_task(self.run(stop_at_end=False))
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc):
        self.stop()
        await self._task

    # ---- the clock's tick: feed the engine, hand out one frame --------------------------------------
    def _tick(self, k: int):
        if self._fatal is not None:
            return DONE
        self.feed.take_input()
        if self.preempt_idle and self.feed.should_preempt():
            self._restart(queued=False)              # the idle silence in flight goes, the speech starts now
            self.metrics.preempted += 1
        for kind, chunk in self.feed.tick(self.clock.slot_time, self.stop_at_end):
            self.worker.submit(kind, self._gen, chunk)
        self.metrics.queues(input=self.feed.inq.qsize(), worker=self.worker.qsize(), output=len(self._out))
        frame = self._out.popleft() if self._out else None
        if frame is None and self._ended and self.stop_at_end:
            return DONE
        self.feed.adapt(k, len(self._out), missed=frame is None, engine_idle=self.worker.done >= self.worker.sent,
                        started=self.clock.stats.frames > 0)
        return frame

    def _on_release(self, frame, t: float) -> None:
        released = None
        if not frame.meta.get("repeat"):
            released = self.feed.release()
            if released.tags:
                frame.meta["tags"] = released.tags
            if released.ended:
                frame.meta["ended"] = released.ended
        # the outputs' sound: the input's own 48 kHz when the engine passed that input through unchanged (a
        # test pattern draws its own click), else the frame's 16 kHz upsampled; the upsampler hears every
        # frame, so it never starts cold
        up = self._upsample(frame.audio)
        own = released is not None and released.hi is not None and np.array_equal(released.lo, frame.audio)
        frame.meta["audio48k"] = released.hi if own else up
        if self.metrics.first_in is None and released is not None and released.arrival is not None:
            self.metrics.first_in = released.arrival
        self.metrics.released(frame, t, released and released.arrival)

    # ---- answers from the worker (on the loop's thread) ----------------------------------------------
    def _on_frame(self, gen: int, frame) -> None:
        if gen != self._gen:
            return
        if len(frame.audio) != SAMPLES_PER_FRAME:     # the engine broke the time base: refuse, never pad
            self.metrics.bad_frames += 1
            self.feed.release()
            self._report(AnitalkerError(f"the engine returned frame {frame.pts} with {len(frame.audio)} "
                                        f"audio samples instead of {SAMPLES_PER_FRAME}; it was dropped"))
            return
        self._out.append(frame)

    def _on_done(self, gen: int, kind: str, samples: int, seconds: float) -> None:
        self.worker.done += 1
        self._progress.set()
        self.feed.note_work(samples, seconds)
        if kind == "flush" and gen == self._gen:
            self._ended = True

    def _on_engine_error(self, gen: int, e: BaseException, fatal: bool) -> None:
        if fatal:
            self._fatal = e
            return
        self._report(e)
        if gen == self._gen:          # what was in flight is lost: start again from what is shown
            self._restart(queued=False)

    def _report(self, e: BaseException) -> None:
        self.metrics.error(e)
        for callback in list(self.on_error):
            callback(self.metrics.last_error)

    async def _settle(self) -> None:
        """FakeTime: before virtual time moves on, the engine has answered everything it was given, or is
        busy (spending virtual time) past the next deadline."""
        while self.worker.done < self.worker.sent and self._fatal is None and self.time.blocked_until is None:
            self._progress.clear()
            await self._progress.wait()
        await self.clock.drained()

    async def _read(self, source) -> None:
        live = bool(getattr(source, "live", False))
        try:
            async for chunk in source:
                hi = None if chunk.hi is None else _finite(chunk.hi)
                await self.feed.inq.put(Piece(_finite(chunk.samples), self.time.now(), live, hi=hi))
        except Exception as e:                    # a broken device or file ends the session with its error
            self._fatal = e
        await self.feed.inq.put(END)


def _finite(samples) -> np.ndarray:
    """float32 samples with NaN and inf (a broken device or file) as silence."""
    x = np.asarray(samples, np.float32)
    return x if np.isfinite(x).all() else np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
