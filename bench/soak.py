"""One hour of a live session in simulated time: does anything drift or grow?

    python bench/soak.py [--hours 1] [--out bench/results/soak.json]

A Session runs on FakeTime (wake-ups jittered 0-5 ms, a 30 ms hiccup every ~10 s) with the cheap
ToneAnimator made bursty (10-frame hops, an occasional late burst). A probe sink plays a user: it pushes
utterances of 1-6 s with 1-8 s pauses and interrupts one in ten half-way. Every simulated minute it records
the content pairing (the frame an audio sample was
shown with), release lateness, in-flight frames, queue depths, repeats and RSS. Goal: offset within 20 ms
at every point and no growth. Writes JSON and prints a table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avatar.timebase import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: E402
from streaming.clock import FakeTime  # noqa: E402
from streaming.session import Session  # noqa: E402
from streaming.testing import ToneAnimator, decode_pts  # noqa: E402

MOD = 1 << 22              # speech sample n carries (n mod MOD + 1) / 2^23: exact in float32


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


class BurstyAnimator(ToneAnimator):
    """Frames come out in hops of `hop` (like a windowed model); now and then one hop is 3 frames late."""

    def __init__(self, rng, hop=10):
        super().__init__(size=32, hop=hop, latency_frames=hop)
        self.rng = rng

    def push(self, chunk):
        self.hop = self.latency_frames + (3 if self.rng.random() < 0.01 else 0)
        return super().push(chunk)


class Probe:
    """The simulated user and the measurements, called at every released frame."""

    def __init__(self, session, t, rng, minutes):
        self.s, self.t, self.rng, self.minutes = session, t, rng, minutes
        self.rows, self.next_push, self.interrupt_at, self.spoken = [], 2.0, None, 0
        self.pair_err_max, self.utt_offset, self.t0, self.utt = 0.0, 0, 0.0, None
        self._reset_window()

    def _reset_window(self):
        self.w_late = self.w_pair = 0.0
        self.w_inflight = 0
        self.w_repeats0 = self.s.clock.stats.repeats

    async def open(self, spec):
        self.t0 = self.t.now()
        self._reset_window()

    async def write(self, f):
        now = self.t.now() - self.t0
        k = f.pts
        self.w_late = max(self.w_late, now - k / FPS)
        self.w_inflight = max(self.w_inflight, self.s.feed.in_flight // SAMPLES_PER_FRAME)
        if not f.meta.get("repeat") and f.audio[0] > 0:       # speech: is it shown with its own image?
            sample = round(f.audio[0] * 2 ** 23) - 1
            err = ((decode_pts(f.image) * SAMPLES_PER_FRAME - sample - self.utt_offset) % MOD)
            err = min(err, MOD - err) / SAMPLE_RATE
            self.w_pair = max(self.w_pair, err)
        if self.interrupt_at is not None and now >= self.interrupt_at:
            self.s.interrupt()
            self.interrupt_at = self.utt = None
        if self.utt is None and now >= self.next_push:
            self._speak(now)
        if self.utt is not None:              # streamed like a microphone or a socket: 40 ms per slot
            if self.utt_pos == 0:             # where the engine will number this utterance's first sample
                feed = self.s.feed
                queued = sum(len(p.samples) for p in list(feed.pending) + list(feed.inq._queue))
                self.utt_offset = feed.fed + queued - self.spoken
            self.s.push(self.utt[self.utt_pos:self.utt_pos + SAMPLES_PER_FRAME])
            self.utt_pos += SAMPLES_PER_FRAME
            if self.utt_pos >= len(self.utt):
                self.spoken += len(self.utt)
                self.utt = None
        if now >= 60 * (len(self.rows) + 1):
            st = self.s.clock.stats
            self.rows.append(dict(minute=len(self.rows) + 1,
                                  pairing_err_ms=1000 * self.w_pair, late_max_ms=1000 * self.w_late,
                                  inflight_max=self.w_inflight, repeats=st.repeats - self.w_repeats0,
                                  queues=dict(self.s.metrics.depth), rss_mb=round(rss_mb(), 1),
                                  latency_p95_ms=self.s.summary()["latency_p95_ms"]))
            self.pair_err_max = max(self.pair_err_max, self.w_pair)
            self._reset_window()
            if len(self.rows) >= self.minutes:
                self.s.stop()

    def _speak(self, now):
        n = int(self.rng.uniform(1, 6) * SAMPLE_RATE)
        self.utt = ((self.spoken + np.arange(n)) % MOD + 1).astype(np.float32) / 2 ** 23
        self.utt_pos = 0
        self.next_push = now + n / SAMPLE_RATE + self.rng.uniform(1, 8)
        if self.rng.random() < 0.1:
            self.interrupt_at = now + n / SAMPLE_RATE / 2

    async def aclose(self):
        pass


async def soak(minutes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    jitter = lambda: float(rng.uniform(0, 0.005) + (0.03 if rng.random() < 0.004 else 0))  # noqa: E731
    t = FakeTime(jitter=jitter)
    session = Session(BurstyAnimator(rng), time_source=t)
    probe = Probe(session, t, rng, minutes)
    session.clock.sinks.append(probe)
    wall = time.perf_counter()
    summary = await session.run()
    return probe.rows, summary, time.perf_counter() - wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak.json"))
    args = ap.parse_args(argv)
    rows, summary, wall = asyncio.run(soak(max(1, round(args.hours * 60))))
    last = rows[-1]
    result = dict(simulated_minutes=len(rows), wall_seconds=round(wall, 1), rows=rows, summary=summary,
                  pairing_err_max_ms=max(r["pairing_err_ms"] for r in rows),
                  late_max_ms=max(r["late_max_ms"] for r in rows),
                  inflight_max=max(r["inflight_max"] for r in rows),
                  rss_growth_mb=round(last["rss_mb"] - rows[min(4, len(rows) - 1)]["rss_mb"], 1))
    result["goal_met"] = result["pairing_err_max_ms"] <= 20 and \
        result["late_max_ms"] <= 40 and result["rss_growth_mb"] < 20
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'min':>4} {'pair ms':>7} {'late ms':>7} {'inflight':>8} {'repeats':>7} "
          f"{'p95 ms':>7} {'RSS MB':>7}  queues")
    for r in rows[:3] + rows[3:-3:max(1, len(rows) // 10)] + rows[-3:] if len(rows) > 6 else rows:
        print(f"{r['minute']:>4} {r['pairing_err_ms']:>7.2f} {r['late_max_ms']:>7.1f} "
              f"{r['inflight_max']:>8} {r['repeats']:>7} {r['latency_p95_ms'] or 0:>7.0f} {r['rss_mb']:>7.1f}  "
              f"{r['queues']}")
    print(f"{len(rows)} simulated minutes in {wall:.0f} s; pairing "
          f"{result['pairing_err_max_ms']:.2f} ms, lateness {result['late_max_ms']:.1f} ms, RSS growth "
          f"{result['rss_growth_mb']} MB, repeats {summary['repeats']}, interrupts {summary['interrupts']}: "
          f"goal {'met' if result['goal_met'] else 'NOT met'} -> {args.out}")


if __name__ == "__main__":
    main()
