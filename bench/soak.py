"""Long live sessions: does anything drift, grow or stall?

    python bench/soak.py --real [--minutes 10] [--out bench/results/soak_real.json]
    python bench/soak.py [--hours 1] [--out bench/results/soak.json]

--real: the real streaming engine (tiny model dims, random weights: the whole pipeline, HuBERT, DDIM,
renderer, at a size this CPU runs in real time) in a real-time session with a WebRTC server for --minutes.
A scripted user alternates idle stretches, utterances pushed like a microphone, interrupts mid-utterance
and control changes; a WebSocket client connects, says something, changes the pose, sometimes drops its
connection without closing, and comes back; a WebRTC viewer joins and leaves. The engine's output carries
the test pattern in its silent stretches (streaming.testing.Marked: a white corner and a click at the same
pts), so A/V sync is measured where receivers see it: the mp4 as decoded, and a virtual camera (timestamping
backend) against a speaker on a sound-card double whose clock runs 0.1 % fast. Per minute: latency
p50/p95, the largest queue depths, skipped renders, RSS and the A/V offsets.

Without --real: one hour in simulated time (FakeTime, wake-ups jittered 0-5 ms, a 30 ms hiccup every
~10 s) with the cheap ToneAnimator made bursty (10-frame hops, an occasional late burst). A probe sink plays
a user: utterances of 1-6 s with 1-8 s pauses, one in ten interrupted half-way. Every simulated minute it
records the content pairing (the frame an audio sample was shown with), release lateness, in-flight
frames, queue depths, repeats and RSS.

Both write JSON and print a table.
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
from streaming.clock import FakeTime, RealTime  # noqa: E402
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


# ---- --real: the real engine in real time -------------------------------------------------------------
def tiny_models(control: str = "full_control"):
    """The real model code at configs/tiny.yaml's dims, random weights."""
    import torch
    import yaml
    from transformers import HubertConfig, HubertModel

    from avatar.pipeline import Models
    from models.frontend import HubertFrontend
    from models.stage1 import Stage1, Stage1Dims
    from models.stage2 import Stage2, Stage2Dims
    tiny = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").read_text())
    torch.manual_seed(0)
    return Models(Stage1(Stage1Dims(**tiny["stage1"])).eval(),
                  Stage2(Stage2Dims(audio="hubert", control=control, **tiny["stage2"])).eval(),
                  HubertFrontend(HubertModel(HubertConfig(**tiny["hubert"])).eval()), torch.device("cpu"))


def utterances(n: int = 6) -> list[np.ndarray]:
    import shutil
    import subprocess
    import tempfile

    from avatar.media import load_audio
    texts = ["Hello there, how are you today?", "The weather is lovely and the sun is out.",
             "Let me tell you a story about a lighthouse keeper.", "Numbers: one, two, three, four, five.",
             "Could you repeat that, please?", "We will meet again tomorrow at noon."]
    if shutil.which("espeak-ng") is None:
        from bench.offline import speech_like
        return [speech_like(2 + i % 4) for i in range(n)]
    out = []
    with tempfile.TemporaryDirectory() as d:
        for i, text in enumerate(texts[:n]):
            path = Path(d) / f"{i}.wav"
            subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
            out.append(load_audio(path))
    return out


class ClickLog:
    """SpeakerSink.log for a long run: the click onsets of what the device played (avsync.played_clicks'
    rule: a sample above 0.2 after 100 ms of quiet, at its block's DAC time), found as blocks arrive. A log
    of every block played grew the process by ~12 MB a minute, which the RSS column then counted."""

    def __init__(self, speaker):
        self.speaker, self.clicks, self.n, self.last = speaker, [], 0, None

    def append(self, entry):
        t, block = entry
        rate = self.speaker.rate
        loud = self.n + np.flatnonzero(np.abs(block) > 0.2)
        if len(loud):
            gaps = np.diff(loud, prepend=loud[0] - rate if self.last is None else self.last)
            self.clicks += [t + (i - self.n) / rate for i in loud[gaps > int(0.1 * rate)]]
            self.last = int(loud[-1])
        self.n += len(block)


