"""Streaming audio features: audio pushed in chunks of any size -> model-ready features for fixed blocks
of video frames.

Block b covers the frames [b*block, (b+1)*block) of the current segment. It is computed over the window of
frames [max(0, start - context), end + lookahead) plus a few samples of the next frame (TAIL: the receptive
field of the block's last rows), once that audio has arrived, and only the block's rows are kept. Windows
start on frame boundaries (multiples of 640 samples), so HuBERT row j of a window has the same receptive
field [320 j, 320 j + 400) as in the whole-utterance path, and MFCC row j the same [160 j, 160 j + 400).
Every kept row is therefore computed from its full receptive field, even with lookahead 0; only the
stream's end repeats the last row, as the official demo pads (HuBERT: one edge-copied row; MFCC: its last
row repeated to fill the last frame). MFCC rows equal the whole-utterance rows exactly once context >= 1
frame (pre-emphasis of the window's first sample and the +-2-row deltas need it); HuBERT attends to the
whole window, so its rows equal the whole-utterance rows only when the window holds the whole utterance.
Only the samples decide a block, never the chunk sizes: 1 ms and 1 s chunks give bit-identical blocks.
With hubert="incremental" HuBERT runs over each block's own rows (hop and lookahead) only, attending to the
cached keys and values of the last `context` frames' committed rows (models.frontend.IncrementalHubert):
about 2.5x fewer rows per hop at the default sizes; its rows also differ from the whole-utterance rows
(bench/features.py --hubert incremental measures by how much), and equal them when the lookahead reaches
the end of the utterance.

Normalisation (HuBERT only; MFCC is never normalised). The official front end maps the waveform to
(x - mean) / sqrt(var + 1e-7) with the mean and variance of the *whole utterance*, unknown while streaming:
- "running": mean and variance of the speaker's audio from the stream's first sample up to the block's
  lookahead end (merged one block at a time in float64, Chan/Welford), frozen when the block is computed.
  Two rules keep it independent of idle time and session length: samples pushed as idle (the silence a
  session feeds while nobody speaks) are not counted, however long the idle stretch; and the statistics
  keep the weight of at most STATS_SECONDS of audio (older audio fades out as newer is merged, by about
  1/e per STATS_SECONDS of new speech), so a long session follows the speaker's current level. For a stream of at most STATS_SECONDS of non-idle audio the
  statistics are those of that audio, and equal the whole-utterance statistics, up to float32 rounding,
  for blocks whose window ends at the end of the stream (the silence padding the last frame counts as
  audio). Quiet passages stay quiet relative to speech, as offline. Early blocks see statistics of little
  audio; the statistics survive reset() (same speaker, same level).
- "window": the official formula over the window's own audio. Equals the official normalisation exactly
  when a window covers the whole utterance, but the gain changes from block to block, and a quiet window
  (background noise between sentences) is scaled up to unit variance like speech.
- "none": the samples as pushed, for callers that normalise themselves (test: with the whole-utterance
  normalised wave pushed, blocks equal the official features). It is forced when the HuBERT folder's
  preprocessor says do_normalize false, because the official path then does not normalise either.
Silence is audio: var = 0 gives (x - mean) / sqrt(1e-7) = 0, never NaN.

Segments: finish() ends the current utterance (the last partial frame is padded with silence, so it has
ceil(samples / 640) frames) and reset() drops every sample and block not yet returned (an interrupt). Both
start a new segment at frame ``frames_done``: frame indices keep counting so pts stay continuous, the new
segment's audio starts on that frame boundary (the caller drops its own partial-frame audio too) and gets
no left context from before the cut.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from models.errors import AnitalkerError
from models.frontend import HubertFrontend, IncrementalHubert, mfcc_features, normalize_wave

from .timebase import SAMPLE_RATE, SAMPLES_PER_FRAME, frames_for_samples

ROWS_PER_FRAME = {"hubert": 2, "mfcc": 4}     # 50 Hz HuBERT rows, 100 Hz MFCC rows
NORMALIZE = ("running", "window", "none")
HUBERT_MODES = ("window", "incremental")
# Samples past a frame's end that its last row needs: HuBERT row 2i+1 spans [640 i + 320, 640 i + 720);
# MFCC row 4i+3 spans [640 i + 480, 640 i + 880) and its deltas reach two rows further (+320).
TAIL = {"hubert": 80, "mfcc": 560}
STATS_SECONDS = 20      # the running statistics weigh at most this much audio; older audio fades out


def rows_of(states: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """A block's rows [lo, hi) of a window's HuBERT states, float32 as hubert_model_input gives them (a
    caller's bf16 autocast changes only the compute)."""
    return states[:, lo:hi].to(torch.float32, copy=True)


class RunningStats:
    """Mean and variance of a stream, merged array by array in float64 (Chan et al.'s parallel Welford).
    With ``cap`` samples, the statistics keep the weight of at most that many: older audio is scaled down
    as newer is merged (mean unchanged, the sum of squares and the count shrunk alike)."""

    def __init__(self, cap: int | None = None):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.cap = cap

    def add(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        x = x.astype(np.float64)
        n, mean = x.size, float(x.mean())
        if self.cap is not None and self.n + n > self.cap and self.n:
            keep = max(self.cap - n, 0) / self.n       # the old audio's share of the window
            self.n, self.m2 = self.n * keep, self.m2 * keep
        total, delta = self.n + n, mean - self.mean
        self.m2 += float(((x - mean) ** 2).sum()) + delta * delta * self.n * n / total
        self.mean += delta * n / total
        self.n = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / max(self.n, 1) + 1e-7)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """(N,) float32 -> (N,) float32 with the official formula and these statistics."""
        scale = np.float32(self.std)
        return (x - np.float32(self.mean)) / scale


class StreamingFeatures:
    """Audio in chunks of any size -> model-ready features for blocks of video frames.

    hubert blocks: (L+1, 2*frames, H) float32 on the frontend's device; mfcc blocks: (4*frames, 39)
    float32 on the CPU. ``frames`` is ``block`` except for the last block of a segment. Add the batch dim
    ([None]) for Stage2, as Models.features returns.
    """

    def __init__(self, frontend: HubertFrontend | None, audio: str = "hubert", block: int = 10,
                 context: int = 25, lookahead: int = 5, normalize: str = "running",
                 lookahead_rows: bool = False, hubert: str = "window"):
        if audio not in ROWS_PER_FRAME:
            raise AnitalkerError(f"unknown audio features {audio!r}; use hubert or mfcc")
        if normalize not in NORMALIZE:
            raise AnitalkerError(f"unknown normalisation {normalize!r}; use {', '.join(NORMALIZE)}")
        if block < 1 or context < 0 or lookahead < 0:
            raise AnitalkerError(f"need block >= 1, context >= 0, lookahead >= 0 frames "
                                 f"(got {block}, {context}, {lookahead})")
        if audio == "hubert" and frontend is None:
            raise AnitalkerError("hubert features need a HuBERT frontend (load_hubert)")
        if hubert not in HUBERT_MODES:
            raise AnitalkerError(f"unknown HuBERT mode {hubert!r}; use {', '.join(HUBERT_MODES)}")
        self.audio, self.block, self.context, self.lookahead = audio, block, context, lookahead
        self.normalize = normalize
        # also return the rows of the lookahead frames, computed in the same window: provisional features
        # (less right context than they will have as part of the next block) for a motion window's lookahead
        self.lookahead_rows = lookahead_rows
        self._raw = None
        if audio == "hubert":
            if not frontend.do_normalize:
                self.normalize = "none"
            # the same model without the frontend's own whole-input normalisation: we normalise here
            self._raw = HubertFrontend(frontend.model, do_normalize=False)
        # "incremental": each block runs HuBERT over its own rows only, attending to the cached keys and
        # values of the last `context` frames' rows (models.frontend.IncrementalHubert), instead of
        # re-running [context | block | lookahead]; the window's audio context is then unused.
        self._inc = IncrementalHubert(frontend.model, 2 * context) if audio == "hubert" and \
            hubert == "incremental" else None
        self.frames_done = 0          # index of the next frame to emit, counted over all segments
        self._stats = RunningStats(STATS_SECONDS * SAMPLE_RATE)
        self.last_stats = None        # (mean, std) the last HuBERT block was normalised with
        # a list while a shared engine collects the HuBERT inputs of several streams (avatar/batch.py): the
        # blocks come out with None features and (samples, first row, end row) is appended here instead
        self.deferred = None
        self._new_segment()

    def _new_segment(self) -> None:
        self._origin = self.frames_done   # global index of this segment's frame 0
        self._chunks: list[tuple[np.ndarray, bool]] = []   # (samples, idle) pushed, not joined yet
        self._audio = np.zeros(0, np.float32)
        self._idle = np.zeros(0, bool)    # which of self._audio's samples were pushed as idle silence
        self._audio_frame = 0         # segment frame at which self._audio starts
        self._next = 0                # segment frame where the next block starts
        self._stat_frames = 0         # segment frames folded into the running statistics
        self._samples = 0
        if self._inc is not None:
            self._inc.reset()

    @property
    def samples_in(self) -> int:
        """Samples pushed into the current segment (padding and dropped audio excluded)."""
        return self._samples

    def push(self, samples: np.ndarray, idle: bool = False) -> None:
        """Append float32 mono 16 kHz samples (copied: callers may reuse their buffer). idle: silence fed
        while nobody speaks; it is audio for HuBERT but not for the normalisation statistics."""
        x = np.array(samples, dtype=np.float32).reshape(-1)
        if x.size:
            self._chunks.append((x, bool(idle)))
            self._samples += x.size

    def ready(self) -> list[tuple[int, torch.Tensor]]:
        """(first frame index, features) for every block whose lookahead audio has arrived.

        Block b is due once 640 * ((b+1) * block + lookahead) + TAIL samples of the segment are in, so
        a frame waits at most (block - 1 + lookahead) frames + TAIL samples + compute after its audio."""
        return self._emit(total=None)

    def finish(self) -> list[tuple[int, torch.Tensor]]:
        """End of the utterance: pad the last partial frame with silence and emit the remaining blocks
        (the last may be shorter; lookahead stops at the end). A new segment starts afterwards."""
        total = frames_for_samples(self._samples)
        self._chunks.append((np.zeros(total * SAMPLES_PER_FRAME - self._samples, np.float32), False))
        out = self._emit(total)
        self._new_segment()
        return out

    def reset(self) -> None:
        """Interrupt: drop every sample and block not yet returned; frame indices keep counting."""
        self._new_segment()

    def _emit(self, total: int | None) -> list[tuple[int, torch.Tensor]]:
        """Compute the blocks that can be computed; total: the segment's frame count once it ended."""
        if self._chunks:
            self._audio = np.concatenate([self._audio, *(x for x, _ in self._chunks)])
            self._idle = np.concatenate([self._idle, *(np.full(len(x), idle) for x, idle in self._chunks)])
            self._chunks = []
        have = self._audio_frame * SAMPLES_PER_FRAME + len(self._audio)    # samples in this segment
        tail = TAIL[self.audio]
        out = []
        while True:
            start = self._next
            if total is None:
                end = start + self.block
                stop = end + self.lookahead
                last = stop * SAMPLES_PER_FRAME + tail
                if last > have:
                    break
            else:
                if start >= total:
                    break
                end = min(start + self.block, total)
                stop = min(end + self.lookahead, total)
                last = min(stop * SAMPLES_PER_FRAME + tail, total * SAMPLES_PER_FRAME)
            upto = stop if self.lookahead_rows else end
            out.append((self._origin + start, self._compute(start, upto, stop, last, end)))
            self._next, self.frames_done = end, self._origin + end
            # keep only what later windows can use: the next block's left context onwards
            drop = max(0, end - self.context) - self._audio_frame
            self._audio = self._audio[drop * SAMPLES_PER_FRAME:]
            self._idle = self._idle[drop * SAMPLES_PER_FRAME:]
            self._audio_frame += drop
        return out

    def _compute(self, start: int, end: int, stop: int, last: int, commit: int) -> torch.Tensor:
        """Features of frames [start, end) from the samples [640 max(0, start - context), last);
        end <= stop, the window's end in frames; commit: the block's end (incremental HuBERT keeps its rows)."""
        first = start if self._inc is not None else max(0, start - self.context)
        x = self._samples_between(first * SAMPLES_PER_FRAME, last)
        rows, lo, hi = ROWS_PER_FRAME[self.audio], start - first, end - first
        if self.audio == "mfcc":
            feats = mfcc_features(x)                         # (4W + 2, 39) float64; (4W - 1, 39) at the end
            feats = np.concatenate([feats, np.repeat(feats[-1:], max(0, rows * hi - len(feats)), 0)])
            return torch.as_tensor(feats[rows * lo:rows * hi], dtype=torch.float32)
        if self.normalize == "window":
            x = normalize_wave(x)
        elif self.normalize == "running":
            # fold in the audio up to this block's lookahead end, once: statistics are frozen per block
            a, b = self._stat_frames * SAMPLES_PER_FRAME, stop * SAMPLES_PER_FRAME
            if b > a:
                self._stats.add(self._samples_between(a, b)[~self._samples_between(a, b, self._idle)])
            self._stat_frames = max(self._stat_frames, stop)
            x = self._stats.normalize(x)
            self.last_stats = (self._stats.mean, self._stats.std)
        if self._inc is not None:
            states = self._inc.block(x, commit=rows * (commit - start))
        elif self.deferred is not None:      # a shared engine runs HuBERT for several streams at once
            self.deferred.append((x, rows * lo, rows * hi))
            return None
        else:
            states = self._raw.states(x)                     # (L+1, 2W + 1, H), last row repeated
        return rows_of(states, rows * lo, rows * hi)

    @property
    def can_defer(self) -> bool:
        """Whether HuBERT can be left to the caller (window mode: a block's states depend on its samples
        only; incremental HuBERT carries a cache from block to block)."""
        return self.audio == "hubert" and self._inc is None

    def _samples_between(self, a: int, b: int, of: np.ndarray | None = None) -> np.ndarray:
        """Segment samples [a, b) (a view; a is at or after the start of the kept audio), or the same
        span of ``of``, an array parallel to them."""
        offset = self._audio_frame * SAMPLES_PER_FRAME
        return (self._audio if of is None else of)[a - offset:max(a, b) - offset]
