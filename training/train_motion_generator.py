"""Stage-2 training: the audio-to-motion diffusion denoiser (paper §3.3, ANITALKER.md §5).

Loss = MSE(eps) + control_weight * (MSE(location) + MSE(scale) + MSE(pose)) for the adapters the
model has. As in the official training the model runs with the predictors on (no control given):
the predictors are supervised by the ground-truth controls and the adapter encoders consume the
predictions. t ~ U{0..T-1}, linear betas 1e-4..0.02 over T = 1000. Adam, gradient-norm clip, EMA;
the EMA weights are what the checkpoint's ``state_dict`` holds, so ``load_stage2`` samples with
them as the official sampler does.

    python -m training.train_motion_generator --config configs/train_stage2.yaml data=DATA out=RUN
    torchrun --nproc_per_node 4 -m training.train_motion_generator --config ... (same options)

A run resumes exactly from ``RUN/last.pt`` when it exists (mid-epoch included). ``window`` sets the training window length
(frames at 25 fps), e.g. 25 for models meant for short streaming windows.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from models.checkpoints import export_official, load_stage2
from models.sampler import ddim_schedule
from models.stage2 import Stage2, Stage2Dims

from .common import (CsvLog, EMA, ForwardProcess, TrainLoop, autocast, autocast_dtype, load_training_state,
                     mean_over_ranks, optimizer_to, save_training_state, setup_runtime, sync_buffers, teardown)
from .config import load_config, to_dict
from .data import MotionWindows, open_array


@dataclass(frozen=True)
class Stage2TrainConfig:
    data: str = "data"                 # dataset folder (or its manifest.jsonl)
    out: str = "runs/stage2"           # run folder: last.pt, log.csv
    init: str = ""                     # official or project stage-2 file to fine-tune (its dims win)
    model: Stage2Dims = field(default_factory=Stage2Dims)
    dropout: float = 0.2               # the official conformer dropout
    window: int = 125                  # frames per training window (5 s)
    batch_size: int = 8                # per process
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    control_weight: float = 1.0
    diffusion_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    max_steps: int = 200_000
    log_every: int = 50
    save_every: int = 1000
    keep_every: int = 0                # also keep stepNNNNNNNN.pt every this many steps (0: only last.pt)
    workers: int = 2
    seed: int = 0
    precision: str = "auto"            # auto | fp32 | bf16 | fp16 (auto: bf16/fp16 on GPU, fp32 on CPU)
    device: str = "auto"
    export: str = ""                   # at the end, also write the official key layout here
    progress: bool = True


class DiffusionLoss(nn.Module):
    """Wraps the denoiser so that one forward computes every loss (DDP hooks forward only)."""

    def __init__(self, net: Stage2, process: ForwardProcess, control_weight: float):
        super().__init__()
        self.net, self.process, self.control_weight = net, process, control_weight

    def forward(self, batch: dict):
        net = self.net
        cond = net.condition(batch["wa"], batch["alpha0"], batch["audio"])   # predictors on
        x0 = batch["alpha"]
        t = self.process.sample_t(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        eps = net.eps(cond, self.process.q_sample(x0, t, noise), t)
        parts = {"eps": F.mse_loss(eps.float(), noise)}
        for name, _, _ in net.adapters:
            parts[name] = F.mse_loss(getattr(cond, name).float(), batch[name])
        total = parts["eps"] + self.control_weight * sum(v for k, v in parts.items() if k != "eps")
        return total, parts


def _controls(dims: Stage2Dims) -> tuple:
    return {"audio_only": (), "pose_only": ("pose",), "full_control": ("location", "scale", "pose")}[dims.control]


def sampling_mismatches(cfg: Stage2TrainConfig, ds: MotionWindows, max_clips: int = 256) -> list[str]:
    """What would make the trained model disagree with the inference sampler (models/sampler.py).

    The sampler always uses its default schedule (the checkpoint does not record one) and, as the
    official one, clamps every x0 prediction to [-1, 1]: a model trained on another schedule, or on
    motion codes outside [-1, 1], trains without complaint and then samples wrongly."""
    out = []
    p = inspect.signature(ddim_schedule).parameters
    want = (p["T"].default, p["beta_start"].default, p["beta_end"].default)
    if (cfg.diffusion_steps, cfg.beta_start, cfg.beta_end) != want:
        out.append(f"diffusion_steps/beta_start/beta_end = {(cfg.diffusion_steps, cfg.beta_start, cfg.beta_end)}, "
                   f"but `anitalker render` samples with {want}: the model will not sample correctly")
    clips = ds.clips[:: max(1, len(ds.clips) // max_clips)][:max_clips]
    n = over = peak = 0
    for e in clips:
        a = open_array(ds.root, e, "alpha")
        n, over, peak = n + a.size, over + int((abs(a) > 1).sum()), max(peak, float(abs(a).max()))
    if over:
        out.append(f"{100 * over / n:.2f} % of the motion codes (alpha) lie outside [-1, 1] (max |alpha| "
                   f"{peak:.2f}); the sampler clamps x0 to [-1, 1] as the official one does, so the model "
                   "cannot generate them")
    return out


def build_model(cfg: Stage2TrainConfig, resume: dict | None) -> Stage2:
    if resume is not None:
        net = Stage2(Stage2Dims(**resume["dims"]), dropout=cfg.dropout)
        net.load_state_dict(resume["train_state_dict"])
    elif cfg.init:
        src = load_stage2(cfg.init)
        net = Stage2(src.dims, dropout=cfg.dropout)
        net.load_state_dict(src.state_dict())
    else:
        torch.manual_seed(cfg.seed)
        net = Stage2(cfg.model, dropout=cfg.dropout)
    return net


def train(cfg: Stage2TrainConfig) -> dict:
    """Train until cfg.max_steps; returns the last logged losses and the step reached."""
    rt = setup_runtime(cfg.device)
    out = Path(cfg.out)
    resume = load_training_state(out)
    net = build_model(cfg, resume).to(rt.device).train()
    dims = net.dims
    ema = EMA(net, cfg.ema_decay)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = autocast_dtype(cfg.precision, rt.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    if resume is not None:
        ema.shadow = {k: v.to(rt.device) for k, v in resume["state_dict"].items()}
        opt.load_state_dict(resume["optimizer"])
        optimizer_to(opt, rt.device)
        scaler.load_state_dict(resume["scaler"])
    else:
        ema.shadow = {k: v.to(rt.device) for k, v in ema.shadow.items()}

    ds = MotionWindows(cfg.data, cfg.window, dims.audio, _controls(dims), cfg.seed)
    if rt.main:
        for warning in sampling_mismatches(cfg, ds):
            print(f"warning: {warning}", file=sys.stderr)
    loop = TrainLoop(ds, cfg, rt, resume, "stage2")
    model = DiffusionLoss(net, ForwardProcess(cfg.diffusion_steps, cfg.beta_start, cfg.beta_end),
                          cfg.control_weight)
    if rt.distributed:
        model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    log = CsvLog(out / "log.csv", enabled=rt.main, resume_step=loop.step)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"stage 2 {dims.infer_type}: {sum(p.numel() for p in net.parameters()):,} parameters, "
              f"{len(ds)} windows of {cfg.window} frames, {rt.world} process(es) on {rt.device}, "
              f"precision {amp or torch.float32}, starting at step {loop.step}", file=sys.stderr)
    last = {}

    def save():
        export = Stage2(dims)
        export.load_state_dict({k: v.cpu() for k, v in ema.shadow.items()})
        save_training_state(out, net, export, {
            "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), **loop.position(),
            "config": to_dict(cfg)}, cfg.keep_every, loop.step)
        return export

    for batch, step in loop:
        # t and the noise depend only on (seed, rank, step): a resumed run draws what it would have.
        torch.manual_seed(cfg.seed * 1_000_003 + rt.rank * 7919 + step)
        with autocast(amp, rt.device):
            total, parts = model(batch)
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        ema.update(net)
        if loop.due(cfg.log_every):
            last = mean_over_ranks({"loss": total.detach(), **{k: v.detach() for k, v in parts.items()},
                                    "grad_norm": gnorm}, rt)
            log.write(loop.step, {**last, "lr": opt.param_groups[0]["lr"], "epoch": loop.epoch})
            loop.bar.set_postfix(loss=f"{last['loss']:.4f}")
        if rt.main and loop.due(cfg.save_every):
            export = save()
            if loop.step == cfg.max_steps and cfg.export:
                export_official(cfg.export, export)
    sync_buffers(net, rt)
    teardown(rt)
    return {"step": loop.step, "model": net, **last}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train_motion_generator", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/train_stage2.yaml", help="YAML recipe (default %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="e.g. data=DATA out=RUN window=25 model.control=pose_only")
    args = p.parse_args(argv)
    train(load_config(Stage2TrainConfig, args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