class Minutes:
    """Per-minute figures from the released frames."""

    def __init__(self, session, t0):
        self.s, self.t0, self.rows = session, t0, []
        self._new()

    def _new(self):
        st = self.s.clock.stats
        self.lat, self.depth = [], {"input": 0, "worker": 0, "output": 0}
        self.held0, self.repeats0, self.errors0 = st.held, st.repeats, self.s.metrics.errors

    def released(self, frame, t, arrival):
        if arrival is not None and not frame.meta.get("repeat"):
            self.lat.append(t - arrival)
        for k, v in self.s.metrics.depth.items():
            self.depth[k] = max(self.depth[k], v)
        if t - self.t0 >= 60 * (len(self.rows) + 1):
            st = self.s.clock.stats
            pct = (lambda q: round(1000 * float(np.percentile(self.lat, q)), 1)) if self.lat else (lambda q: None)
            self.rows.append(dict(minute=len(self.rows) + 1, latency_p50_ms=pct(50), latency_p95_ms=pct(95),
                                  queue_depth_max=dict(self.depth), held=st.held - self.held0,
                                  repeats=st.repeats - self.repeats0, errors=self.s.metrics.errors - self.errors0,
                                  rss_mb=round(rss_mb(), 1)))
            self._new()


async def user(session, server, speech, rng, minutes: float, log: dict):
    """The scripted user: idle, speak (like a microphone), interrupt, change controls, and a WebSocket
    client and a WebRTC viewer that come and go."""
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.contrib.media import MediaBlackhole
    from websockets.asyncio.client import connect

    from avatar.pipeline import Controls
    end = time.monotonic() + 60 * minutes
    n = 0
    while time.monotonic() < end:
        n += 1
        await asyncio.sleep(float(rng.uniform(5, 20)))                 # idle: the markers come from here
        wave = speech[n % len(speech)]
        cut = len(wave) // 2 if rng.random() < 0.25 else len(wave)      # interrupted half-way
        for i in range(0, cut, 320):                                    # 20 ms at a time, in real time
            session.push(wave[i:i + 320], live=True, stream="mic")
            await asyncio.sleep(0.02)
        if cut < len(wave):
            session.interrupt()
            log["interrupts"] += 1
        if rng.random() < 0.5:
            pose = np.array(rng.uniform(-20, 20, 3), np.float32) / 90 if rng.random() < 0.7 else None
            session.set_controls(Controls(pose=pose))
            log["controls"] += 1
        if rng.random() < 0.4:                                          # a client comes, talks, leaves
            ws = await connect(f"ws://127.0.0.1:{server.port}/ws")
            await ws.recv()
            await ws.send(json.dumps({"op": "say", "text": "A client says hello."}))
            await ws.send(json.dumps({"op": "controls", "yaw": float(rng.uniform(-30, 30)), "pitch": 0, "roll": 0}))
            await asyncio.sleep(float(rng.uniform(1, 4)))
            if rng.random() < 0.5:
                ws.transport.abort()                                    # gone without a close frame
            else:
                await ws.close()
            log["clients"] += 1
        if rng.random() < 0.3:                                          # a WebRTC viewer joins and leaves
            pc, played = RTCPeerConnection(), MediaBlackhole()
            pc.on("track", played.addTrack)        # it plays what it gets, as a browser does: aiortc
            pc.addTransceiver("video", direction="recvonly")    # keeps every decoded frame nobody reads
            pc.addTransceiver("audio", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            _, answer = await server.sink.connect(pc.localDescription.sdp)
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            await played.start()
            await asyncio.sleep(float(rng.uniform(2, 6)))
            await pc.close()
            await played.stop()
            log["viewers"] += 1


async def soak_real(minutes: float, out_dir: Path, seed: int = 0):
    import pyvirtualcam

    from avatar.animator import StreamConfig, StreamingAnimator
    from avatar.pipeline import encode_portrait
    from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor
    from streaming.server import AvatarServer
    from streaming.sinks import FileSink, SpeakerSink, VirtualCamSink
    from streaming.testing import FakeOutputStream, Marked, is_flash
    from streaming.webrtc import WebRTCSink

    class StampedCam:
        flashes, before = [], False

        def __init__(self, *, width, height, **kw):
            self.shape = (height, width, 3)

        def send(self, frame):                     # flattened by pyvirtualcam; the corner is all we need
            flash = is_flash(frame.reshape(self.shape))
            if flash and not StampedCam.before:    # flash_times' rule as frames come: no per-frame record
                StampedCam.flashes.append(time.monotonic())
            StampedCam.before = flash

        def close(self): pass

        def device(self): return "stamped0"

        def native_fourcc(self): return None

    pyvirtualcam.register_backend("stamped", StampedCam)
    rng = np.random.default_rng(seed)
    models = tiny_models()
    code = encode_portrait(models, to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image))
    engine = Marked(StreamingAnimator(models, code, StreamConfig(hop=10, lookahead=5, steps=5)))
    clock = RealTime()
    device = FakeOutputStream(clock, skew=0.001)
    speaker = SpeakerSink(stream_factory=device, now=clock.now)
    speaker.log = ClickLog(speaker)
    cam = VirtualCamSink(backend="stamped")
    cam.sync_with = speaker
    mp4 = out_dir / "soak_real.mp4"
    webrtc = WebRTCSink()
    session = Session(engine, [FileSink(mp4), speaker, cam, webrtc], time_source=clock)
    log = {"interrupts": 0, "controls": 0, "clients": 0, "viewers": 0}
    minutes_log = Minutes(session, clock.now())
    base = session.metrics.released
    session.metrics.released = lambda f, t, a: (base(f, t, a), minutes_log.released(f, t, a))

    wall = time.perf_counter()
    speech = utterances()
    rss0 = rss_mb()
    async with session:
        async with AvatarServer(session, webrtc, port=0) as server:
            await user(session, server, speech, rng, minutes, log)
        summary = session.summary()
    await webrtc.aclose()
    rss_growth = round(rss_mb() - rss0, 1)
    from streaming import avsync
    file_offsets = avsync.mp4_offsets(mp4)
    dev = avsync.av_offsets(StampedCam.flashes, speaker.log.clicks)
    return dict(minutes=minutes, wall_s=round(time.perf_counter() - wall, 1), rows=minutes_log.rows,
                summary=summary, events=log, rss_growth_mb=rss_growth,
                av_file=avsync.summary(file_offsets), av_vcam_speaker=avsync.summary(dev[1:]),
                speaker=dict(resyncs=speaker.resyncs, underruns=speaker.underruns,
                             overflow_samples=speaker.overflow_samples, delay_frames=speaker.delay_frames),
                skipped_renders=engine.skipped)


