"""How sliding-window motion joins its windows, per continuity method and window setting.

    python bench/seams.py --checkpoints DIR --infer-type hubert_audio_only   # real weights
    python bench/seams.py --random      # full-size stage 2 and HuBERT-large, random weights
    python bench/seams.py --tiny        # the tiny test dims (configs/tiny.yaml), random weights
    python bench/seams.py --prior       # SmoothPrior below: an exact denoiser of a smooth motion prior

For each run it measures, on espeak-ng speech, the jump at window boundaries (mean |alpha[b] - alpha[b-1]|,
L2 over the code, over the first frames b of every hop but the first) against the same frame-to-frame
change inside hops, and the distance to one-pass offline generation with the same noise (mean L2 per frame).
Random weights give mostly clamped codes whose denoiser barely looks at x_t, so their seams say little
about trained models; --prior is a model that does denoise, to show what each method does to seams.
Writes JSON (bench/results/seams.json by default) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avatar.media import load_audio  # noqa: E402
from avatar.motion import MotionConfig, MotionStream, motion_noise  # noqa: E402
from models.frontend import HubertFrontend, hubert_model_input  # noqa: E402
from models.sampler import ddim_sample, ddim_schedule  # noqa: E402
from models.stage2 import Stage2, Stage2Dims  # noqa: E402

HUBERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
TEXT = ("The quick brown fox jumps over the lazy dog. Streaming avatars speak while they listen, "
        "one short window at a time, and nobody should see where one window ends and the next begins.")
SETTINGS = "10,10,5,10 5,10,5,10 10,10,10,10 25,25,10,10 10,10,5,25 10,0,0,10"   # hop,context,lookahead,steps


class SmoothPrior:
    """A stand-in for Stage2 whose eps is the exact MMSE denoiser of x0 ~ N(0, K) per code channel,
    K[i, j] = scale^2 exp(-(i - j)^2 / (2 length^2)) over frames: smooth motion, no audio, no hint.

    condition() -> K for the window (audio as mfcc-shaped (1, 4F, *)); eps(K, x_t (B, F, M), t) -> (B, F, M).
    """
    adapters = ()

    def __init__(self, length: float = 6.0, scale: float = 0.3, motion_dim: int = 20):
        self.dims = SimpleNamespace(audio="mfcc", infer_type="smooth_prior", motion_dim=motion_dim)
        self.length, self.scale = length, scale
        betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
        self.abar = torch.from_numpy(np.cumprod(1 - betas))

    def condition(self, wa, alpha0, audio, **controls):
        i = torch.arange(audio.shape[1] // 4, dtype=torch.float64)
        return self.scale ** 2 * torch.exp(-(i[:, None] - i[None]) ** 2 / (2 * self.length ** 2))

    def eps(self, K, x, t):
        a = self.abar[int(t[0])]
        eye = torch.eye(len(K), dtype=torch.float64)
        x0 = a.sqrt() * K @ torch.linalg.solve(a * K + (1 - a) * eye, x.double())   # E[x0 | x_t]
        return ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).float()


def speech(seconds: float) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), TEXT], check=True)
        wave = load_audio(path)
    n = int(seconds * 16000)
    return np.pad(wave, (0, max(0, n - len(wave))))[:n]


def build(kind: str, args, wave):
    """kind: checkpoints | random | tiny | prior -> (name, stage2, wa (1, S), alpha0 (1, M), features, frames)."""
    g = torch.Generator().manual_seed(0)
    if kind == "checkpoints":
        from avatar.pipeline import encode_portrait, load_models
        from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor
        m = load_models(args.checkpoints, args.infer_type, args.device)
        code = encode_portrait(m, to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image))
        audio, frames = m.features(wave)
        return f"checkpoints {args.checkpoints} ({args.infer_type})", m.stage2, code.wa, code.alpha0, audio, frames
    if kind == "prior":   # no audio: zero mfcc-shaped features only carry the frame count
        frames = len(wave) // 640
        return ("smooth Gaussian prior (exact denoiser)", SmoothPrior(), torch.zeros(1, 1), torch.zeros(1, 20),
                torch.zeros(1, 4 * frames, 1), frames)
    from transformers import HubertConfig, HubertModel
    torch.manual_seed(0)
    if kind == "tiny":
        tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
        stage2 = Stage2(Stage2Dims(**tiny["stage2"])).eval()
        hubert, name = HubertModel(HubertConfig(**tiny["hubert"])), "tiny dims, random weights"
    else:
        stage2 = Stage2(Stage2Dims()).eval()
        hubert, name = HubertModel(HubertConfig(**HUBERT_LARGE)), "full size, random weights"
    with torch.inference_mode():
        audio, frames = hubert_model_input(HubertFrontend(hubert).states(wave).cpu())
    d = stage2.dims
    wa = torch.randn(1, d.style_dim, generator=g)
    return name, stage2, wa, torch.rand(1, d.motion_dim, generator=g) - 0.5, audio, frames


def window_audio(stage2, audio, lo, hi):
    return audio[:, :, 2 * lo:2 * hi] if stage2.dims.audio == "hubert" else audio[:, 4 * lo:4 * hi]


def run_stream(stage2, wa, alpha0, audio, frames, cfg):
    """-> codes (frames, M), first frames of every hop, motion seconds per hop."""
    s, outs, starts, secs = MotionStream(stage2, wa, alpha0, cfg), [], [], []
    while s.next < frames:
        lo, hi = s.window(s.next)
        starts.append(s.next)
        outs.append(s.step(s.next, window_audio(stage2, audio, lo, min(hi, frames)), final=hi >= frames))
        secs.append(s.timings["total_s"])
    return torch.cat(outs), starts, secs


def offline(stage2, wa, alpha0, audio, frames, steps, seed=0):
    cond = stage2.condition(wa, alpha0, audio)
    x_T = motion_noise(seed, 0, frames, stage2.dims.motion_dim)
    return ddim_sample(lambda x, t: stage2.eps(cond, x, t), x_T, ddim_schedule(steps))[0]


def seam_stats(codes, starts):
    d = (codes[1:] - codes[:-1]).norm(dim=-1)          # d[i]: frame i -> i + 1
    at = torch.zeros(len(d), dtype=torch.bool)
    at[[b - 1 for b in starts[1:]]] = True
    return float(d[at].mean()), float(d[~at].mean())


def measure(stage2, wa, alpha0, audio, frames, settings, methods) -> list[dict]:
    rows, refs = [], {}
    for setting in settings:
        hop, context, lookahead, steps = map(int, setting.split(","))
        if steps not in refs:
            refs[steps] = offline(stage2, wa, alpha0, audio, frames, steps)
        ref = refs[steps]
        for method in methods:
            cfg = MotionConfig(hop=hop, context=context, lookahead=lookahead, steps=steps, continuity=method)
            codes, starts, secs = run_stream(stage2, wa, alpha0, audio, frames, cfg)
            jump, inner = seam_stats(codes, starts)
            ref_jump, ref_inner = seam_stats(ref, starts)
            rows.append(dict(method=method, hop=hop, context=context, lookahead=lookahead, steps=steps,
                             jump=jump, inner=inner, ratio=jump / inner, offline_jump=ref_jump,
                             offline_inner=ref_inner, offline_dist=float((codes - ref).norm(dim=-1).mean()),
                             clamped=float((codes.abs() > 0.999).float().mean()),
                             motion_ms_per_hop=1000 * float(np.mean(secs))))
    return rows


def table(name: str, frames: int, rows: list[dict]) -> str:
    out = [f"{name}: {frames} frames; L2 per frame; offline = one pass, same noise",
           f"{'method':17} {'hop':>3} {'ctx':>3} {'la':>3} {'steps':>5} | {'jump':>6} {'inner':>6} {'ratio':>5} "
           f"| {'off.jump':>8} {'off.inner':>9} | {'dist':>6} {'clamp':>5} | {'ms/hop':>7}"]
    for r in rows:
        out.append(f"{r['method']:17} {r['hop']:3d} {r['context']:3d} {r['lookahead']:3d} {r['steps']:5d} | "
                   f"{r['jump']:6.3f} {r['inner']:6.3f} {r['ratio']:5.2f} | {r['offline_jump']:8.3f} "
                   f"{r['offline_inner']:9.3f} | {r['offline_dist']:6.3f} {r['clamped']:5.2f} | "
                   f"{r['motion_ms_per_hop']:7.1f}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", help="a checkpoint folder (as for `anitalker render`)")
    p.add_argument("--random", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--prior", action="store_true")
    p.add_argument("--infer-type", default="hubert_audio_only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--settings", default=SETTINGS, help="space-separated hop,context,lookahead,steps")
    p.add_argument("--methods", default="inpaint,crossfade,inpaint+crossfade,none")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "seams.json"))
    args = p.parse_args()
    kinds = ["checkpoints"] * bool(args.checkpoints) + [k for k in ("random", "tiny", "prior") if getattr(args, k)]
    if not kinds:
        p.error("give --checkpoints DIR and/or --random, --tiny, --prior")

    wave, results = speech(args.seconds), []
    for kind in kinds:
        name, stage2, wa, alpha0, audio, frames = build(kind, args, wave)
        t0 = time.perf_counter()
        with torch.inference_mode():
            rows = measure(stage2, wa, alpha0, audio, frames, args.settings.split(), args.methods.split(","))
        results.append(dict(model=name, frames=frames, rows=rows, wall_s=time.perf_counter() - t0))
        print(table(name, frames, rows), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(seconds=args.seconds, text=TEXT, torch=torch.__version__,
                                              threads=torch.get_num_threads(), results=results), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
