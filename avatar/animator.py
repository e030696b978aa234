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

from .device import StageTimer, index, to_device, to_host
from .features import StreamingFeatures
from .motion import MotionConfig, MotionStream, sample_windows
from .pipeline import Controls, Models, PortraitCode, check_controls, control_names
from .portrait import uint8_images
from .timebase import FPS, SAMPLES_PER_FRAME, AudioChunk, AvFrame


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


@dataclass(frozen=True, eq=False)
class Block:
    """A hop whose audio features are ready: frames [start, start + hop) (the features hold its lookahead
    too); last: the end of the utterance."""
    start: int
    feats: torch.Tensor
    last: bool


class StreamingAnimator:
    """push / flush / reset, as the realtime shell's Animator protocol asks; push_iter / flush_iter hand
    out each frame as soon as it is made.

    Deadlines: a chunk that says when its frame is due (AudioChunk.due, on the clock ``now`` reads) lets
    an engine slower than real time draw only the frames it can still finish in time, and leave the time
    the next hop's features and motion need; the others come out with image None (the shell holds the
    last picture). Costs are measured on the same clock (``now``: the session's time source). Motion and audio are always complete, so the lips stay on the words at a lower picture
    rate. Without due times (offline rendering) every frame is drawn.
    """

    def __init__(self, models: Models, code: PortraitCode, config: StreamConfig = StreamConfig(),
                 controls: Controls = Controls(), now=time.monotonic):
        self.models, self.code, self.config, self.now = models, code, config, now
        self.set_controls(controls)
        self.features = StreamingFeatures(models.hubert, models.stage2.dims.audio, block=config.hop,
                                          context=config.audio_context, lookahead=config.lookahead,
                                          normalize=config.normalize, lookahead_rows=True, hubert=config.hubert)
        self.motion = MotionStream(models.stage2, code.wa, code.alpha0, MotionConfig(
            hop=config.hop, context=config.context, lookahead=config.lookahead, steps=config.steps,
            continuity=config.continuity, seed=config.seed), denoiser=models.denoiser, static=models.static_shapes)
        self.batch = config.render_batch or (config.hop if models.device.type == "cuda" else 1)
        self.timings = {"features": 0.0, "motion": 0.0, "render": 0.0}
        # the stages' costs, on the session's clock (a GPU's: its events), read after each hop's one wait
        self.timer = StageTimer(models.device, now)
        self.skipped = 0                            # frames not drawn for lack of time
        self._render_cost = deque(maxlen=8)         # seconds per drawn frame, recent
        self._hop_cost = deque(maxlen=4)            # features + motion seconds per hop, recent
        self._due = None                            # (frame, when it is shown) from the latest chunk
        self._drawn = False                         # the first picture is always drawn: nothing to hold yet
        self._since_drawn = 0                       # frames held since the last drawn one (spacing)
        self._new_segment(0)

    @property
    def latency_frames(self) -> int:
        """Frames between a sample's arrival and its frame, compute aside: the hop, the lookahead and the
        few samples past the lookahead that the last feature rows need."""
        return self.config.latency_frames + 1

    @property
    def latency_s(self) -> float:
        """Configured latency without compute."""
        return self.latency_frames / FPS

    @property
    def control_names(self) -> tuple[str, ...]:
        return control_names(self.models)

    @property
    def stats(self) -> dict:
        return {"skipped_renders": self.skipped}

    def set_controls(self, controls: Controls) -> None:
        """New pose / location / scale (None: predicted); they take effect from the next hop. A control the
        model lacks or a value out of range raises AnitalkerError here, at the caller."""
        check_controls(self.models, controls)
        self.controls = controls

    def _new_segment(self, frame: int) -> None:
        # the new segment's features have no left context, so neither has its first motion window (it
        # continues from the last code); without this, speech after a flush failed at its first hop
        self.motion.reset(start=frame)
        self._origin = frame                        # global frame where this segment's audio starts
        self._audio = np.zeros(0, np.float32)       # segment audio not yet handed out with frames
        self._audio_frame = frame                   # global frame of self._audio[0]
        self._pushes = deque()  # (segment samples pushed so far, time) per push
        self._samples = 0
        self._ctx_feats = None                      # features of the last committed frames (context)

    def push(self, chunk: AudioChunk) -> list[AvFrame]:
        return list(self.push_iter(chunk))

    def flush(self) -> list[AvFrame]:
        return list(self.flush_iter())

    def push_iter(self, chunk: AudioChunk):
        return self._hops(chunk)

    def flush_iter(self):
        """End of the utterance: the last partial frame is padded with silence."""
        return self._hops(None)

    def _hops(self, chunk):
        for block in self.accept(chunk):
            window, x0 = self._timed("motion", lambda: (w := self.plan(block), sample_windows([w])[0]))
            yield from self.frames(block, self.commit(block, window, x0))

    def accept(self, chunk: AudioChunk | None) -> list[Block]:
        """Take a chunk of audio (None: the end of the utterance) -> the hops it completes, in order. The
        engine's work in three steps (plan, commit, frames) so that a shared engine can sample the hops
        of several sessions together (avatar/batch.py)."""
        if chunk is not None:
            samples = np.asarray(chunk.samples, dtype=np.float32).reshape(-1)
            if chunk.due is not None:
                self._due = (self._origin + self._samples // SAMPLES_PER_FRAME, chunk.due)
            self._audio = np.concatenate([self._audio, samples])
            self._samples += len(samples)
            self._pushes.append((self._samples, time.monotonic()))
            ready = self._timed("features", self._push_features, samples, chunk.idle)
        else:
            self._pushes.append((self._samples, time.monotonic()))
            ready = self._timed("features", self.features.finish)
            pad = (-self._samples) % SAMPLES_PER_FRAME
            self._audio = np.concatenate([self._audio, np.zeros(pad, np.float32)])
            if not ready:
                self._new_segment(self.features.frames_done)
        return [Block(start, feats, chunk is None and i == len(ready) - 1) for i, (start, feats) in enumerate(ready)]

    def _push_features(self, samples, idle):
        self.features.push(samples, idle=idle)
        return self.features.ready()

    def reset(self, last: AvFrame | None = None) -> None:
        """Interrupt: pending audio is dropped; motion continues from ``last`` (the frame the viewer saw
        last), else from the last committed code, so the head does not jump."""
        code = None if last is None else last.meta.get("motion")
        self._drawn = last is not None         # nothing shown yet: the next frame must be drawn
        self.features.reset()
        self.motion.reset(start=self.features.frames_done, code=None if code is None else torch.as_tensor(code))
        self._new_segment(self.features.frames_done)

    def _timed(self, stage, fn, *args):
        # bf16 mode: HuBERT, denoiser, renderer in bf16; no wait for a GPU here (the Span's events)
        with self.timer.stage(stage), self.models.autocast(), torch.inference_mode():
            return fn(*args)

    def _settle(self, drawn: int) -> None:
        """After a wait for the device (to_host): the stages timed since the last one have run, so their
        seconds count now: into ``timings``, a hop's features and motion into the hop cost the next hops
        plan with, and the render's seconds over the ``drawn`` frames into the cost of a frame."""
        spent = self.timer.read()
        for stage, seconds in spent.items():
            self.timings[stage] += seconds
        if "motion" in spent:                       # a hop's motion (and the features since the last hop)
            self._hop_cost.append(spent["motion"] + spent.get("features", 0.0))
        if drawn:
            self._drew(drawn, spent.get("render", 0.0))

    def plan(self, block: Block):
        """The block's motion window: its features with the committed context's in front (kept here)."""
        rows = 2 if self.models.stage2.dims.audio == "hubert" else 4
        axis = 1 if block.feats.dim() == 3 else 0          # hubert (L, rows, H), mfcc (rows, 39)
        n_ctx = self.motion.n_ctx
        ctx = self._ctx_feats                               # on the models' device, from commit
        feats = to_device(block.feats, self.models.device)
        if n_ctx and ctx is not None:
            feats = torch.cat([ctx.narrow(axis, ctx.shape[axis] - rows * n_ctx, rows * n_ctx), feats], axis)
        return self.motion.plan(block.start, feats[None],
                                self._window_controls(block.start), final=block.last)

    def commit(self, block: Block, window, x0: torch.Tensor) -> torch.Tensor:
        """The sampled window's new codes (h, M); its features become the next window's context."""
        codes = self.motion.commit(window, x0)
        rows = 2 if self.models.stage2.dims.audio == "hubert" else 4
        feats = window.audio[0]                             # stays where the next window needs it
        axis = 1 if feats.dim() == 3 else 0
        committed = feats.narrow(axis, 0, rows * (window.n_ctx + len(codes)))
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

    def _deadline(self, frame: int) -> float | None:
        if self._due is None:
            return None
        f0, t0 = self._due
        return t0 + (frame - f0) / FPS

    def _in_time(self, frame: int, drawn_before: int, limit: float | None) -> bool:
        """Whether drawing ``frame`` (after ``drawn_before`` more in the same batch) ends before it is due
        and before ``limit``, when the next hop must start to be on time."""
        due = self._deadline(frame)
        if due is None or not self._drawn:
            return True
        cost = max(self._render_cost, default=0.0)
        end = self.now() + cost * (drawn_before + 1)
        return end <= due and (limit is None or end <= limit)

    def frames(self, block: Block, codes: torch.Tensor):
        """The hop's frames in order, drawn or held (image None), each with exactly its 640 samples. The
        end of the utterance starts a new segment once its last frame is out."""
        start = block.start
        limit = self._limit(start, codes, block.last)
        motion = None                                # copied back once per hop, with the first pictures
        for g in range(0, len(codes), self.batch):
            group = range(start + g, start + min(g + self.batch, len(codes)))
            draw = self._choose(group, limit, start + len(codes))
            images = {}
            if draw:
                idx = index([p - start for p in draw], codes.device)
                imgs = self._timed("render", lambda: uint8_images(self.models._render(
                    self.code.wa, codes[idx], self.code.feats)))
                host = to_host(imgs, *([codes.float()] if motion is None else []))   # the hop's one wait
                images, motion = dict(zip(draw, host[0])), host[1] if motion is None else motion
            elif motion is None:
                motion = to_host(codes.float())[0]
            self._settle(len(draw))
            yield from self._emit(group, draw, images, motion, start)
        if block.last:
            self._new_segment(self.features.frames_done)

    def to_draw(self, block: Block, codes: torch.Tensor) -> list[int]:
        """For a render shared with other sessions (avatar/batch.py): the pts of the hop to draw, the
        whole hop deciding at once (as a GPU draws it, in one batch)."""
        end = block.start + len(codes)
        return self._choose(range(block.start, end), self._limit(block.start, codes, block.last), end)

    def drawn_frames(self, block: Block, motion: np.ndarray, draw: list[int], images):
        """The hop's frames when ``images`` (uint8, one per pts in ``draw``) were rendered elsewhere (this
        session's share of the shared stages added to ``timer``); motion: the hop's codes, copied back
        with them. As frames() otherwise."""
        self._settle(len(draw))
        yield from self._emit(range(block.start, block.start + len(motion)), draw, dict(zip(draw, images)),
                              motion, block.start)
        if block.last:
            self._new_segment(self.features.frames_done)

    def _limit(self, start: int, codes: torch.Tensor, last: bool) -> float | None:
        nxt = self._deadline(start + len(codes))
        return None if last or nxt is None else nxt - max(self._hop_cost, default=0.0)

    def _choose(self, group: range, limit: float | None, end: int) -> list[int]:
        """The frames of ``group`` to draw; ``end``: the hop's end. Each drawn frame must be in time, and
        when the time left before ``limit`` affords fewer frames than the hop has left, the drawn frames
        are spread over them (_bunched). Drawing while time lasts drew as many, but in bursts: on 2 cores
        (`live --fast`, ~10 of 25 frames drawn) four or five frames in a row at 25 frames/s, then the
        picture frozen for 160-280 ms, every hop."""
        draw = []
        for pts in group:
            if self._in_time(pts, len(draw), limit) and not self._bunched(pts, len(draw), limit, end):
                draw.append(pts)
                self._since_drawn = 0
            else:
                self._since_drawn += 1
        return draw

    def _bunched(self, pts: int, drawn_before: int, limit: float | None, end: int) -> bool:
        """Whether drawing ``pts`` now would bunch the pictures: the time left affords n more frames of
        the m the hop has from pts on (n < m), so a frame is drawn once the frames held since the last drawn
        one reach m / n - 1 (Bresenham's rule: n frames, evenly spaced, the last near the hop's end)."""
        cost = max(self._render_cost, default=0.0)
        if limit is None or not self._drawn or cost <= 0:         # no limit, or drawing costs nothing
            return False
        afford = (limit - self.now()) / cost - drawn_before
        return (self._since_drawn + 1) * afford < end - pts

    def _drew(self, n: int, seconds: float) -> None:
        self._render_cost.append(seconds / n)
        self._drawn = True

    def _emit(self, group: range, draw: list[int], images: dict, motion, start: int):
        self.skipped += len(group) - len(draw)
        now = time.monotonic()
        for pts in group:
            yield AvFrame(images.get(pts), self._take_audio(pts), pts, pushed_at=self._pushed_time(pts),
                          produced_at=now, meta={"motion": motion[pts - start]})

    def _take_audio(self, pts: int) -> np.ndarray:
        """Frame pts's 640 samples; frames are taken in order, so what is before them is dropped."""
        a = (pts - self._audio_frame) * SAMPLES_PER_FRAME
        audio = self._audio[a:a + SAMPLES_PER_FRAME].copy()
        self._audio = self._audio[a + SAMPLES_PER_FRAME:]
        self._audio_frame = pts + 1
        # forget push times no later frame can need (a live session may never end its segment)
        need = (self._audio_frame - self._origin) * SAMPLES_PER_FRAME + 1
        while len(self._pushes) > 1 and self._pushes[0][0] < need:
            self._pushes.popleft()
        return audio

    def _pushed_time(self, pts: int) -> float:
        """When the last sample of frame pts was pushed (flush time for the silence padding)."""
        need = min((pts + 1 - self._origin) * SAMPLES_PER_FRAME, self._samples)
        return next((t for n, t in self._pushes if n >= need), self._pushes[-1][1])


def make_animator(models: Models, code: PortraitCode, controls: Controls = Controls(), **overrides):
    """A StreamingAnimator with StreamConfig defaults overridden by keyword."""
    return StreamingAnimator(models, code, replace(StreamConfig(), **overrides), controls)