def main_real(args) -> None:
    out = Path(args.out or Path(__file__).parent / "results" / "soak_real.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    r = asyncio.run(soak_real(args.minutes, out.parent))
    out.write_text(json.dumps(r, indent=1, default=float))
    print(f"{'min':>4} {'p50 ms':>7} {'p95 ms':>7} {'held':>5} {'repeats':>7} {'errors':>6} {'RSS MB':>7}  queue depth max")
    for row in r["rows"]:
        print(f"{row['minute']:>4} {row['latency_p50_ms'] or 0:>7.0f} {row['latency_p95_ms'] or 0:>7.0f} "
              f"{row['held']:>5} {row['repeats']:>7} {row['errors']:>6} {row['rss_mb']:>7.1f}  {row['queue_depth_max']}")
    print(f"{r['minutes']:g} min in {r['wall_s']:.0f} s; events {r['events']}; A/V at the mp4 {r['av_file']}, at "
          f"vcam+speaker (device clock +0.1 %) {r['av_vcam_speaker']}; RSS growth {r['rss_growth_mb']} MB; "
          f"skipped renders {r['skipped_renders']}; speaker {r['speaker']} -> {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hours", type=float, default=1.0, help="simulated run (default %(default)s)")
    ap.add_argument("--real", action="store_true", help="the real engine (tiny dims) in real time")
    ap.add_argument("--minutes", type=float, default=10.0, help="--real run length (default %(default)s)")
    ap.add_argument("--out", help="JSON (default bench/results/soak.json, soak_real.json with --real)")
    args = ap.parse_args(argv)
    if args.real:
        return main_real(args)
    args.out = args.out or str(Path(__file__).parent / "results" / "soak.json")
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
