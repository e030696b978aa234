"""DDIM sampling for the stage-2 motion diffusion, numerically equal to the official sampler.

The sampler is a pure function over a denoiser callable ``denoise(x_t, t) -> eps``; the noise
schedule is plain data (``Schedule``). The float64 -> float32 casts below are deliberate: the
official code keeps its coefficients in float64 numpy and casts them to float32 per step, and
the clamp of x0 to [-1, 1] makes those roundings visible at t close to T.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean equality
class Schedule:
    """The retained steps of a respaced diffusion process.

    timesteps:      (N,) int64, ascending ORIGINAL timesteps (what the network receives)
    alphas_cumprod: (N,) float64, alpha-bar of the respaced process at those steps
    """
    timesteps: Tensor
    alphas_cumprod: Tensor
    _tables: dict = field(default_factory=dict, repr=False)   # per device: what the sampler reads

    def __len__(self) -> int:
        return int(self.timesteps.numel())

    def tables(self, device) -> tuple[Tensor, Tensor, Tensor]:
        """(timesteps (N,) int64, DDIM coefficients (N, 5) float32 for eta = 0, alpha-bar (N,) float32) on
        ``device``, computed and copied there once: a sampler that copied them per step would wait for
        the GPU at every step."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = (self.timesteps.to(device), _coefficients(self, 0.0).to(device),
                                    self.alphas_cumprod.float().to(device))
        return self._tables[device]


def valid_step_counts(T: int = 1000) -> list[int]:
    """Every step count a whole stride of the T-step process gives exactly. The official search tries
    strides 1..T-1 only, so e.g. a single step is not available."""
    return sorted({len(range(0, T, k)) for k in range(1, T)})


def nearby_step_counts(steps: int, T: int = 1000) -> list[int]:
    """The three valid counts below and above ``steps``."""
    valid = valid_step_counts(T)
    return [n for n in valid if n < steps][-3:] + [n for n in valid if n > steps][:3]


@functools.lru_cache(maxsize=None)   # one Schedule per setting: its device tables are then copied once a process
def ddim_schedule(steps: int, T: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> Schedule:
    """Linear-beta process respaced to ``steps`` evenly strided steps ("ddimN" respacing).

    The stride is the smallest k in 1..T-1 with len(range(0, T, k)) == steps; for 50 steps that
    is 20 (980..0), for 25 it is 40 (960..0). Counts no stride reaches raise ValueError.
    """
    stride = next((k for k in range(1, T) if len(range(0, T, k)) == steps), None)
    if stride is None:
        raise ValueError(f"cannot sample with {steps} DDIM steps: no integer stride gives exactly "
                         f"{steps} of {T} timesteps; nearby valid step counts: {nearby_step_counts(steps, T)}")
    betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    full = np.cumprod(1.0 - betas)
    kept = np.arange(0, T, stride)
    # Recompute alpha-bar through the respaced betas (1 - a_t / a_prev) like the official
    # respacing does: it differs from full[kept] in the last float64 bit.
    ratios = full[kept] / np.concatenate([[1.0], full[kept][:-1]])
    acp = np.cumprod(ratios)
    return Schedule(torch.from_numpy(kept.astype(np.int64)), torch.from_numpy(acp))


@torch.no_grad()
def ddim_sample(denoise: Denoiser, x_T: Tensor, schedule: Schedule, eta: float = 0.0,
                clip: bool = True, generator: Optional[torch.Generator] = None,
                on_step: Optional[Callable[[int, Tensor, Tensor, Tensor, Tensor], None]] = None,
                ) -> Tensor:
    """Run DDIM from x_T (B, F, M) down to x0 (B, F, M).

    denoise(x_t, t) gets t as an int64 (B,) tensor of ORIGINAL timesteps, last retained step
    first, and returns eps. on_step(i, t, x_in, eps, x0) is called after each step i = 0..N-1
    with that t, the network input, its eps and the (clamped) x0 prediction. With clip=True
    every x0 is clamped to [-1, 1] and eps is re-derived from it, so the result lies in
    [-1, 1]; the last step returns x0 exactly. eta > 0 adds the standard DDIM noise, drawn
    from generator (whose device it must be drawn on).
    """
    x = x_T
    B, dev = x.shape[0], x.device
    timesteps, coef, _ = schedule.tables(dev)
    if eta:
        coef = _coefficients(schedule, eta).to(dev)
    for i, idx in enumerate(reversed(range(len(schedule)))):
        # device tensors indexed by a Python int: no value is read back to the host inside the loop
        t = timesteps[idx].repeat(B)
        x_in = x
        eps = denoise(x_in, t)
        c0, c1, c2, c3, sig = coef[idx]
        x0 = c0 * x_in - c1 * eps
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        eps_used = (c0 * x_in - x0) / c1   # consistent with the clamped x0
        x = x0 * c2 + c3 * eps_used
        if eta > 0 and idx > 0:            # the last step (a_prev = 1) returns exactly x0
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                device=generator.device if generator is not None else dev)
            x = x + sig * noise.to(dev)
        if on_step is not None:
            on_step(i, t, x_in, eps, x0)
    return x


def _coefficients(schedule: Schedule, eta: float) -> Tensor:
    """(N, 5) float32: c0, c1, c2, c3, sigma of every retained step, on the CPU."""
    acp = schedule.alphas_cumprod.to(torch.float64).cpu()
    acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
    # As in the official sampler: the x0 coefficients are float64 arrays cast to float32, the
    # alpha-bars are cast to float32 and everything else is float32 arithmetic on them. These
    # roundings matter at t near T, where x0 = c0*x - ... multiplies x by ~100.
    c0 = torch.sqrt(1.0 / acp).float()                  # x0 = c0*x - c1*eps
    c1 = torch.sqrt(1.0 / acp - 1.0).float()
    a, a_prev = acp.float(), acp_prev.float()
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
    c2 = torch.sqrt(a_prev)                             # x' = c2*x0 + c3*eps + sigma*z
    c3 = torch.sqrt(1 - a_prev - sigma ** 2)
    return torch.stack([c0, c1, c2, c3, sigma], dim=1)
