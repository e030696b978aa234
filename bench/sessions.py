"""Many avatars on one engine: N sessions, each its own portrait state and speech, on one EngineWorker.

    python bench/sessions.py [--sessions 1,2,4,8,16,32] [--dims tiny|full] [--device cpu|cuda]
                             [--seconds 4] [--batch auto|on|off] [--compile] [--quick]

For each N, N Sessions (real time) share one engine worker. Each idles for a moment (staggered, as
clients arrive), then is fed the bundled sentence (avatar/assets/sentence.wav) in 20 ms chunks at the pace
of real time, for --seconds, and runs one second past it. Reported per N: aggregate and per-session
frames/s drawn (pictures the engine made, not held or repeated), the latency from the first speech
sample's arrival to the frame that holds it (p50 / p95 over sessions), the per-frame latency p95, held and
skipped frames, the process's peak RSS and the GPU's peak memory. Random weights (tiny: configs/tiny.yaml;
full: the published sizes): the speed is that of the real models. Writes JSON (bench/results/sessions.json,
rewritten after every N, so a run stopped by a time limit keeps the rows it finished) and prints a table.
--compile: Speed.compile (on a GPU: the denoiser and renderer as CUDA graphs at fixed shapes; each new
batch size compiles once, inside the first N that meets it). --quick: tiny dims, N = 1, 2, 1 s of speech.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avatar.animator import StreamConfig, StreamingAnimator  # noqa: E402
from avatar.media import load_audio  # noqa: E402
from avatar.pipeline import Models, Speed, encode_portrait, pick_device  # noqa: E402
from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor  # noqa: E402
from avatar.timebase import FPS, SAMPLE_RATE, AudioChunk  # noqa: E402
from models.frontend import HubertFrontend  # noqa: E402
from models.stage1 import Stage1, Stage1Dims  # noqa: E402
from models.stage2 import Stage2, Stage2Dims  # noqa: E402
from streaming.session import Session  # noqa: E402
from streaming.worker import EngineWorker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HUBERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)


def build_models(dims: str, device: str, precision, compiled: bool = False) -> Models:
    from transformers import HubertConfig, HubertModel
    from models.precision import prepare_bf16

    torch.manual_seed(0)
    dev = pick_device(device)
    if dims == "tiny":
        tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
        s1, s2 = Stage1(Stage1Dims(**tiny["stage1"])), Stage2(Stage2Dims(**tiny["stage2"]))
        hubert = HubertModel(HubertConfig(**tiny["hubert"]))
    else:
        s1, s2, hubert = Stage1(), Stage2(Stage2Dims()), HubertModel(HubertConfig(**HUBERT_LARGE))
    speed = Speed(precision=precision, compile=compiled)
    s2, hubert = s2.eval().to(dev), hubert.eval().to(dev)
    if speed.resolve(dev).precision == "bf16":
        prepare_bf16(s2)
        prepare_bf16(hubert)
    return Models(s1.eval().to(dev), s2, HubertFrontend(hubert), dev, speed)


def memory() -> dict:
    out = {"rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if torch.cuda.is_available():
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
    return out


async def one_session(engine, models, photo, wave, delay: float, seconds: float) -> dict:
    code = await asyncio.wrap_future(engine.call(encode_portrait, models, photo))
    animator = StreamingAnimator(models, code, StreamConfig())
    async with Session(animator, engine=engine) as avatar:
        await asyncio.sleep(delay)                   # clients arrive one after another, and idle first
        speech = np.resize(wave, int(seconds * SAMPLE_RATE))
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(speech), 320)):   # 20 ms chunks at the pace of real time
            avatar.push(speech[i:i + 320])
            await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.02 - time.monotonic()))
        await asyncio.sleep(1.0 + animator.latency_s)
        summary = avatar.summary()
    summary["skipped"] = animator.skipped
    return summary


async def run_n(n: int, models, photos, wave, seconds: float, batch) -> dict:
    engine = EngineWorker(batch=batch).start()
    try:
        t0 = time.monotonic()
        rows = await asyncio.gather(*(one_session(engine, models, photos[i % len(photos)], wave,
                                                  0.2 + 0.04 * i, seconds) for i in range(n)))
        wall = time.monotonic() - t0
    finally:
        engine.stop()
    drawn = [r["drawn_fps"] or 0.0 for r in rows]
    first = [r["first_audio_to_frame_ms"] for r in rows if r["first_audio_to_frame_ms"] is not None]
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 1) if xs else None   # noqa: E731
    return dict(sessions=n, batched=bool(engine.batch), wall_s=round(wall, 1),
                aggregate_drawn_fps=round(sum(drawn), 2), per_session_drawn_fps_min=round(min(drawn), 2),
                per_session_drawn_fps_median=round(float(np.median(drawn)), 2),
                first_frame_ms_p50=pct(first, 50), first_frame_ms_p95=pct(first, 95),
                frame_latency_p95_ms=max((r["latency_p95_ms"] or 0.0) for r in rows),
                held=sum(r["held"] for r in rows), repeats=sum(r["repeats"] for r in rows),
                skipped=sum(r["skipped"] for r in rows), errors=sum(r["errors"] for r in rows),
                dropped_input_ms=sum(r["dropped_input_ms"] for r in rows), **memory(), per_session=rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", default="1,2,4,8,16,32")
    p.add_argument("--dims", choices=["tiny", "full"], default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "auto"],
                   help="default: bf16 on a GPU, fp32 on a CPU (as the command line)")
    p.add_argument("--seconds", type=float, default=4.0, help="speech per session")
    p.add_argument("--batch", choices=["auto", "on", "off"], default="auto",
                   help="batch the sessions' work (auto: on a GPU only)")
    p.add_argument("--compile", action="store_true", help="Speed.compile: CUDA graphs on a GPU")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny dims, N = 1, 2, 1 s of speech")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sessions.json"))
    args = p.parse_args()
    if args.quick:
        args.dims, args.sessions, args.seconds = "tiny", "1,2", 1.0
    torch.set_num_threads(args.threads)
    batch = {"auto": None, "on": True, "off": False}[args.batch]
    models = build_models(args.dims, args.device, args.precision, args.compile)
    image = to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image)
    photos = [image, image.flip(-1), image * 0.8]
    wave = load_audio(asset_path("sentence.wav"))
    with torch.inference_mode():                     # the first calls pay one-off costs: not measured
        warm = StreamingAnimator(models, encode_portrait(models, image), StreamConfig())
        warm.push(AudioChunk(wave[:SAMPLE_RATE]))
    dev = models.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {args.threads} threads"
    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for n in (int(x) for x in args.sessions.split(",")):
        rows.append(asyncio.run(run_n(n, models, photos, wave, args.seconds, batch)))
        print(f"  N={n}: {rows[-1]['aggregate_drawn_fps']} frames/s drawn in all", file=sys.stderr)
        Path(args.out).write_text(json.dumps(dict(bench="sessions", dims=args.dims, device=name,
                                                  precision=models.speed.precision, compile=models.speed.compile,
                                                  seconds=args.seconds, torch=torch.__version__, rows=rows),
                                             indent=2))
    mode = models.speed.precision + (" + compile" if models.speed.compile else "")
    print(f"{args.dims} dims, {mode}, {name}, {args.seconds:g} s of speech per session")
    head = ["N", "batched", "drawn fps", "per session", "min", "first p50", "first p95", "lat p95",
            "held", "skipped", "RSS MB"] + (["GPU MB"] if "gpu_peak_mb" in rows[0] else [])
    print("".join(f"{h:>12}" for h in head))
    for r in rows:
        vals = [r["sessions"], "yes" if r["batched"] else "no", r["aggregate_drawn_fps"],
                r["per_session_drawn_fps_median"], r["per_session_drawn_fps_min"], r["first_frame_ms_p50"],
                r["first_frame_ms_p95"], r["frame_latency_p95_ms"], r["held"], r["skipped"], r["rss_peak_mb"]]
        vals += [r["gpu_peak_mb"]] if "gpu_peak_mb" in r else []
        print("".join(f"{v:>12}" for v in vals))
    print(f"drawn fps: pictures the engine made per second (a session shows {FPS} frames/s, holding the last "
          "picture when the engine is late); first: first speech sample in -> its frame out, ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
