"""What the loaded models reach on this machine: a short measurement of one streaming hop, said at start.

The streaming engine needs, per hop of H frames (H / 25 s of audio): the features of the hop, one motion
window, and H renders. ``measure_rate`` times each stage once after a warm-up (which also absorbs
torch.compile), on the engine's own settings, and ``EngineRate`` turns that into the frames per second the
engine can draw while keeping up with live audio; an engine that cannot draw every frame holds the picture
for the others (the animator decides which), and one whose features and motion alone take longer than the
audio cannot keep up at all.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .features import StreamingFeatures
from .motion import MotionConfig, MotionStream
from .pipeline import Models, PortraitCode
from .timebase import FPS, SAMPLES_PER_FRAME


@dataclass(frozen=True)
class EngineRate:
    hop: int
    features_s: float      # per hop
    motion_s: float        # per hop
    render_s: float        # per frame

    @property
    def rtf(self) -> float:
        """Compute time / audio time with every frame drawn."""
        return (self.features_s + self.motion_s + self.hop * self.render_s) / (self.hop / FPS)

    @property
    def fps(self) -> float:
        """Frames per second drawn while keeping up with the audio (25 when rtf <= 1)."""
        spare = self.hop / FPS - self.features_s - self.motion_s
        if spare <= 0:
            return 0.0
        return min(float(FPS), FPS * spare / self.render_s / self.hop)

    def line(self) -> str:
        hop_ms = 1000 * self.hop / FPS
        head = (f"features {1000 * self.features_s:.0f} ms + motion {1000 * self.motion_s:.0f} ms per "
                f"{self.hop}-frame hop ({hop_ms:.0f} ms of audio), render {1000 * self.render_s:.0f} ms/frame")
        if self.fps >= FPS:
            return f"{head}: real time, all 25 frames/s (real-time factor {self.rtf:.2f})"
        if self.fps == 0:
            return (f"{head}: features and motion alone take longer than the audio, so this machine cannot "
                    f"keep up with live speech (real-time factor {self.rtf:.1f})")
        return (f"{head}: about {self.fps:.1f} of 25 frames/s drawn, the picture held in between "
                f"(real-time factor {self.rtf:.1f} with every frame drawn)")


@torch.inference_mode()
def measure_rate(models: Models, code: PortraitCode, hop: int = 10, lookahead: int = 5, context: int = 10,
                 audio_context: int = 25, steps: int = 10, hubert: str = "window", renders: int = 2) -> EngineRate:
    """Time the stages of one streaming hop (after one warm-up hop) with these engine settings."""
    audio = models.stage2.dims.audio
    feats = StreamingFeatures(models.hubert, audio, block=hop, context=audio_context, lookahead=lookahead,
                              lookahead_rows=True, hubert=hubert)
    motion = MotionStream(models.stage2, code.wa, code.alpha0,
                          MotionConfig(hop=hop, context=context, lookahead=lookahead, steps=steps))
    rng = np.random.default_rng(0)
    times = {"features": [], "motion": [], "render": []}
    past = None                                      # the last window's features (the next one's context)
    # the first hop warms up (and compiles); the second has its full motion context, as later hops do
    for n in ((hop + lookahead) * SAMPLES_PER_FRAME + 80, hop * SAMPLES_PER_FRAME):
        t0 = time.perf_counter()
        with models.autocast():
            feats.push(0.05 * rng.standard_normal(n).astype(np.float32))
            blocks = feats.ready()
        t1 = time.perf_counter()
        for start, f in blocks:
            axis, rows = (1, 2) if f.dim() == 3 else (0, 4)        # hubert (L, rows, H), mfcc (rows, 39)
            if motion.n_ctx:         # the committed frames' features lead the window, as in the animator
                f = torch.cat([past.narrow(axis, past.shape[axis] - rows * motion.n_ctx, rows * motion.n_ctx), f],
                              axis)
            past = f
            with models.autocast():
                codes = motion.step(start, f[None].to(models.device))
        t2 = time.perf_counter()
        times["features"].append(t1 - t0)
        times["motion"].append(t2 - t1)
    for _ in range(renders + 1):
        t0 = time.perf_counter()
        with models.autocast():
            img = models._render(code.wa, codes[:1], code.feats)
        img.float().cpu()
        times["render"].append(time.perf_counter() - t0)
    return EngineRate(hop, times["features"][-1], times["motion"][-1], min(times["render"][1:]))
