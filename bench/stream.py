"""Streaming engine speed at full model size with generated (random) weights.

    python bench/stream.py [--seconds 20] [--settings 10/5/10/fp32,10/5/10/bf16,5/2/5/bf16] [--device cpu]

A setting is hop/lookahead/steps/precision[/hubert] (hubert: window, the default, or incremental). Audio (espeak-ng speech when available, else a synthetic
voice-like signal) is pushed in 20 ms chunks as a live source would. For each setting: compute per hop and
per stage (features, motion, render), the real-time factor (compute / audio duration), and the latency from
an audio sample's arrival to its frame when the audio arrives in real time (a single worker: a push starts
when its audio has arrived and the previous push is done). Writes JSON (bench/results/stream.json) and
prints a table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avatar.animator import StreamConfig, StreamingAnimator  # noqa: E402
from avatar.media import load_audio  # noqa: E402
from avatar.pipeline import Models, Speed, encode_portrait, pick_device  # noqa: E402
from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor  # noqa: E402
from avatar.timebase import SAMPLE_RATE, AudioChunk  # noqa: E402
from bench.offline import HUBERT_LARGE, speech_like, with_speed  # noqa: E402
from models.frontend import HubertFrontend  # noqa: E402
from models.stage1 import Stage1  # noqa: E402
from models.stage2 import Stage2, Stage2Dims  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. A talking portrait follows the voice with its lips, "
        "its head and its eyes, and it keeps moving while it listens. ")


def speech(seconds: float) -> np.ndarray:
    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "s.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), TEXT * 4], check=True)
            wave = load_audio(path)
        reps = int(np.ceil(seconds * SAMPLE_RATE / len(wave)))
        return np.tile(wave, reps)[:int(seconds * SAMPLE_RATE)]
    return speech_like(seconds)


def run_setting(parts, image, wave, device, chunk=320) -> dict:
    hop, lookahead, steps, precision = int(parts[0]), int(parts[1]), int(parts[2]), parts[3]
    hubert = parts[4] if len(parts) > 4 else "window"
    models = with_speed(MODELS.get(device), Speed(precision=precision))
    with torch.inference_mode():
        code = encode_portrait(models, image)
    animator = StreamingAnimator(models, code, StreamConfig(hop=hop, lookahead=lookahead, steps=steps,
                                                            hubert=hubert))
    animator.push(AudioChunk(np.zeros(640 * (hop + lookahead + 2), np.float32)))   # warm-up
    animator.timings = {k: 0.0 for k in animator.timings}
    free_at, lat, hops, compute = 0.0, [], [], 0.0
    n_frames = 0
    for i in range(0, len(wave) + 1, chunk):
        arrival = min(i + chunk, len(wave)) / SAMPLE_RATE       # when the chunk's last sample arrived
        t0 = time.perf_counter()
        out = animator.push(AudioChunk(wave[i:i + chunk], i)) if i < len(wave) else animator.flush()
        dt = time.perf_counter() - t0
        compute += dt
        done = max(free_at, arrival) + dt
        free_at = done
        if out:
            hops.append(dt)
        for f in out:                                   # frame f's last sample arrived at (f.pts+1)*0.04
            lat.append(done - min((f.pts + 1) * 640, len(wave)) / SAMPLE_RATE)
        n_frames += len(out)
    seconds = len(wave) / SAMPLE_RATE
    t = animator.timings
    return dict(setting="/".join(parts), hop=hop, lookahead=lookahead, steps=steps, precision=precision,
                frames=n_frames, rtf=compute / seconds, fps=n_frames / compute,
                per_hop_ms=1000 * float(np.median(hops)), features_ms_per_hop=1000 * t["features"] / len(hops),
                motion_ms_per_hop=1000 * t["motion"] / len(hops), render_ms_per_frame=1000 * t["render"] / n_frames,
                configured_latency_ms=1000 * animator.latency_s,
                latency_p50_ms=1000 * float(np.percentile(lat, 50)), latency_p95_ms=1000 * float(np.percentile(lat, 95)),
                first_frame_latency_ms=1000 * lat[0])


class MODELS:
    cache: dict = {}

    @classmethod
    def get(cls, device):
        if device not in cls.cache:
            from transformers import HubertConfig, HubertModel
            torch.manual_seed(0)
            dev = pick_device(device)
            cls.cache[device] = Models(Stage1().eval().to(dev), Stage2(Stage2Dims()).eval().to(dev),
                                       HubertFrontend(HubertModel(HubertConfig(**HUBERT_LARGE)).to(dev)), dev)
        return cls.cache[device]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--settings", default="10/5/10/fp32,10/5/10/bf16,5/2/5/bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "stream.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    wave = speech(args.seconds)
    image = to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image)
    rows = [run_setting(s.split("/"), image, wave, args.device) for s in args.settings.split(",")]
    dev = pick_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {args.threads} threads"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(bench="stream", seconds=args.seconds, device=name,
                                              torch=torch.__version__, rows=rows), indent=2))
    print(f"{args.seconds:g} s of speech pushed in 20 ms chunks, full-size random weights, {name}")
    head = ["hop/la/steps/prec", "per hop ms", "feat ms", "motion ms", "render ms/fr", "RTF", "fps",
            "cfg lat ms", "lat p50", "lat p95", "first"]
    print("".join(f"{h:>13}" if i else f"{h:<18}" for i, h in enumerate(head)))
    for r in rows:
        vals = [r["per_hop_ms"], r["features_ms_per_hop"], r["motion_ms_per_hop"], r["render_ms_per_frame"],
                r["rtf"], r["fps"], r["configured_latency_ms"], r["latency_p50_ms"], r["latency_p95_ms"],
                r["first_frame_latency_ms"]]
        print(f"{r['setting']:<18}" + "".join(f"{v:>13.2f}" if k in (4, 5) else f"{v:>13.0f}"
                                               for k, v in enumerate(vals)))
    print("latency: from a sample's real-time arrival to its frame, one worker; it grows without bound when RTF > 1")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
