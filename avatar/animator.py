"""The streaming engine: audio chunks of any size in, 25 fps frames that carry their own audio out.

    push(AudioChunk) -> StreamingFeatures (HuBERT/MFCC over [context | hop | lookahead])
                     -> MotionStream (DDIM over a window, conditioned on the last committed code)
                     -> renderer (portrait features cached) -> AvFrame(image, its 640 samples, pts)

A frame's audio travels with it, so audio and video cannot drift. The configured latency is
hop + lookahead frames (a frame waits for the rest of its hop and the lookahead audio) plus compute;
``latency_s`` states it, and every AvFrame records when its last sample was pushed and when it was made.
Synchronous: one thread owns an Animator (the realtime shell's worker).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace

import numpy as np
import torch

from .features import StreamingFeatures
from .motion import MotionConfig, MotionStream
from .pipeline import Controls, Models, PortraitCode
from .portrait import to_uint8
from .timebase import SAMPLES_PER_FRAME, AudioChunk, AvFrame


@dataclass(frozen=True)
class StreamConfig:
    hop: int = 10               # frames committed per motion window (0.4 s)
    context: int = 10           # committed frames fed back into each window
    lookahead: int = 5          # frames of future audio each window sees
    audio_context: int = 25     # frames of past audio HuBERT sees for each block
    steps: int = 10             # DDIM steps per window
    continuity: str = "inpaint"
    normalize: str = "running"  # HuBERT input normalisation while the utterance is unknown
    hubert: str = "window"      # "window" | "incremental" (avatar.features: how HuBERT streams)
    seed: int = 0
    render_batch: int = 0       # frames per renderer call; 0: the whole hop on a GPU, 1 on a CPU

    @property
    def latency_frames(self) -> int:
        return self.hop + self.lookahead


class StreamingAnimator:
    """push / flush / reset, as the realtime shell's Animator protocol asks."""

    def __init__(self, models: Models, code: PortraitCode, config: StreamConfig = StreamConfig(),
                 controls: Controls = Controls()):
        self.models, self.code, self.config = models, code, config
        self.controls = controls
        self.features = StreamingFeatures(models.hubert, models.stage2.dims.audio, block=config.hop,
                                          context=config.audio_context, lookahead=config.lookahead,
                                          normalize=config.normalize, lookahead_rows=True, hubert=config.hubert)
        self.motion = MotionStream(models.stage2, code.wa, code.alpha0, MotionConfig(
            hop=config.hop, context=config.context, lookahead=config.lookahead, steps=config.steps,
            continuity=config.continuity, seed=config.seed))
        self.batch = config.render_batch or (config.hop if models.device.type == "cuda" else 1)
        self.timings = {"features": 0.0, "motion": 0.0, "render": 0.0}
        self._new_segment(0)

    @property
    def latency_frames(self) -> int:
        """Frames between a sample's arrival and its frame, compute aside: the hop, the lookahead and the
        few samples past the lookahead that the last feature rows need."""
        return self.config.latency_frames + 1

    @property
    def latency_s(self) -> float:
        """Configured latency without compute."""
        return self.latency_frames / 25

    def set_controls(self, controls: Controls) -> None:
        """New pose / location / scale (None: predicted); they take effect from the next hop."""
        self.controls = controls

    def _new_segment(self, frame: int) -> None:
        self._origin = frame                        # global frame where this segment's audio starts
        self._audio = np.zeros(0, np.float32)       # segment audio not yet handed out with frames
        self._audio_frame = frame                   # global frame of self._audio[0]
        self._pushes = deque()  # (segment samples pushed so far, time) per push
        self._samples = 0
        self._ctx_feats = None                      # features of the last committed frames (context)

    def push(self, chunk: AudioChunk) -> list[AvFrame]:
        samples = np.asarray(chunk.samples, dtype=np.float32).reshape(-1)
        self._audio = np.concatenate([self._audio, samples])
        self._samples += len(samples)
        self._pushes.append((self._samples, time.monotonic()))
        return self._run(self._timed("features", self._push_features, samples), final=False)

    def _push_features(self, samples):
        self.features.push(samples)
        return self.features.ready()

    def flush(self) -> list[AvFrame]:
        """End of the utterance: the last partial frame is padded with silence."""
        self._pushes.append((self._samples, time.monotonic()))
        blocks = self._timed("features", self.features.finish)
        pad = (-self._samples) % SAMPLES_PER_FRAME
        self._audio = np.concatenate([self._audio, np.zeros(pad, np.float32)])
        frames = self._run(blocks, final=True)
        self._new_segment(self.features.frames_done)
        return frames

    def reset(self) -> None:
        """Interrupt: pending audio is dropped; the last motion code is kept so the head does not jump."""
        self.features.reset()
        self.motion.reset(start=self.features.frames_done)
        self._new_segment(self.features.frames_done)

    def _timed(self, stage, fn, *args):
        t0 = time.perf_counter()
        with self.models.autocast():      # bf16 mode runs HuBERT, the denoiser and the renderer in bf16
            out = fn(*args)
        self.timings[stage] += time.perf_counter() - t0
        return out

    @torch.inference_mode()
    def _run(self, blocks, final: bool) -> list[AvFrame]:
        out = []
        for i, (start, feats) in enumerate(blocks):
            last = final and i == len(blocks) - 1
            codes = self._timed("motion", self._motion_step, start, feats, last)
            out += self._timed("render", self._render, start, codes)
        return out

    def _motion_step(self, start: int, feats: torch.Tensor, final: bool) -> torch.Tensor:
        """feats: the block's frames plus its lookahead frames; the context frames' features are kept here."""
        rows = 2 if self.models.stage2.dims.audio == "hubert" else 4
        axis = 1 if feats.dim() == 3 else 0          # hubert (L, rows, H), mfcc (rows, 39)
        n_ctx = self.motion.n_ctx
        ctx = self._ctx_feats
        if n_ctx and ctx is not None:
            window = torch.cat([ctx.narrow(axis, ctx.shape[axis] - rows * n_ctx, rows * n_ctx), feats], axis)
        else:
            window = feats
        codes = self.motion.step(start, window[None].to(self.models.device), self._window_controls(start),
                                 final=final)
        committed = window.narrow(axis, 0, rows * (n_ctx + len(codes)))
        keep = rows * self.config.context
        self._ctx_feats = committed.narrow(axis, max(0, committed.shape[axis] - keep),
                                           min(keep, committed.shape[axis]))
        return codes

    def _window_controls(self, start: int) -> dict:
        c = self.controls
        pose = None
        if c.pose is not None:   # a per-frame pose (a file) is indexed by the output frame
            p = np.asarray(c.pose, np.float32).reshape(-1, 3)
            pose = p[min(start, len(p) - 1)]
        return {"pose": pose, "location": c.location, "scale": c.scale}

    def _render(self, start: int, codes: torch.Tensor) -> list[AvFrame]:
        frames = []
        for i in range(0, len(codes), self.batch):
            imgs = self.models._render(self.code.wa, codes[i:i + self.batch], self.code.feats)
            frames += list(to_uint8(imgs.float().cpu()))
        now = time.monotonic()
        out = []
        for k, image in enumerate(frames):
            pts = start + k
            a = (pts - self._audio_frame) * SAMPLES_PER_FRAME
            audio = self._audio[a:a + SAMPLES_PER_FRAME].copy()
            out.append(AvFrame(image, audio, pts, pushed_at=self._pushed_time(pts), produced_at=now))
        done = (start + len(frames) - self._audio_frame) * SAMPLES_PER_FRAME
        self._audio = self._audio[done:]
        self._audio_frame = start + len(frames)
        # forget push times no later frame can need (a live session may never end its segment)
        need = (self._audio_frame - self._origin) * SAMPLES_PER_FRAME + 1
        while len(self._pushes) > 1 and self._pushes[0][0] < need:
            self._pushes.popleft()
        return out

    def _pushed_time(self, pts: int) -> float:
        """When the last sample of frame pts was pushed (flush time for the silence padding)."""
        need = min((pts + 1 - self._origin) * SAMPLES_PER_FRAME, self._samples)
        return next((t for n, t in self._pushes if n >= need), self._pushes[-1][1])


def make_animator(models: Models, code: PortraitCode, controls: Controls = Controls(), **overrides):
    """A StreamingAnimator with StreamConfig defaults overridden by keyword."""
    return StreamingAnimator(models, code, replace(StreamConfig(), **overrides), controls)
