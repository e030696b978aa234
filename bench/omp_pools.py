"""The live engine on its own thread, with the loading thread's idle OpenMP workers kept or released.

    python bench/omp_pools.py [--seconds 20] [--rounds 2] [--threads 2] [--checkpoints DIR]

As in `anitalker live --fast`: the models are built, compiled and measured on the main thread (which leaves
it a pool of OpenMP workers), then a worker thread runs the streaming engine while speech arrives at real
time, a frame's worth every 40 ms, each chunk due a lead later (22 frames, where live settles); the engine
draws the frames it can still show on time. "kept": the main thread's pool stays (as before
avatar/openmp.py); "released": the main thread calls release_openmp_threads() first, as Session.run does.
Each run is a fresh process (the pools are per process), the two alternate round by round. Full-size
random weights unless --checkpoints. Reports drawn frames/s, the engine's render ms/frame and features+motion ms/hop, and
context switches/s of the process; writes bench/results/omp_pools.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("kept", "released")


def switches() -> int:
    """Context switches of every thread of this process so far."""
    total = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/status") as f:
                total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except OSError:                      # the thread ended meanwhile
            pass
    return total


def child(args) -> dict:
    import torch

    from avatar.animator import StreamConfig, StreamingAnimator
    from avatar.openmp import release_openmp_threads
    from avatar.pipeline import Speed, encode_portrait, load_models
    from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor
    from avatar.probe import measure_rate
    from avatar.timebase import FPS, SAMPLES_PER_FRAME, AudioChunk
    from bench.offline import build, with_speed
    from bench.stream import speech
    from streaming.feed import JITTER_FRAMES

    torch.set_num_threads(args.threads)
    models = (load_models(args.checkpoints, device="cpu", speed=Speed.fastest()) if args.checkpoints
              else with_speed(build(Speed()), Speed.fastest()))      # bf16 weights, as load_models prepares
    code = encode_portrait(models, to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image))
    config = StreamConfig(hubert="incremental")
    rate = measure_rate(models, code, hubert="incremental")          # compiles, as live's start-up line does
    animator = StreamingAnimator(models, code, config)
    wave = speech(args.seconds)
    costs = {"render": [], "hop": []}
    settle = animator._settle

    def timed_settle(drawn):                 # the engine's own stage costs, as it plans with them
        before = dict(animator.timings)
        settle(drawn)
        spent = {k: animator.timings[k] - before[k] for k in before}
        if drawn:
            costs["render"].append(spent["render"] / drawn)
        if spent["motion"]:
            costs["hop"].append(spent["motion"] + spent["features"])

    animator._settle = timed_settle
    if args.variant == "released":
        release_openmp_threads()
    # the lead a live session settles at here (its feed lends frames while the engine misses slots; the
    # full-size fast engine ran 22 frames ahead): the default latency + jitter leaves it no frame in time
    lead = animator.latency_frames + JITTER_FRAMES + 3
    counts = {"drawn": 0, "frames": 0}

    def stream():
        torch.set_num_threads(args.threads)
        t0 = time.monotonic() + 0.2
        for i in range(0, len(wave) - SAMPLES_PER_FRAME + 1, SAMPLES_PER_FRAME):
            arrive = t0 + i / SAMPLES_PER_FRAME / FPS
            time.sleep(max(0.0, arrive - time.monotonic()))
            for frame in animator.push(AudioChunk(wave[i:i + SAMPLES_PER_FRAME], i, arrive + lead / FPS)):
                counts["frames"] += 1
                counts["drawn"] += frame.image is not None

    s0, w0 = switches(), time.monotonic()
    worker = threading.Thread(target=stream, name="animator")
    worker.start()
    worker.join()
    s1, w1 = switches(), time.monotonic()
    render, hop = np.array(costs["render"][3:]), np.array(costs["hop"][2:])   # past the warm-up
    return {"variant": args.variant, "drawn_fps": FPS * counts["drawn"] / max(1, counts["frames"]),
            "render_ms": 1000 * float(np.median(render)), "hop_ms": 1000 * float(np.median(hop)),
            "switches_per_s": (s1 - s0) / (w1 - w0), "probe": rate.line(), "load": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoints", default=None, help="real checkpoints (default: full-size random weights)")
    p.add_argument("--child", dest="variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "omp_pools.json"))
    args = p.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    runs = []
    for r in range(args.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--child", variant, "--seconds", str(args.seconds),
                   "--threads", str(args.threads)] + (["--checkpoints", args.checkpoints] if args.checkpoints else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"error: the {variant} run failed: {out.stderr.strip().splitlines()[-1:]}")
            runs.append(json.loads(line[7:]) | {"round": r})
            print(f"round {r + 1}/{args.rounds} {variant}: {runs[-1]['drawn_fps']:.2f} frames/s drawn",
                  file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print("| loop thread's OpenMP pool | drawn frames/s | render ms/frame | features+motion ms/hop | "
          "context switches/s | runs |")
    print("|---|---|---|---|---|---|")
    for variant in VARIANTS:
        rs = [r for r in runs if r["variant"] == variant]
        med = lambda k: float(np.median([r[k] for r in rs]))       # noqa: E731
        print(f"| {variant} | {med('drawn_fps'):.2f} | {med('render_ms'):.1f} | {med('hop_ms'):.0f} | "
              f"{med('switches_per_s'):.0f} | {len(rs)} |")


if __name__ == "__main__":
    main()
