"""Copies between the host and a GPU that do not stall the engine, and clocks that measure GPU work.

A copy from ordinary (pageable) host memory to a GPU, or back, makes the host wait for the GPU; from page-
locked (pinned) memory it can be queued (non_blocking) behind the work already queued. The engine copies
in (features, noise) and out (pictures, motion codes) once per hop: in through a pinned staging copy, out
into pinned buffers kept per shape, then one wait for all of them (``to_host``: the hop's only wait).
On a CPU these are plain tensors.

Timing without waiting: a clock read on the host after a GPU call measures when the work was queued, not
when it ran, and waiting before each read (three times a hop) would stall the pipeline. ``Span`` records
two CUDA events in the stream around a stage instead; they are read once the hop's results are back, when
the events have long passed. On a CPU the work has run when the call returns, so a Span reads a clock.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import torch

from models.frontend import queued as to_device   # noqa: F401 -- t on a device; to a GPU without waiting

_local = threading.local()   # per thread (an engine worker): (shape, dtype) -> pinned host tensor, reused


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
    wait(tensors[0].device)
    return [s.numpy().copy() for s in staged]    # copied out: the buffers are reused next hop


def wait(device: torch.device) -> None:
    """The host waits until everything queued on ``device``'s stream has run (nothing to wait for on a
    CPU). The engine calls it once a hop, from to_host; after it, every Span recorded before is readable."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def index(values, device: torch.device) -> torch.Tensor:
    """An int64 index tensor of ``values`` on ``device``, copied without waiting."""
    return to_device(torch.tensor(values, dtype=torch.int64), device)


def uses_events(device: torch.device) -> bool:
    """Whether Spans on ``device`` are timed with CUDA events (work queued, not yet run) or a clock."""
    return device.type == "cuda"


class Span:
    """How long the work inside ``with span:`` took. On a CPU: ``clock`` read around it (the session's
    clock, so costs compare with its deadlines). On a GPU: events recorded in the stream around it, so the
    time is the GPU's work, not the host's queueing; ``seconds`` may be read only after a wait() (to_host)
    that followed the block: reading it earlier would itself make the host wait."""

    def __init__(self, device: torch.device, clock=time.perf_counter):
        self.device, self.clock = device, clock
        self.events = uses_events(device)

    def _mark(self):
        if not self.events:
            return self.clock()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def __enter__(self) -> "Span":
        self.start = self._mark()
        return self

    def __exit__(self, *exc) -> None:
        self.end = self._mark()

    @property
    def seconds(self) -> float:
        if self.events:
            return self.start.elapsed_time(self.end) / 1000.0    # ms; raises if the events have not run
        return self.end - self.start


class StageTimer:
    """Seconds per stage of a stream's hops, from Spans read together after the hop's wait.

    ``with timer.stage("motion"): ...`` times work done for this stream; ``timer.add(stage, span, share)``
    counts ``share`` of a Span timed over work shared with other streams (avatar/batch.py); ``read()`` ->
    {stage: seconds} of everything counted since the last read, and must follow a wait (to_host)."""

    def __init__(self, device: torch.device, clock=time.perf_counter):
        self.device, self.clock = device, clock
        self._spans: list = []                     # (stage, span, share) not read yet

    def stage(self, name: str) -> Span:
        span = Span(self.device, self.clock)
        self._spans.append((name, span, 1.0))
        return span

    def add(self, name: str, span: Span, share: float = 1.0) -> None:
        self._spans.append((name, span, share))

    def read(self) -> dict:
        out: dict = {}
        for name, span, share in self._spans:
            out[name] = out.get(name, 0.0) + span.seconds * share
        self._spans.clear()
        return out
