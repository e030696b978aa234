"""Offline rendering speed per stage, at full model size with generated (random) weights.

    python bench/offline.py [--seconds 10] [--modes fp32,bf16,fp32+compile,bf16+compile,fast] [--mode-frames 50]

A mode is precision[+compile][+subpixel], or "fast" (Speed.fastest(): bf16 + compile where bf16 is native,
else fp32, upsampling timed both ways per layer). bf16 modes run copies of HuBERT and stage 2 whose matmul
weights are cast once, as load_models prepares them.

The first mode runs the whole pipeline (portrait encode, HuBERT-large, 50-step DDIM, rendering of every
frame, mp4 encoding) and is the reference. Every other mode re-times HuBERT and the renderer on
``--mode-frames`` frames and reports its error against the reference frames. Writes JSON
(bench/results/offline.json by default) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avatar.media import write_mp4  # noqa: E402
from avatar.pipeline import Models, Speed, encode_portrait, generate_motion, prepare_bf16_models, render  # noqa: E402
from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor, to_uint8  # noqa: E402
from models.frontend import HubertFrontend  # noqa: E402
from models.stage1 import Stage1  # noqa: E402
from models.stage2 import Stage2, Stage2Dims  # noqa: E402

HUBERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)


def parse_mode(text: str) -> Speed:
    if text == "fast":
        return Speed.fastest()
    parts = text.split("+")
    return Speed(precision=parts[0], compile="compile" in parts,
                 upsampling="subpixel" if "subpixel" in parts else "transposed")


def with_speed(m: Models, speed: Speed) -> Models:
    """The same weights in another mode; bf16 gets copies of HuBERT and stage 2 with bf16 matmul weights."""
    hubert, stage2 = m.hubert, m.stage2
    if speed.resolve(m.device).precision == "bf16":
        import copy
        hubert = HubertFrontend(copy.deepcopy(hubert.model), hubert.do_normalize)
        stage2 = copy.deepcopy(stage2)
        prepare_bf16_models(stage2, hubert, m.device)        # as load_models does
    return Models(m.stage1, stage2, hubert, m.device, speed)


def build(speed: Speed, seed: int = 0) -> Models:
    """Full-size models with random weights (no pretrained weights are needed to time them)."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(seed)
    hubert = HubertFrontend(HubertModel(HubertConfig(**HUBERT_LARGE)))
    return Models(Stage1().eval(), Stage2(Stage2Dims()).eval(), hubert, torch.device("cpu"), speed)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def speech_like(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.2 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 4 * t) > 0) +
            0.02 * rng.standard_normal(len(t))).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--modes", default="fp32,bf16,fp32+compile,bf16+compile")
    p.add_argument("--mode-frames", type=int, default=50, help="frames rendered per extra mode")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "offline.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    wave = speech_like(args.seconds)
    image = to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image)

    ref_speed = parse_mode(modes[0])
    base = build(Speed())       # every mode derives from the fp32 weights (a bf16 reference holds bf16 copies)
    m = with_speed(base, ref_speed)
    rows = []
    with torch.inference_mode():
        code, t_enc = timed(lambda: encode_portrait(m, image))
        (audio, frames), t_hub = timed(lambda: m.features(wave))
        alphas, t_mot = timed(lambda: generate_motion(m, code, audio, frames, steps=args.steps)[0])
        ref_frames, t_ren = timed(lambda: torch.cat(list(render(m, code, alphas))))
        u8 = to_uint8(ref_frames)
        with tempfile.TemporaryDirectory() as d:
            _, t_mp4 = timed(lambda: write_mp4(os.path.join(d, "o.mp4"), iter(u8), wave))
    total = t_enc + t_hub + t_mot + t_ren + t_mp4
    rows.append(dict(mode=modes[0], resolved=m.describe(), load=os.getloadavg()[0], frames=frames, encode_s=t_enc, hubert_s=t_hub, motion_s=t_mot,
                     render_s=t_ren, render_ms_per_frame=1000 * t_ren / frames, mp4_s=t_mp4, total_s=total,
                     max_abs_err=0.0, mean_abs_err=0.0, u8_max_levels=0, u8_mean_levels=0.0, u8_over_4_levels=0.0))
    n = min(args.mode_frames, frames)
    for mode in modes[1:]:
        speed = parse_mode(mode)
        mm = with_speed(base, speed)
        with torch.inference_mode():
            c = encode_portrait(mm, image)
            _, t_hub2 = timed(lambda: mm.features(wave))
            _, t_mot2 = timed(lambda: generate_motion(mm, c, audio, frames, steps=args.steps))
            warm = 2 if speed.compile else 1
            _, t_warm = timed(lambda: list(render(mm, c, alphas[:warm])))
            out, t = timed(lambda: torch.cat(list(render(mm, c, alphas[:n]))))
        err = (out.float() - ref_frames[:n]).abs()
        lv = np.abs(to_uint8(out.float()).astype(int) - u8[:n].astype(int))  # what a viewer sees
        per_frame = t / n
        rows.append(dict(mode=mode, resolved=mm.describe(), frames=n, hubert_s=t_hub2, motion_s=t_mot2, warmup_s=t_warm, render_ms_per_frame=1000 * per_frame,
                         total_s_estimate=t_enc + t_hub2 + t_mot2 + per_frame * frames + t_mp4,
                         max_abs_err=float(err.max()), mean_abs_err=float(err.mean()),
                         u8_max_levels=int(lv.max()), u8_mean_levels=float(lv.mean()),
                         u8_over_4_levels=float((lv > 4).mean())))

    result = dict(bench="offline", seconds_of_audio=args.seconds, steps=args.steps, threads=args.threads,
                  torch=torch.__version__, cpu=platform.processor() or platform.machine(), rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    r0 = rows[0]
    print(f"{args.seconds:g} s of audio, {frames} frames, {args.steps} DDIM steps, {args.threads} threads")
    print(f"reference {r0['mode']}: encode {r0['encode_s']:.2f} s | HuBERT {r0['hubert_s']:.2f} s | motion "
          f"{r0['motion_s']:.2f} s | render {r0['render_s']:.2f} s ({r0['render_ms_per_frame']:.0f} ms/frame) | "
          f"mp4 {r0['mp4_s']:.2f} s | total {r0['total_s']:.2f} s")
    print(f"{'mode':<16}{'HuBERT s':>9}{'motion s':>9}{'render ms/fr':>13}{'total s':>9}{'max|err|':>9}{'mean|err|':>10}"
          f"{'u8 mean':>8}{'u8 >4':>8}")
    for r in rows:
        print(f"{r['mode']:<16}{r['hubert_s']:>9.2f}{r['motion_s']:>9.2f}{r['render_ms_per_frame']:>13.0f}"
              f"{r.get('total_s', r.get('total_s_estimate')):>9.1f}{r['max_abs_err']:>9.3f}{r['mean_abs_err']:>10.4f}"
              f"{r['u8_mean_levels']:>8.2f}{r['u8_over_4_levels']:>8.2%}")
    print("total s of the other modes = their HuBERT, motion and per-frame render times + the reference's "
          "encode and mp4 times")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
