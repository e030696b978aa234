"""Training step time, peak memory and throughput of either stage on synthetic batches (no data
needed), printed and written as JSON. Full size by default; ``--tiny`` uses configs/tiny-like dims.

    python -m training.bench --stage 2 --batch 8 --window 125 --steps 20 --json stage2.json
    python -m training.bench --stage 1 --batch 8 --steps 10 --json stage1.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from models.stage1 import Stage1, Stage1Dims
from models.stage2 import Stage2, Stage2Dims

from .common import EMA, ForwardProcess, autocast, autocast_dtype
from .losses import AAMSoftmax, Discriminator, VGG19Features
from .train_motion_encoder import DiscriminatorLoss, EncoderLoss, Stage1TrainConfig
from .train_motion_generator import DiffusionLoss

TINY1 = Stage1Dims(size=64, style_dim=32, channel_divisor=16)
TINY2 = Stage2Dims(control="full_control", hubert_dim=64, hubert_layers=3, speech_dim=32, speech_layers=2,
                   proj_dim=8, style_dim=32, lstm_hidden=8)


def _stage2(dims: Stage2Dims, batch: int, window: int, dev, amp):
    net = Stage2(dims, dropout=0.2).to(dev).train()
    model, ema = DiffusionLoss(net, ForwardProcess(), 1.0), EMA(net, 0.9999)
    ema.shadow = {k: v.to(dev) for k, v in ema.shadow.items()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    F = window
    audio = torch.randn(batch, dims.hubert_layers, 2 * F, dims.hubert_dim) if dims.audio == "hubert" \
        else torch.randn(batch, 4 * F, dims.mfcc_dim)
    b = {"audio": audio, "alpha": torch.rand(batch, F, dims.motion_dim) * 2 - 1,
         "alpha0": torch.randn(batch, dims.motion_dim), "wa": torch.randn(batch, dims.style_dim),
         "location": torch.rand(batch, F, 1), "scale": torch.rand(batch, F, 1), "pose": torch.rand(batch, F, 3) - 0.5}
    b = {k: v.to(dev) for k, v in b.items()}

    def step():
        with autocast(amp, dev):
            total, _ = model(b)
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        ema.update(net)
    return step, sum(p.numel() for p in net.parameters()), batch * window, "frames"


def _stage1(dims: Stage1Dims, batch: int, dev, amp, vgg_divisor: int):
    net = Stage1(dims).to(dev).train()
    for name, p in net.named_parameters():
        if name.startswith("dec.to_rgb1.") or name.endswith(".noise.weight"):
            p.requires_grad_(False)
    disc, aam = Discriminator(dims).to(dev), AAMSoftmax(dims.style_dim, 100).to(dev)
    g = EncoderLoss(net, VGG19Features(vgg_divisor).to(dev).eval(), aam, Stage1TrainConfig())
    d = DiscriminatorLoss(disc)
    trainable = [p for p in net.parameters() if p.requires_grad] + [*aam.parameters()]
    opt_g = torch.optim.Adam(trainable, 2e-3, (0.0, 0.99))
    opt_d = torch.optim.Adam(disc.parameters(), 2e-3, (0.0, 0.99))
    img = lambda: torch.rand(batch, 3, dims.size, dims.size, device=dev) * 2 - 1  # noqa: E731
    ids = lambda: torch.randint(0, 100, (batch,), device=dev)  # noqa: E731
    b = {"source": img(), "target": img(), "other": img(), "identity": ids(), "other_identity": ids()}
    gen = torch.Generator().manual_seed(0)

    def step():   # fp16 loss scaling left out: bench bf16 or fp32
        disc.requires_grad_(False)
        with autocast(amp, dev):
            total, _, recon = g(b, disc, gen)
        opt_g.zero_grad(set_to_none=True)
        total.backward()
        opt_g.step()
        disc.requires_grad_(True)
        with autocast(amp, dev):
            dl = d(b["target"], recon)
        opt_d.zero_grad(set_to_none=True)
        dl.backward()
        opt_d.step()
    return step, sum(p.numel() for p in net.parameters()), batch, "pairs"


def bench(stage: int, batch: int = 8, window: int = 125, steps: int = 10, warmup: int = 3, device: str = "auto",
          precision: str = "auto", tiny: bool = False) -> dict:
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = autocast_dtype(precision, dev)
    if amp == torch.float16 and stage == 1:
        amp = None
    if stage == 2:
        step, params, items, unit = _stage2(TINY2 if tiny else Stage2Dims(control="full_control"), batch, window,
                                            dev, amp)
    else:
        step, params, items, unit = _stage1(TINY1 if tiny else Stage1Dims(), batch, dev, amp, 8 if tiny else 1)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2) if dev.type == "cuda" else None
    return {"stage": stage, "device": name, "precision": str(amp or torch.float32), "batch": batch,
            "window": window if stage == 2 else None, "parameters": params, "step_s": round(dt, 4),
            f"{unit}_per_s": round(items / dt, 1), "peak_memory_gib": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--window", type=int, default=125)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    res = bench(a.stage, a.batch, a.window, a.steps, device=a.device, precision=a.precision, tiny=a.tiny)
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
