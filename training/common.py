"""What both training scripts share: processes (one or torchrun), precision, EMA, the CSV log,
checkpoint files that resume, and the forward diffusion process."""
from __future__ import annotations

import contextlib
import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from models.checkpoints import read_state_file, save_checkpoint

from .data import epoch_loader


# ----------------------------------------------------------------------------------------------- processes

@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_runtime(device: str = "auto") -> Runtime:
    """One process, or one of torchrun's (RANK/WORLD_SIZE/LOCAL_RANK in the environment).
    gloo on CPU, nccl on GPUs; each process drives the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(rank, world, local, dev)


def sync_buffers(module: nn.Module, rt: Runtime) -> None:
    """Rank 0's buffers (BatchNorm statistics) everywhere, as DDP does before each forward: after
    the last step every rank then holds exactly the weights rank 0 saved."""
    if rt.distributed:
        for b in module.buffers():
            dist.broadcast(b.data, 0)


def teardown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def autocast_dtype(precision: str, device: torch.device):
    """None (fp32) or the autocast dtype. 'auto' = bf16 on GPUs that have it, fp16 on older ones,
    fp32 on CPU (CPU autocast is slower than fp32 for these models)."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":   # GradScaler (fp16's loss scaling) is CUDA-only here
        raise ValueError(f"precision fp16 needs a CUDA device, not {device}; use bf16 or fp32")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(dtype, device: torch.device):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------- EMA

class EMA:
    """Exponential moving average of a module's parameters; buffers (BatchNorm statistics) are
    copied, as diffae's ema() does for the official model."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}
        self.params = {k for k, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.params:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> nn.Module:
        model.load_state_dict(self.shadow)
        return model


# ----------------------------------------------------------------------------------------------- logs

class CsvLog:
    """Append-only loss log (one row per logged step). Resuming appends to the same file; the
    columns are fixed by the first row written. Rows after ``resume_step`` (logged after the last
    checkpoint by a run that then stopped) are dropped first, so a resumed run never logs a step
    twice; a fresh run (``resume_step`` 0) starts a new file."""

    def __init__(self, path: Path, enabled: bool = True, resume_step: int | None = None):
        self.path, self.enabled, self.t0 = Path(path), enabled, time.time()
        self.fields = None
        if enabled and self.path.is_file():
            with self.path.open(newline="") as f:
                rows = list(csv.reader(f))
            self.fields = rows[0] if rows else None
            if resume_step is not None and self.fields and "step" in self.fields:
                i = self.fields.index("step")
                keep = [r for r in rows[1:] if len(r) > i and float(r[i]) <= resume_step]
                if len(keep) < len(rows) - 1:
                    if keep:
                        tmp = self.path.with_name(self.path.name + ".tmp")
                        with tmp.open("w", newline="") as f:
                            csv.writer(f).writerows([self.fields, *keep])
                        os.replace(tmp, self.path)
                    else:
                        self.path.unlink()
                        self.fields = None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time_s": round(time.time() - self.t0, 2),
               **{k: float(v) for k, v in values.items()}}
        new = self.fields is None
        if new:
            self.fields = list(row)
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def mean_over_ranks(values: dict, rt: Runtime) -> dict:
    """Average scalar losses over processes so the log shows the global batch."""
    vec = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    if rt.distributed:
        vec = vec.to(rt.device) if dist.get_backend() == "nccl" else vec
        dist.all_reduce(vec)
        vec = vec.cpu() / rt.world
    return dict(zip(values, vec.tolist()))


class TrainLoop:
    """Where a run is — step, epoch, batches of this epoch done — and its batches from there to
    cfg.max_steps: a resumed run continues mid-epoch on the items it had not trained yet."""

    def __init__(self, ds, cfg, rt: Runtime, resume: dict | None, desc: str):
        self.ds, self.cfg, self.rt, self.desc = ds, cfg, rt, desc
        self.step, self.epoch, self.done = (int(resume[k]) for k in ("step", "epoch", "done")) if resume \
            else (0, 0, 0)
        self.sampler, self.loader = epoch_loader(ds, cfg, rt)
        self.bar = None

    def __iter__(self):
        """(batch on the device, the step it trains); step and done already count it when it comes."""
        cfg, rt = self.cfg, self.rt
        self.bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (rt.main and cfg.progress),
                        desc=self.desc)
        try:
            while self.step < cfg.max_steps:
                self.ds.set_epoch(self.epoch)
                self.sampler.set_epoch(self.epoch, skip=self.done * cfg.batch_size)
                for batch in self.loader:
                    self.step, self.done = self.step + 1, self.done + 1
                    self.bar.update(1)
                    yield {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}, self.step - 1
                    if self.step >= cfg.max_steps:
                        return
                self.epoch, self.done = self.epoch + 1, 0
        finally:
            self.bar.close()

    def due(self, every: int) -> bool:
        """Time to log or save: every `every` steps, and at the last step."""
        return self.step % every == 0 or self.step == self.cfg.max_steps

    def position(self) -> dict:
        """What a checkpoint records to resume from here."""
        return {"step": self.step, "epoch": self.epoch, "done": self.done}


# ----------------------------------------------------------------------------------------------- checkpoints

LAST = "last.pt"


def save_training_state(out: Path, model: nn.Module, export_model: nn.Module, state: dict,
                        keep_every: int = 0, step: int = 0) -> Path:
    """``last.pt`` in the project format: ``state_dict`` = ``export_model``'s weights (what the
    inference loaders read: the EMA weights for stage 2), the rest (raw weights, optimizers, step,
    config) under extra keys that the loaders ignore. ``keep_every`` > 0 also keeps step copies."""
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(state)
    if model is not export_model:   # stage 2: raw weights beside the EMA ones
        extra["train_state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = out / LAST
    save_checkpoint(path, export_model, extra)
    if keep_every and step % keep_every == 0:
        save_checkpoint(out / f"step{step:08d}.pt", export_model, extra)
    return path


def load_training_state(out: Path):
    """The dict saved by save_training_state, or None when there is nothing to resume."""
    path = Path(out) / LAST
    return read_state_file(path) if path.is_file() else None


def optimizer_to(opt: torch.optim.Optimizer, device) -> None:
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, Tensor) and k != "step":
                st[k] = v.to(device)


# ----------------------------------------------------------------------------------------------- diffusion

class ForwardProcess:
    """The DDPM forward process the official model was trained with: T steps, linear betas."""

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        acp = torch.cumprod(1.0 - betas, dim=0)
        self.T = T
        self.sqrt_acp = acp.sqrt().float()
        self.sqrt_1m_acp = (1.0 - acp).sqrt().float()

    def sample_t(self, batch: int, device) -> Tensor:
        return torch.randint(0, self.T, (batch,), device=device)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps; x0 (B, ...), t (B,) int64."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = self.sqrt_acp.to(x0.device)[t].view(shape)
        s = self.sqrt_1m_acp.to(x0.device)[t].view(shape)
        return a * x0 + s * noise
