"""A/V sync at each sink's output, as its receiver sees it, through the real loop.

    python bench/avsync.py [--seconds 30] [--hours 1] [--only file|devices|drift|webrtc] [--out ...]

The test pattern (streaming.testing.SyncAnimator: a flash and a 5 ms click at the same pts, once a second)
runs in a real-time session into each sink, and streaming/avsync.py finds both again where a receiver sees
them:
- file: the mp4 decoded with PyAV;
- vcam+speaker (JACK): pyvirtualcam's real Camera over a timestamping test backend, against the samples
  PortAudio reports playing (outputBufferDacTime) on a JACK dummy server (started here if jackd exists);
- vcam+speaker, simulated: --hours of virtual time with a sound card whose clock runs 0.1 % fast, then
  0.1 % slow (FakeOutputStream): does the speaker's drift correction hold the two together?
- webrtc: headless Chromium renders the stream; the page finds flashes (requestVideoFrameCallback display
  times) and clicks when the video element's audio renderer plays them (the audio receiver's
  synchronization sources + the renderer's playout delay, +-5 ms; streaming/static/app.js), and reports
  the raw WebAudio figure (a worklet on the received track, mapped to the output clock: it also counts
  WebAudio's capture path and output latency) and Chrome's own view (estimatedPlayoutTimestamp, audio minus
  video) beside it. Chrome's receiver moves the two together over its first seconds, so the figures are
  taken over the last third of the run.
Offsets are click minus flash (positive: sound late). Writes JSON and prints a table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming import avsync  # noqa: E402
from streaming.clock import FakeTime, RealTime  # noqa: E402
from streaming.session import Session  # noqa: E402
from streaming.sinks import FileSink, SpeakerSink, VirtualCamSink  # noqa: E402
from streaming.testing import FakeOutputStream, SyncAnimator, chromium  # noqa: E402


class StampedCam:
    """pyvirtualcam backend: records (time on `clock`, frame) of every frame the real Camera sends it."""
    clock, sent = time.monotonic, []

    def __init__(self, *, width, height, **kw):
        StampedCam.sent, self.shape = [], (height, width, 3)

    def send(self, frame):                           # pyvirtualcam hands over the pixels flattened
        StampedCam.sent.append((StampedCam.clock(), frame.reshape(self.shape).copy()))

    def close(self):
        pass

    def device(self):
        return "stamped0"

    def native_fourcc(self):
        return None


async def run_for(session: Session, seconds: float) -> dict:
    async def stop():
        frames = session.frames()
        while session.time.now() < start + seconds:
            await frames.__anext__()
        await frames.aclose()
        session.stop()
    start = session.time.now()
    asyncio.get_running_loop().create_task(stop())
    return await session.run()


def file_case(seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sync.mp4"
        asyncio.run(run_for(Session(SyncAnimator(size=128), [FileSink(out)]), seconds))
        return avsync.summary(avsync.mp4_offsets(out))


def devices_case(clock, stream_factory, seconds: float) -> tuple[dict, SpeakerSink]:
    import pyvirtualcam
    pyvirtualcam.register_backend("stamped", StampedCam)
    StampedCam.clock = clock.now
    speaker = SpeakerSink(stream_factory=stream_factory, now=clock.now, latency=0.02)
    speaker.log = []
    cam = VirtualCamSink(backend="stamped")
    cam.sync_with = speaker
    asyncio.run(run_for(Session(SyncAnimator(size=32), [speaker, cam], time_source=clock), seconds))
    offsets = avsync.device_offsets(StampedCam.sent, speaker.log, speaker.rate)[1:]   # after the start
    speaker.log = None
    return avsync.summary(offsets), speaker


def jack_case(seconds: float) -> dict:
    if shutil.which("jackd") is None:
        return {"skipped": "jackd not installed"}
    proc = subprocess.Popen(["jackd", "--no-realtime", "-d", "dummy", "-r", "48000", "-p", "960"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        # PortAudio lists devices once, at import: a fresh interpreter sees the server just started
        code = ("import json, sys; sys.path.insert(0, 'bench'); import avsync as b\n"
                "from streaming.clock import RealTime\n"
                f"s, sp = b.devices_case(RealTime(), None, {seconds})\n"
                "print(json.dumps(dict(s, hold_frames=sp.delay_frames, device_latency_ms=round(1000 * sp.device_latency, 1),"
                " resyncs=sp.resyncs, underruns=sp.underruns)))\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds + 120,
                           cwd=Path(__file__).resolve().parents[1])
        if r.returncode:
            return {"error": r.stderr.strip().splitlines()[-1]}
        return json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        proc.terminate()
        proc.wait(10)


def drift_case(hours: float, skew: float) -> dict:
    clock = FakeTime()
    wall = time.perf_counter()
    s, sp = devices_case(clock, FakeOutputStream(clock, skew=skew), hours * 3600)
    return dict(s, skew=skew, buffer_ms=round(1000 * sp.buffered_s, 1), resyncs=sp.resyncs,
                underruns=sp.underruns, overflow_samples=sp.overflow_samples,
                wall_s=round(time.perf_counter() - wall, 1))


def webrtc_case(seconds: float) -> dict:
    if shutil.which("chromium") is None:
        return {"skipped": "chromium not installed"}
    from streaming.server import AvatarServer
    from streaming.webrtc import WebRTCSink
    report, playout = {}, []

    async def main():
        sink = WebRTCSink()
        async with Session(SyncAnimator(size=128), [sink], time_source=RealTime()) as session:
            async with AvatarServer(session, sink, port=0) as server:
                with tempfile.TemporaryDirectory() as profile, \
                        chromium(f"http://127.0.0.1:{server.port}/?avsync=1", profile):
                    t0 = time.monotonic()
                    while time.monotonic() - t0 < seconds:
                        await asyncio.sleep(1)
                        stats = next((c.stats for c in server.clients if c.stats), {})
                        report.update(stats.get("avsync") or {})
                        if stats.get("playout_audio") and stats.get("playout_video"):
                            playout.append((time.monotonic() - t0, stats["playout_audio"] - stats["playout_video"]))
            await sink.aclose()

    asyncio.run(main())
    flashes = report.get("flashes", [])
    if not flashes:
        return {"error": "the page saw no flash", "page": report}

    def third(keep, clicks):
        return avsync.summary(avsync.page_offsets(
            {"flashes": [t for t in flashes if keep(t - flashes[0])], clicks: report.get(clicks, [])}, clicks))
    late = lambda t: t >= 2000 * seconds / 3          # noqa: E731
    chrome = [d for t, d in playout if t >= 2 * seconds / 3]
    return dict(third(late, "heard"), raw_webaudio=third(late, "clicks"),
                first_third=third(lambda t: t < 1000 * seconds / 3, "heard"),
                chrome_playout_audio_minus_video_ms=round(float(np.median(chrome)), 1) if chrome else None,
                renderer_delay_ms=report.get("playoutDelayMs"), page_offset_ms=report.get("offsetMs"),
                first_seen_after_pull_ms=report.get("firstSeenMs"), page=report)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="real-time runs (default %(default)s)")
    ap.add_argument("--hours", type=float, default=1.0, help="simulated device-clock run (default %(default)s)")
    ap.add_argument("--only", choices=("file", "devices", "drift", "webrtc"), help="run one case")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "avsync.json"))
    args = ap.parse_args(argv)
    want = lambda case: args.only in (None, case)          # noqa: E731
    rows = {}
    if want("file"):
        rows["file"] = file_case(args.seconds)
    if want("devices"):
        rows["vcam+speaker (JACK dummy)"] = jack_case(args.seconds)
    if want("drift"):
        for skew in (0.001, -0.001):
            rows[f"vcam+speaker, simulated {args.hours:g} h, device clock {skew:+.1%}"] = drift_case(args.hours, skew)
    if want("webrtc"):
        rows["webrtc (headless Chromium), as heard"] = webrtc_case(args.seconds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"{'sink':<52} {'flashes':>7} {'median ms':>9} {'max |ms|':>8}  notes")
    for name, r in rows.items():
        notes = {k: v for k, v in r.items() if k not in ("n", "median_ms", "max_abs_ms", "page")}
        print(f"{name:<52} {r.get('n', '-'):>7} {str(r.get('median_ms')):>9} {str(r.get('max_abs_ms')):>8}  {notes}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
