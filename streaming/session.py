"""A session: one source -> one worker thread that owns the Animator -> the clock -> every sink.

    source --reader task--> input queue (bounded) --> pending --> worker queue --> worker thread
                                                                                      | call_soon_threadsafe
    sinks <-- Clock (one frame per slot) <-- output deque <-- _deliver <--------------+

The clock's tick drives feeding: the engine is given audio only while fewer than `lead` frames are in
flight (fed but not yet shown), so a file or TTS plays at exactly 25 fps with no second pacer, and every
queue is bounded by `lead`. When the source has nothing, silence is fed so the avatar keeps idling from
the same model. `interrupt()` beats data: it empties every queue at once, bumps a generation number so
frames still being computed are dropped on arrival, and resets the Animator; the next slot (at most one
frame period later) is silent.

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
import queue
import threading

import numpy as np

from avatar.media import Resampler
from avatar.timebase import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, AudioChunk
from models.errors import AnitalkerError

from .clock import DONE, Clock, RealTime

_END = object()            # source exhausted (reader -> session)
_STOP = object()           # worker thread: leave
JITTER_FRAMES = 3          # lead beyond the engine's own latency, against scheduling jitter
LIVE_SLACK_FRAMES = 5      # a live source may queue this much before its oldest audio is dropped


class Metrics:
    """Counters and latencies of one session; times are in the clock's time source."""

    def __init__(self):
        self.first_in = None             # arrival of the first source sample
        self.first_out = None            # release of the frame that holds it
        self.latencies = collections.deque(maxlen=5000)   # source sample in -> its frame out, seconds
        self.capture = collections.deque(maxlen=5000)     # driving video frame captured -> shown (reenactment)
        self.engine = collections.deque(maxlen=5000)      # AvFrame.produced_at - pushed_at
        self.interrupts = 0
        self.dropped_samples = 0         # live audio dropped because the engine fell behind
        self.depth_max = {"input": 0, "worker": 0, "output": 0}
        self.depth = dict(self.depth_max)
        self.started = None              # first release
        self.last_release = None

    def summary(self, clock) -> dict:
        st = clock.stats
        span = (self.last_release - self.started) if self.started is not None and self.last_release else 0
        pct = lambda xs, q: round(1000 * float(np.percentile(xs, q)), 1) if xs else None  # noqa: E731
        first = None if self.first_out is None else round(1000 * (self.first_out - self.first_in), 1)
        out = {"frames": st.frames, "repeats": st.repeats, "fps": round((st.frames - 1) / span, 2) if span else None,
               "first_audio_to_frame_ms": first, "latency_p50_ms": pct(self.latencies, 50),
               "latency_p95_ms": pct(self.latencies, 95), "engine_p50_ms": pct(self.engine, 50),
                "av_offset_ms": round(st.av_offset_ms, 3), "late_max_ms": round(1000 * st.late_max_s, 1),
               "slips": st.slips, "interrupts": self.interrupts, "dropped_input_ms": self.dropped_samples / 16,
               "queue_depth": dict(self.depth), "queue_depth_max": dict(self.depth_max)}
        if self.capture:
            out.update(capture_latency_p50_ms=pct(self.capture, 50), capture_latency_p95_ms=pct(self.capture, 95))
        return out

    def line(self, clock) -> str:
        s = self.summary(clock)
        return (f"{s['frames']} frames, {s['fps']} fps, {s['repeats']} repeated, latency p50/p95 "
                f"{s['latency_p50_ms']}/{s['latency_p95_ms']} ms, A/V {s['av_offset_ms']} ms, "
                f"queues {s['queue_depth']}")


