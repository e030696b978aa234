"""Face reenactment speed at full model size with generated (random) weights.

    python bench/reenact.py [--seconds 10] [--device cpu] [--precision fp32] [--compile] [--json bench/results/reenact.json]

Two measurements:
1. compute: a Reenactor over 640x480 driving frames (the astronaut's head moving on a canvas), a new
   driving frame for every output frame, as fast as it goes: ms per frame for track (face detection and
   crop), motion (stage-1 encoder) and render, and the frame rate that allows.
2. realtime: a capture thread puts such frames into a LatestFrame at 30 fps; the Reenactor is fed 640
   samples of silence per 40 ms tick by the realtime Session (streaming/session.py; `--loop direct`: a
   plain loop that pushes on the tick and takes each frame as it is made); a sink records release time -
   meta["captured_at"] (capture to sink latency), the output fps and how many distinct driving frames
   per second reached the sink. `--compare-sampling` runs it twice, sampling the camera as late as the
   render allows (the default: AudioChunk.due) and as soon as the session feeds the frame, one slot
   ahead; `--tiny` uses the tiny test dims, an engine as fast as a GPU's, where the difference shows.
Writes JSON and prints a table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from skimage.data import astronaut

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avatar.pipeline import Models, Speed, encode_portrait, pick_device  # noqa: E402
from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor  # noqa: E402
from avatar.reenact import LatestFrame, ReenactConfig, Reenactor, TimedFrames  # noqa: E402
from avatar.timebase import FPS, SAMPLES_PER_FRAME, AudioChunk  # noqa: E402
from models.stage1 import Stage1, Stage1Dims  # noqa: E402

HEAD = astronaut()[0:300, 60:360]
CAPTURE_FPS = 30


def driving_frame(t: float) -> np.ndarray:
    """640x480 frame at time t: the head circles slowly, as a person in front of a webcam moves."""
    img = np.full((480, 640, 3), 90, np.uint8)
    x, y = round(170 + 80 * np.cos(0.8 * t)), round(90 + 40 * np.sin(1.1 * t))
    img[y:y + 300, x:x + 300] = HEAD
    return img


def compute(models, code, config, frames: int) -> dict:
    """Every output frame gets a new driving frame; per-stage ms per frame."""
    r = Reenactor(models, code, TimedFrames((i / FPS, driving_frame(i / FPS)) for i in range(frames + 3)), config)
    r.push(AudioChunk(np.zeros(3 * SAMPLES_PER_FRAME, np.float32)))          # warm-up
    r.timings = {k: 0.0 for k in r.timings}
    t0 = time.perf_counter()
    out = r.push(AudioChunk(np.zeros(frames * SAMPLES_PER_FRAME, np.float32)))
    wall = time.perf_counter() - t0
    ms = {f"{k}_ms": 1000 * v / len(out) for k, v in r.timings.items()}
    return dict(frames=len(out), **ms, total_ms=1000 * wall / len(out), max_fps=len(out) / wall,
                detections=r.stats["detections"])


class Recorder:
    """Sink: capture -> release latency of each engine frame, and the driving frames that got through."""

    def __init__(self):
        self.latency, self.frames, self.repeats, self.shown = [], 0, 0, set()
        self.first = self.last = None

    async def open(self, spec): pass

    async def write(self, frame):
        self.take(frame, time.monotonic())

    def take(self, frame, now: float) -> None:
        self.first = self.first if self.first is not None else now
        self.last, self.frames = now, self.frames + 1
        captured = frame.meta.get("captured_at")
        if frame.meta.get("repeat"):
            self.repeats += 1
        elif captured is not None:
            self.latency.append(now - captured)
            self.shown.add(captured)

    async def aclose(self): pass


def capture(slot: LatestFrame, stop: threading.Event) -> None:
    t0 = time.monotonic()
    k = 0
    while not stop.is_set():
        due = t0 + k / CAPTURE_FPS
        time.sleep(max(0.0, due - time.monotonic()))
        slot.put(driving_frame(time.monotonic() - t0))                      # t = now, as a webcam thread
        k += 1


async def session_loop(animator, seconds: float, sink: Recorder) -> None:
    from streaming.reenact import LEAD_FRAMES, MAX_LEAD_FRAMES
    from streaming.session import Session
    async with Session(animator, [sink], lead_frames=LEAD_FRAMES, max_lead_frames=MAX_LEAD_FRAMES):
        await asyncio.sleep(seconds)


def direct_loop(animator, seconds: float, sink: Recorder) -> None:
    t0 = time.monotonic()
    k = 0
    while time.monotonic() - t0 < seconds:
        time.sleep(max(0.0, t0 + k / FPS - time.monotonic()))
        for f in animator.push(AudioChunk(np.zeros(SAMPLES_PER_FRAME, np.float32))):
            sink.take(f, time.monotonic())
        k += 1


def realtime(models, code, config, seconds: float, loop: str, late: bool = True) -> dict:
    slot, stop = LatestFrame(), threading.Event()
    animator = Reenactor(models, code, slot, config)
    if not late:                        # drop the due times: each frame samples the camera when it is fed
        push = animator.push
        animator.push = lambda chunk: push(AudioChunk(chunk.samples, chunk.pts))
    animator.motion(driving_frame(0.0), 0.0)                                 # warm-up outside the clock
    animator.timings = {k: 0.0 for k in animator.timings}
    sink = Recorder()
    thread = threading.Thread(target=capture, args=(slot, stop), daemon=True)
    thread.start()
    try:
        if loop == "session":
            asyncio.run(session_loop(animator, seconds, sink))
        else:
            direct_loop(animator, seconds, sink)
    finally:
        stop.set()
        thread.join()
    span = (sink.last - sink.first) if sink.frames > 1 else 0.0
    pct = lambda q: 1000 * float(np.percentile(sink.latency, q)) if sink.latency else None  # noqa: E731
    return dict(loop=loop, late_sampling=late, seconds=seconds, output_frames=sink.frames, repeats=sink.repeats,
                output_fps=(sink.frames - 1) / span if span else None,
                driving_fps_shown=len(sink.shown) / span if span else None,
                latency_p50_ms=pct(50), latency_p95_ms=pct(95),
                captured=slot.captured, stale=slot.stale, stats=animator.stats,
                timings_s={k: round(v, 3) for k, v in animator.timings.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="length of the realtime run")
    p.add_argument("--frames", type=int, default=0, help="frames for the compute run (default: 25 on a GPU, 8 on a CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the motion encoder and the renderer")
    p.add_argument("--fast", action="store_true", help="the fastest mode on this machine (Speed.fastest(): bf16 + "
                   "compile where bf16 is native, else fp32; upsampling timed both ways)")
    p.add_argument("--mode", default="absolute", choices=["absolute", "relative"])
    p.add_argument("--loop", default="session", choices=["session", "direct"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-track", action="store_true", help="whole driving frames, no face detection")
    p.add_argument("--tiny", action="store_true", help="the tiny test dims (configs/tiny.yaml) instead of full size")
    p.add_argument("--compare-sampling", action="store_true", help="realtime run with late and with early "
                   "camera sampling")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "reenact.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = pick_device(args.device)
    torch.manual_seed(0)
    dims = Stage1Dims(**yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["stage1"]) if args.tiny \
        else Stage1Dims()
    speed = Speed.fastest() if args.fast else Speed(precision=args.precision, compile=args.compile)
    models = Models(Stage1(dims).eval().to(dev), None, None, dev, speed)
    args.precision, args.compile = models.speed.precision, models.speed.compile
    code = encode_portrait(models, to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image))
    config = ReenactConfig(mode=args.mode, crop=not args.no_track)
    frames = args.frames or (25 if dev.type == "cuda" else 8)
    comp = compute(models, code, config, frames)
    runs = [realtime(models, code, config, args.seconds, args.loop, late)
            for late in ((True, False) if args.compare_sampling else (True,))]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {args.threads} threads"
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(dict(bench="reenact", device=name, precision=args.precision, compile=args.compile,
                                               mode=args.mode, torch=torch.__version__, compute=comp,
                                               tiny=args.tiny, realtime=runs), indent=2))
    print(f"reenactment, {'tiny' if args.tiny else 'full-size'} random weights, {name}, {models.describe()}, "
          f"{args.mode}")
    print(f"compute ({comp['frames']} frames, new driving frame each): track {comp['track_ms']:.1f} ms, "
          f"motion {comp['motion_ms']:.1f} ms, render {comp['render_ms']:.1f} ms, total {comp['total_ms']:.1f} ms "
          f"per frame -> {comp['max_fps']:.1f} fps")
    fmt = lambda v, f=".1f": "-" if v is None else format(v, f)  # noqa: E731
    for rt in runs:
        print(f"realtime ({args.loop}, {'late' if rt['late_sampling'] else 'early'} sampling, {args.seconds:g} s, "
              f"capture {CAPTURE_FPS} fps): output {fmt(rt['output_fps'])} fps ({rt['repeats']} repeated slots), "
              f"driving frames shown {fmt(rt['driving_fps_shown'])} /s, capture->sink p50 "
              f"{fmt(rt['latency_p50_ms'], '.0f')} ms, p95 {fmt(rt['latency_p95_ms'], '.0f')} ms, "
              f"{rt['stale']} of {rt['captured']} captured frames dropped")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
