"""What one session measured, as an observer of the frames the clock releases and of the session's events.

Times are in the session's time source. Latency is per frame that holds source audio: the time its newest
source sample arrived -> the time the frame was released. A/V sync is not computed here: the clock hands
each frame's picture and its own audio to every sink together, so the offset that matters is the one a
receiver sees (bench/avsync.py measures it at each sink's output).
"""
from __future__ import annotations

import collections

import numpy as np

from avatar.timebase import FPS, SAMPLE_RATE


class Metrics:
    def __init__(self):
        self.first_in = None             # arrival of the first source sample
        self.first_out = None            # release of the frame that holds it
        self.latencies = collections.deque(maxlen=5000)   # source sample in -> its frame out, seconds
        self.capture = collections.deque(maxlen=5000)     # driving video frame captured -> shown (reenactment)
        self.engine = collections.deque(maxlen=5000)      # AvFrame.produced_at - pushed_at
        self.interrupts = 0
        self.preempted = 0               # idle silence in flight dropped for speech
        self.errors = 0                  # items the engine failed on (reported, the session went on)
        self.last_error = None
        self.bad_frames = 0              # frames refused: audio of the wrong length
        self.depth_max = {"input": 0, "worker": 0, "output": 0}
        self.depth = dict(self.depth_max)
        self.started = None              # first release
        self.last_release = None

    def released(self, frame, t: float, arrival: float | None) -> None:
        """The clock released `frame` at t; arrival: when its newest source audio arrived (None: none)."""
        self.last_release = t
        if self.started is None:
            self.started = t
        if frame.meta.get("repeat"):
            return
        if frame.meta.get("captured_at") is not None:
            self.capture.append(t - frame.meta["captured_at"])
        if frame.produced_at and frame.pushed_at:
            self.engine.append(frame.produced_at - frame.pushed_at)
        if arrival is not None:
            self.latencies.append(t - arrival)
            if self.first_out is None:
                self.first_out = t

    def queues(self, **depths) -> None:
        self.depth.update(depths)
        for key, v in depths.items():
            self.depth_max[key] = max(self.depth_max[key], v)

    def error(self, e: BaseException) -> None:
        self.errors += 1
        self.last_error = str(e) or type(e).__name__

    def summary(self, clock, dropped_samples: int = 0) -> dict:
        st = clock.stats
        span = (self.last_release - self.started) if self.started is not None and self.last_release else 0
        pct = lambda xs, q: round(1000 * float(np.percentile(xs, q)), 1) if xs else None  # noqa: E731
        first = None if self.first_out is None else round(1000 * (self.first_out - self.first_in), 1)
        out = {"frames": st.frames, "repeats": st.repeats, "held": st.held,
               "fps": round((st.frames - 1) / span, 2) if span else None,
               "drawn_fps": round((st.frames - st.repeats - st.held - 1) / span, 2) if span else None,
               "first_audio_to_frame_ms": first, "latency_p50_ms": pct(self.latencies, 50),
               "latency_p95_ms": pct(self.latencies, 95), "engine_p50_ms": pct(self.engine, 50),
               # how long a picture stays on screen (p95, longest): one slot (40 ms) at the full frame rate
               "picture_p95_ms": round(1000 / FPS * float(np.percentile(st.shown_for, 95)), 1) if st.shown_for else None,
               "picture_max_ms": round(1000 / FPS * max(st.shown_for), 1) if st.shown_for else None,
               "late_max_ms": round(1000 * st.late_max_s, 1), "slips": st.slips,
               "interrupts": self.interrupts, "preempted": self.preempted, "errors": self.errors, "bad_frames": self.bad_frames,
               "dropped_input_ms": round(1000 * dropped_samples / SAMPLE_RATE, 1),
               "queue_depth": dict(self.depth), "queue_depth_max": dict(self.depth_max)}
        if self.last_error:
            out["last_error"] = self.last_error
        if self.capture:
            out.update(capture_latency_p50_ms=pct(self.capture, 50), capture_latency_p95_ms=pct(self.capture, 95))
        return out

    def line(self, clock, dropped_samples: int = 0) -> str:
        s = self.summary(clock, dropped_samples)
        return (f"{s['frames']} frames, {s['fps']} fps ({s['drawn_fps']} drawn), {s['repeats']} repeated, "
                f"{s['held']} held, latency p50/p95 {s['latency_p50_ms']}/{s['latency_p95_ms']} ms, "
                f"errors {s['errors']}, queues {s['queue_depth']}")
