"""Copies between the host and a GPU that do not stall the engine, and clocks that measure GPU work.

A copy from ordinary (pageable) host memory to a GPU, or back, makes the host wait for the GPU; from page-
locked (pinned) memory it can be queued (non_blocking) behind the work already queued. The engine copies
in (features, noise) and out (pictures, motion codes) once per hop: in through a pinned staging copy, out
into pinned buffers kept per shape, then one wait for all of them. On a CPU these are plain tensors.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

_local = threading.local()   # per thread (an engine worker): (shape, dtype) -> pinned host tensor, reused


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on ``device``; a CPU tensor goes to a GPU through pinned memory, queued without waiting."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """numpy copies of ``tensors``; from a GPU: each queued into its pinned buffer, then one wait."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.numpy() for t in tensors]
    buffers = _local.__dict__.setdefault("buffers", {})
    staged = []
    for t in tensors:
        key = (tuple(t.shape), t.dtype)
        if key not in buffers:
            buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staged.append(buffers[key].copy_(t, non_blocking=True))
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [s.numpy().copy() for s in staged]    # copied out: the buffers are reused next hop


def synchronize(device: torch.device) -> None:
    """Before a clock is read: on a GPU, wait until the queued work has run, so the time is its cost."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