class Session:
    def __init__(self, animator, sinks=(), *, time_source=None, lead_frames=None, max_lead_frames=None,
                 input_chunks=64):
        """lead_frames: audio fed ahead of the clock (default: the engine's latency + jitter margin); it
        grows while the engine is late, up to max_lead_frames if given (a reenactment engine shows the
        newest camera frame, so a slow machine should skip frames rather than queue them)."""
        self.animator = animator
        self.time = time_source or RealTime()
        engine_frames = int(getattr(animator, "latency_frames", 0))
        self.lead = lead_frames if lead_frames is not None else engine_frames + JITTER_FRAMES
        self.max_lead = max(self.lead, max_lead_frames) if max_lead_frames is not None else None
        self.clock = Clock(sinks, self.time, self._on_release)
        self.metrics = Metrics()
        self.source = None
        self.stop_at_end = True
        self._inq: asyncio.Queue = asyncio.Queue(maxsize=input_chunks)
        self._work: queue.Queue = queue.Queue()
        self._out = collections.deque()
        self._pending = collections.deque()     # (samples, arrival, live) taken from _inq, not yet fed
        self._arrivals = collections.deque()    # (start, end sample, arrival time) of fed source audio
        self._fed = 0                           # samples given to the engine (also the next chunk's pts)
        self._released = 0                      # engine samples shown
        self._extra = 0                         # frames of lead learnt from repeats (see _tick)
        self._min_out = 0
        self._gen = 0                           # bumped by interrupt(); older results are dropped
        self._sent = self._done = 0             # worker items given / answered (FakeTime settling)
        self._progress = asyncio.Event()
        self._source_done = self._flushing = self._ended = False
        self._last_arrival = None
        self._push_resamplers = {}
        self._error = None
        self._thread = self._task = None

    # ---- the public API ---------------------------------------------------------------------------
    async def run(self, source=None, *, stop_at_end: bool = True) -> dict:
        """Run until the source ends (stop_at_end) or stop(); returns the metrics summary.
        Without a source the session idles and plays what push() gives it."""
        self.source, self.stop_at_end = source, stop_at_end and source is not None
        self._loop = asyncio.get_running_loop()
        if getattr(self.time, "virtual", False):
            self.time.settle = self._settle
        self._thread = threading.Thread(target=self._worker, name="animator", daemon=True)
        self._thread.start()
        reader = asyncio.create_task(self._read(source)) if source is not None else None
        await asyncio.sleep(0)                    # let the reader queue what it already has
        try:
            await self.clock.run(self._tick)
        except BaseException as e:                # a sink failed: recorded first, so file sinks discard
            self._error = self._error or e
            raise
        finally:
            if reader is not None:
                reader.cancel()
            self._work.put(_STOP)
            await self.clock.aclose()
            await asyncio.to_thread(self._thread.join, 5)
        if self._error is not None:
            raise self._error
        summary = self.metrics.summary(self.clock)
        if hasattr(source, "overflows"):
            summary["input_overflows"] = source.overflows
        return summary

    @property
    def error(self) -> BaseException | None:
        """What made the session fail, or None; set before the sinks close (a file sink then discards)."""
        return self._error

    def push(self, samples, rate: int = SAMPLE_RATE, *, live: bool = False, stream=None) -> None:
        """Queue mono audio at any rate. Call it on the loop's thread (other threads: call_soon_threadsafe).

        live=True marks realtime input (a microphone): when the engine falls behind, its oldest audio is
        dropped so latency stays bounded; other audio (TTS, whole utterances) is always played in full.
        Each stream (any hashable naming one input) keeps its own resampler, so inputs do not mix state."""
        x = np.asarray(samples, np.float32).reshape(-1)
        if rate != SAMPLE_RATE:
            x = self._push_resamplers.setdefault((stream, rate), Resampler(rate))(x)
        x = np.clip(x, -1.0, 1.0)           # a full-scale tone overshoots a little when resampled
        try:
            self._inq.put_nowait((x, self.time.now(), live))
        except asyncio.QueueFull:
            raise AnitalkerError("the session's input queue is full; push larger chunks or less often") from None

    def close_stream(self, stream) -> None:
        """Forget the resampler state of a pushed input that has ended (a client that left)."""
        for key in [k for k in self._push_resamplers if k[0] == stream]:
            del self._push_resamplers[key]

    def interrupt(self) -> None:
        """Drop all queued speech now; the next frame (within one frame period) is silent. Loop thread only."""
        self._gen += 1
        while not self._inq.empty():
            if self._inq.get_nowait() is _END:
                self._source_done = True
        self._pending.clear()
        self._arrivals.clear()
        self._out.clear()
        while True:
            try:
                self._work.get_nowait()
                self._done += 1                  # discarded items count as answered
            except queue.Empty:
                break
        self._submit("reset", None)
        self._fed = self._released               # the engine restarts from what was shown
        self.metrics.interrupts += 1
        if hasattr(self.source, "interrupt"):
            self.source.interrupt()

    async def frames(self):
        """Iterate the frames as the clock releases them (a bounded queue: a slow reader loses the oldest)."""
        from .sinks import QueueSink
        sink = QueueSink()
        self.clock.sinks.append(sink)
        try:
            while True:
                yield await sink.get()
        finally:
            self.clock.sinks.remove(sink)

    def stop(self) -> None:
        self._ended, self._source_done, self._out = True, True, collections.deque()
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
        if self._error is not None:
            return DONE
        self._feed()
        d = self.metrics.depth
        d["input"], d["worker"], d["output"] = self._inq.qsize(), self._work.qsize(), len(self._out)
        for key, v in d.items():
            self.metrics.depth_max[key] = max(self.metrics.depth_max[key], v)
        # The lead adapts: every repeated slot lends the engine one more frame of audio, so an engine
        # that needs more lookahead than it declared (or loses samples) is never starved for good.
        # Once a second, what the output kept beyond the jitter margin all second long is paid back, so
        # a passing hiccup does not keep its latency (a bursty engine's normal ebb does not count).
        self._min_out = min(self._min_out, len(self._out))
        if k % FPS == 0:
            self._extra -= min(self._extra, max(0, self._min_out - JITTER_FRAMES))
            self._min_out = len(self._out)
        if self._out:
            return self._out.popleft()
        if self._ended and self.stop_at_end:
            return DONE
        if self.max_lead is None or self.lead + self._extra < self.max_lead:
            self._extra += 1
        return None

    def _feed(self) -> None:
        live = getattr(self.source, "live", False)
        if live or self.source is None:           # pushed audio is in memory already; a file is read lazily
            while self._take():
                pass
            self._drop_late_live()
        budget = (self.lead + self._extra) * SAMPLES_PER_FRAME - (self._fed - self._released)
        pieces, start = [], self._fed       # one push per slot: 20 ms packets would each cost a worker round trip
        while budget > 0 and (self._pending or self._take()):
            x, t, is_live = self._pending.popleft()
            if len(x) > budget:
                self._pending.appendleft((x[budget:], t, is_live))
                x = x[:budget]
            if self.metrics.first_in is None:
                self.metrics.first_in = t
            at = start + sum(len(p) for p in pieces)
            self._arrivals.append((at, at + len(x), t))
            pieces.append(x)
            budget -= len(x)
        if pieces:
            self._submit("push", AudioChunk(np.concatenate(pieces) if len(pieces) > 1 else pieces[0], start,
                                            self._due(start)))
        if self._pending or self._flushing:
            return
        if self._source_done and self.stop_at_end:
            self._flushing = True
            self._submit("flush", None)
            return
        # Live and pushed audio come in small pieces: a short gap between them is not a pause to fill.
        paced = live or self.source is None
        quiet = not paced or self._last_arrival is None or \
            self.time.now() - self._last_arrival > JITTER_FRAMES / FPS
        if quiet and budget >= SAMPLES_PER_FRAME:
            n = budget // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME
            self._submit("push", AudioChunk(np.zeros(n, np.float32), self._fed, self._due(self._fed)))

    def _due(self, sample: int) -> float:
        """When the frame holding this sample is to be shown: the frame holding `_released` goes out at
        this slot, the ones after it a period apart."""
        return self.clock.slot_time + (sample // SAMPLES_PER_FRAME - self._released // SAMPLES_PER_FRAME) / FPS

    def _drop_late_live(self) -> None:
        """Bounded latency beats completeness for live audio: beyond a few frames waiting, its oldest goes."""
        excess = sum(len(x) for x, _, is_live in self._pending if is_live) - LIVE_SLACK_FRAMES * SAMPLES_PER_FRAME
        if excess <= 0:
            return
        kept = collections.deque()
        for x, t, is_live in self._pending:
            if is_live and excess > 0:
                cut = min(len(x), excess)
                excess -= cut
                self.metrics.dropped_samples += cut
                x = x[cut:]
                if not len(x):
                    continue
            kept.append((x, t, is_live))
        self._pending = kept

    def _take(self) -> bool:
        """Move one queued source chunk to pending; False when there is none."""
        if self._source_done or self._inq.empty():
            return False
        item = self._inq.get_nowait()
        if item is _END:
            self._source_done = True
            return False
        self._pending.append(item)
        self._last_arrival = item[1]
        return True

    def _submit(self, kind: str, chunk) -> None:
        if chunk is not None:
            self._fed += len(chunk.samples)
        self._sent += 1
        self._work.put((kind, self._gen, chunk))

    def _on_release(self, frame, t: float) -> None:
        m = self.metrics
        m.last_release = t
        if m.started is None:
            m.started = t
        if frame.meta.get("repeat"):
            return
        if frame.meta.get("captured_at") is not None:
            m.capture.append(t - frame.meta["captured_at"])
        self._released += len(frame.audio)
        if frame.produced_at and frame.pushed_at:
            m.engine.append(frame.produced_at - frame.pushed_at)
        start = self._released - len(frame.audio)
        while self._arrivals and self._arrivals[0][1] <= start:
            self._arrivals.popleft()
        arrived = None                               # arrival of the latest source chunk in this frame
        for first, _, t_in in self._arrivals:
            if first >= self._released:
                break
            arrived = t_in
        if arrived is not None:
            m.latencies.append(t - arrived)
            if m.first_out is None:
                m.first_out = t

    # ---- the worker thread and its hand-off to the loop ---------------------------------------------
    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is _STOP:
                return
            kind, gen, chunk = item
            frames = []
            try:
                if gen == self._gen:              # skip work queued before an interrupt
                    if kind == "push":
                        frames = self.animator.push(chunk)
                    elif kind == "flush":
                        frames = self.animator.flush()
                    else:
                        self.animator.reset()
            except BaseException as e:           # reported on the loop; the session then stops
                self._answer(self._fail, e)
                return
            if not self._answer(self._deliver, gen, frames, kind == "flush"):
                return

    def _answer(self, fn, *args) -> bool:
        """Hand a result to the loop; False when the loop has closed (the session gave up waiting)."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:
            return False

    def _deliver(self, gen: int, frames, last: bool) -> None:
        self._done += 1
        self._progress.set()
        if gen != self._gen:
            return
        self._out.extend(frames)
        if last:
            self._ended = True

    def _fail(self, e: BaseException) -> None:
        self._error = e
        self._done = self._sent
        self._progress.set()

    async def _settle(self) -> None:
        while self._done < self._sent and self._error is None:
            self._progress.clear()
            await self._progress.wait()

    async def _read(self, source) -> None:
        live = bool(getattr(source, "live", False))
        try:
            async for chunk in source:
                await self._inq.put((np.asarray(chunk.samples, np.float32), self.time.now(), live))
        except Exception as e:                    # a broken device or file ends the session with its error
            self._error = e
        await self._inq.put(_END)
