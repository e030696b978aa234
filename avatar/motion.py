"""Sliding-window motion: stage-2 DDIM run every hop over a short window, so motion streams.

Every hop of H frames the stream samples one window of frames [lo, hi):

    [ context: committed frames | H new frames (committed now) | lookahead (re-made next hop) ]
      lo = start - n_ctx          start            start + H             hi

conditioned on the portrait's ``wa`` and, as ``alpha0``, on the code of frame lo - 1 (the portrait's own
code for the first window): the model was trained with the previous frame's code as its hint
(ANITALKER.md §2.5), so this is its native way to continue. The initial noise of a frame comes from
``motion_noise`` and does not depend on the window it falls in, so a seed and the settings fix the motion
however the audio was chunked, and one window over the whole input equals the one-pass offline generation
(pipeline.generate_motion draws the same noise). How windows join (``MotionConfig.continuity``):

- "inpaint": the context frames are known. Before every denoiser call they are replaced by their
  forward-noised values sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with x0 = the committed codes and eps =
  their own initial noise (RePaint with eta = 0 DDIM), so the new frames are sampled to continue them.
- "crossfade": the context frames are re-sampled freely; the first ``crossfade`` committed frames are
  blended from the previous window's lookahead prediction of them (weight falling to 0) into the new one.
- "inpaint+crossfade": both (the lookahead being blended from was itself sampled to continue the context).
- "none": the context frames are re-sampled and the new frames are taken as they come.
bench/seams.py measures the seams each leaves.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from models.errors import AnitalkerError
from models.sampler import ddim_sample, ddim_schedule
from models.stage2 import Stage2

from .device import to_device

NOISE_BLOCK = 64          # frames per independently seeded noise block
CONTINUITY = ("inpaint", "crossfade", "inpaint+crossfade", "none")


def _block_seed(seed: int, block: int) -> int:
    # A hash, not seed + block, so neighbouring seeds do not share shifted noise blocks.
    digest = hashlib.blake2b(f"{seed}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def motion_noise(seed: int, start: int, end: int, dim: int) -> Tensor:
    """Initial DDIM noise for frames [start, end): (1, end - start, dim) float32 on the CPU.

    Frame f's values depend only on (seed, f, dim): block f // 64 is drawn from its own CPU generator,
    so any window, and the whole utterance, see the same noise for the same frame.
    """
    if not 0 <= start <= end:
        raise ValueError(f"bad frame range [{start}, {end})")
    blocks = [torch.randn(NOISE_BLOCK, dim, generator=torch.Generator().manual_seed(_block_seed(seed, b)))
              for b in range(start // NOISE_BLOCK, -(-end // NOISE_BLOCK))]
    if not blocks:
        return torch.zeros(1, 0, dim)
    first = (start // NOISE_BLOCK) * NOISE_BLOCK
    return torch.cat(blocks)[start - first:end - first].unsqueeze(0)


@dataclass(frozen=True)
class MotionConfig:
    hop: int = 10             # frames committed per window
    context: int = 10         # committed frames fed back into the window
    lookahead: int = 5        # frames sampled past the hop (audio the caller must wait for)
    steps: int = 10           # DDIM steps per window (a count ddim_schedule accepts)
    continuity: str = "inpaint"   # one of CONTINUITY
    crossfade: int = 4        # frames blended under "crossfade"
    seed: int = 0

    def __post_init__(self):   # user settings: say what to change, as AnitalkerError
        if self.continuity not in CONTINUITY:
            raise AnitalkerError(f"continuity must be one of {CONTINUITY}, got {self.continuity!r}")
        if self.hop < 1 or self.context < 0 or self.lookahead < 0 or self.crossfade < 0:
            raise AnitalkerError(f"need hop >= 1 and context, lookahead, crossfade >= 0: {self}")
        try:
            ddim_schedule(self.steps)
        except ValueError as e:
            raise AnitalkerError(str(e)) from None


class MotionStream:
    """Motion codes for a stream of audio, one hop at a time (synchronous, one owner).

    wa: (1, style_dim), alpha0: (1, M) from the portrait. ``window(start)`` says which frames' audio
    ``step(start, ...)`` wants; ``timings`` holds the last step's seconds (condition, sample, total);
    ``on_step`` is passed to ddim_sample for per-DDIM-step hooks. denoiser: a compiled copy of
    stage2.eps (Models.denoiser), None: stage2.eps. static: every window is sampled at one shape, padded
    to ``frames_static`` frames (and batches of windows to 1, 2, 4, ... rows), so that a compiled denoiser
    runs as one CUDA graph.
    """

    def __init__(self, stage2: Stage2, wa: Tensor, alpha0: Tensor, config: MotionConfig = MotionConfig(),
                 on_step: Optional[Callable] = None, denoiser: Optional[Callable] = None, static: bool = False):
        self.stage2, self.wa, self.alpha0, self.config = stage2, wa, alpha0, config
        self.denoiser = denoiser                  # None: stage2.eps, looked up when sampling
        self.frames_static = config.context + config.hop + config.lookahead if static else 0
        self.schedule = ddim_schedule(config.steps)
        self.on_step = on_step
        self.timings: dict = {}
        self.next = 0                             # first uncommitted frame
        # The code of the frame before the first window, then the committed codes: (1, <= context+1, M).
        # Its first row is the next window's hint, the rest its context.
        self.tail = alpha0.reshape(1, 1, -1)
        self.pending: Optional[Tensor] = None     # last window's lookahead prediction (1, la, M)

    def reset(self, start: Optional[int] = None, code: Optional[Tensor] = None) -> None:
        """Interrupt: forget the context and the lookahead; the next window's hint is ``code`` (the code of
        the frame the viewer saw last: frames computed but never shown must not pull the head along),
        else the last committed code.

        The next window starts at ``start`` (default: the next frame) with no context, so it needs no
        audio from before the interrupt, and continues from the code the head shows now.
        """
        self.next = self.next if start is None else start
        self.tail = self.tail[:, -1:] if code is None else \
            torch.as_tensor(code, dtype=self.tail.dtype).reshape(1, 1, -1).to(self.tail.device)
        self.pending = None

    @property
    def n_ctx(self) -> int:
        """Context frames of the next window: the committed ones kept, at most config.context."""
        return min(self.config.context, self.tail.shape[1] - 1)

    @property
    def last_code(self) -> Tensor:
        """(1, M) the last committed code (the portrait's alpha0 before any)."""
        return self.tail[:, -1]

    def window(self, start: int) -> tuple[int, int]:
        """The frames [lo, hi) whose audio a non-final step at ``start`` takes (the caller clips hi at
        the end of the stream and then passes final=True)."""
        return start - self.n_ctx, start + self.config.hop + self.config.lookahead

    def _frames(self, audio: Tensor) -> int:
        return audio.shape[2] // 2 if self.stage2.dims.audio == "hubert" else audio.shape[1] // 4

    def _controls(self, controls: Optional[dict], frames: int) -> dict:
        """{name: value} -> {name: (1, frames, c) tensor or None}. A value is (c,) / (1, c) held over
        the window, or one row per window frame ((frames, c) or (1, frames, c))."""
        known = {name: c for name, _, c in self.stage2.adapters}
        out = {}
        for name, v in (controls or {}).items():
            if v is None:
                continue
            if name not in known:
                raise AnitalkerError(f"the {self.stage2.dims.infer_type} model has no {name} control; "
                                     "use a pose_only or full_control model")
            v = to_device(torch.as_tensor(v, dtype=torch.float32), self.wa.device).reshape(-1, known[name])
            if len(v) == 1:
                v = v.expand(frames, -1)
            if len(v) != frames:
                raise ValueError(f"{name} has {len(v)} rows for a window of {frames} frames")
            out[name] = v.unsqueeze(0)
        return out

    @torch.inference_mode()
    def step(self, start: int, audio: Tensor, controls: Optional[dict] = None, final: bool = False) -> Tensor:
        """Sample the window at ``start`` and commit -> codes (h, M) of frames [start, start + h).

        audio: model-format features of frames window(start) = [start - n_ctx, hi): hubert (1, L, 2n, H),
        mfcc (1, 4n, 39). Non-final: n >= n_ctx + hop, h = hop, frames past the hop are lookahead.
        Final: h = n - n_ctx, everything after the context is committed.
        controls: {"pose"|"location"|"scale": value or None (predicted)}, for this window only.
        """
        t0 = time.perf_counter()
        window = self.plan(start, audio, controls, final)
        codes = self.commit(window, sample_windows([window], self.on_step)[0])
        self.timings = dict(total_s=time.perf_counter() - t0, frames=window.n, steps=self.config.steps)
        return codes

    def plan(self, start: int, audio: Tensor, controls: Optional[dict] = None, final: bool = False) -> Window:
        """The window at ``start`` (as step() describes), ready to be sampled alone or with others."""
        cfg, n_ctx = self.config, self.n_ctx
        if start != self.next:
            raise ValueError(f"step at frame {start}, but the next uncommitted frame is {self.next}")
        n = self._frames(audio)
        h = n - n_ctx if final else cfg.hop
        if h < 1 or n < n_ctx + h:
            raise ValueError(f"{n} audio frames cannot hold {n_ctx} context + {max(h, 1)} new frames")
        lo = start - n_ctx
        return Window(self, start, n, n_ctx, h, self.tail[:, -n_ctx - 1], self.tail[:, self.tail.shape[1] - n_ctx:],
                      to_device(motion_noise(cfg.seed, lo, lo + n, self.alpha0.shape[-1]), self.wa.device), audio,
                      self._controls(controls, n))

    def commit(self, window: Window, x0: Tensor) -> Tensor:
        """Take the sampled window x0 (1, n, M): its new frames become the tail -> codes (h, M)."""
        cfg, n_ctx, h = self.config, window.n_ctx, window.h
        new = x0[:, n_ctx:n_ctx + h]
        if "crossfade" in cfg.continuity and self.pending is not None:
            k = min(cfg.crossfade, self.pending.shape[1], h)
            w = 1 - torch.arange(1, k + 1, device=new.device, dtype=new.dtype) / (k + 1)   # 1 -> 0
            new = torch.cat([w[:, None] * self.pending[:, :k] + (1 - w[:, None]) * new[:, :k], new[:, k:]], 1)
        self.pending = x0[:, n_ctx + h:]
        self.tail = torch.cat([self.tail, new], 1)[:, -cfg.context - 1:]
        self.next = window.start + h
        return new[0]


@dataclass(eq=False)
class Window:
    """One stream's motion window, planned: frames [start - n_ctx, start - n_ctx + n), the h after the
    context to commit. hint (1, M) is the code of the frame before the window, context (1, n_ctx, M) the
    committed codes it continues, x_T (1, n, M) the frames' own initial noise."""
    stream: MotionStream
    start: int
    n: int
    n_ctx: int
    h: int
    hint: Tensor
    context: Tensor
    x_T: Tensor
    audio: Tensor
    controls: dict

    @property
    def key(self) -> tuple:
        """Windows with the same key are sampled as one batch: the same model, steps, shape and controls."""
        s = self.stream
        return (id(s.stage2), s.config.steps, s.config.continuity, self.n, self.n_ctx, tuple(self.audio.shape[1:]),
                tuple(sorted(self.controls)), s.denoiser, s.frames_static)


@torch.inference_mode()
def sample_windows(windows: list[Window], on_step: Optional[Callable] = None) -> list[Tensor]:
    """x0 (1, n, M) of each window. Windows that share a key (the same model, steps, shape and controls:
    several sessions' hops) are stacked and sampled as one batch; alone, a window is computed exactly as
    MotionStream.step always has."""
    out: dict[int, Tensor] = {}
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(windows):
        groups.setdefault(w.key, []).append(i)
    for idx in groups.values():
        ws = [windows[i] for i in idx]
        first = ws[0].stream
        cat = (lambda xs: xs[0]) if len(ws) == 1 else (lambda xs: torch.cat(xs))   # noqa: E731
        cond = first.stage2.condition(cat([w.stream.wa for w in ws]), cat([w.hint for w in ws]),
                                      cat([w.audio for w in ws]),
                                      **{k: cat([w.controls[k] for w in ws]) for k in ws[0].controls})
        x_T, context = cat([w.x_T for w in ws]), cat([w.context for w in ws])
        n, frames = ws[0].n, max(first.frames_static, ws[0].n)
        if first.frames_static:             # one shape for every window: a CUDA graph replays it
            cond = first.stage2.pad(cond, frames)
            rows = 1 << (len(ws) - 1).bit_length()                # sessions: 1, 2, 4, 8, ... rows
            cond.prefix, x_T, context = (_repeat_last(t, rows) for t in (cond.prefix, x_T, context))
            x_T = torch.nn.functional.pad(x_T, (0, 0, 0, frames - n))
        eps = first.denoiser or first.stage2.eps
        denoise = lambda x, t, cond=cond: eps(cond, x, t).float()   # noqa: E731  (fp32 sampler under autocast)
        n_ctx = ws[0].n_ctx
        if "inpaint" in first.config.continuity and n_ctx:
            denoise = _inpainting(denoise, first.schedule, context, x_T[:, :n_ctx])
        x0 = ddim_sample(denoise, x_T, first.schedule, on_step=on_step)[:, :n]
        for j, i in enumerate(idx):
            out[i] = x0[j:j + 1]
    return [out[i] for i in range(len(windows))]


def _repeat_last(t: Tensor, rows: int) -> Tensor:
    """t (B, ...) with its last row repeated up to ``rows`` rows (a batch-1 tensor broadcasts: kept)."""
    return t if len(t) in (1, rows) else torch.cat([t, t[-1:].expand(rows - len(t), *t.shape[1:])])


def _inpainting(denoise, schedule, known: Tensor, noise: Tensor):
    """Wrap denoise so the network sees the first known.shape[1] frames at their q(x_t | x0 = known).
    The sampler calls it once per step, last retained step first, so the step is counted here rather
    than looked up from t (which would read a device tensor back to the host every step)."""
    abar = schedule.tables(known.device)[2]
    scales = [(abar[i].sqrt(), (1 - abar[i]).sqrt()) for i in reversed(range(len(schedule)))]
    steps = iter(scales)
    k = known.shape[1]

    def wrapped(x: Tensor, t: Tensor) -> Tensor:
        a, b = next(steps)
        x = x.clone()
        # The sampler keeps updating its own copy of these rows; they are overwritten here before every
        # call and never committed, so only what the network sees matters.
        x[:, :k] = a * known + b * noise
        return denoise(x, t)
    return wrapped
