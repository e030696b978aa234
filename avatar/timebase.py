"""The one time base of the project, and the frame types that travel on it.

Every pts is an integer: a sample index at 16 kHz for audio, a frame index at 25 fps for video.
A video frame i owns exactly the audio samples [640 i, 640 (i + 1)); HuBERT rows come at 50 Hz, two per
video frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS        # 640
FEATURE_RATE = 50                             # HuBERT rows per second
SAMPLES_PER_FEATURE = SAMPLE_RATE // FEATURE_RATE   # 320
FEATURES_PER_FRAME = FEATURE_RATE // FPS      # 2
OUT_RATE = 48000                              # what the live outputs send: the input's sound, never 16 kHz
OUT_SAMPLES_PER_FRAME = OUT_RATE // FPS       # 1920


def frames_for_samples(n: int) -> int:
    """Frames needed to show n samples: ceil(n / 640) (the last one padded with silence)."""
    return -(-int(n) // SAMPLES_PER_FRAME)


def frame_of_sample(n: int) -> int:
    """The frame that owns sample n."""
    return int(n) // SAMPLES_PER_FRAME


def first_sample(frame: int) -> int:
    return int(frame) * SAMPLES_PER_FRAME


def frame_seconds(frame: int) -> float:
    return frame / FPS


def sample_seconds(n: int) -> float:
    return n / SAMPLE_RATE


@dataclass(frozen=True, eq=False)
class AudioChunk:
    """float32 mono 16 kHz samples; pts = index of the first sample in the stream.

    due: when a realtime session will show the frame that holds the first sample (its time source's
    clock), or None. An engine can use it to sample a live input (a camera) as late as its compute time
    allows, and to skip drawing frames that could no longer be shown on time.
    idle: silence a session feeds while nobody speaks (not the speaker's audio: it must not change how
    the speaker's audio is normalised).
    hi: the same audio at 48 kHz for the outputs (3 samples for each one, the same instants), when the
    input came at another rate than 16 kHz (media.Splitter); None otherwise."""
    samples: np.ndarray
    pts: int = 0
    due: float | None = None
    idle: bool = False
    hi: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class VideoFrame:
    """uint8 (H, W, 3) RGB; pts = frame index (25 fps for our output, the source's own count for input)."""
    image: np.ndarray
    pts: int = 0


@dataclass(frozen=True, eq=False)
class AvFrame:
    """One output video frame with exactly its 640 audio samples, so A/V sync holds by construction.

    image None: the engine had no time to draw this frame and the picture before it is held (the clock
    shows the last image; motion and audio stay complete).
    pushed_at: time.monotonic() when the last of its audio samples was pushed into the engine;
    produced_at: when the engine returned it. Their difference is the engine's latency for this frame.
    meta: "motion", the frame's motion code (an engine continues from it after an interrupt); sessions add
    "repeat", "held", "tags", "ended", and "audio48k": the frame's sound as the outputs send it, exactly
    OUT_SAMPLES_PER_FRAME samples at OUT_RATE (the input's own 48 kHz audio where it had it).
    """
    image: np.ndarray
    audio: np.ndarray
    pts: int
    pushed_at: float = 0.0
    produced_at: float = 0.0
    meta: dict = field(default_factory=dict)


class Animator(Protocol):
    """The engine seam the realtime shell drives (one worker thread owns it).

    push/flush return the frames the audio completed; reset drops what was pushed and not returned (an
    interrupt) and continues the motion from ``last``, the frame the viewer saw last. An engine may also
    offer push_iter/flush_iter, generators that hand out each frame as soon as it is made."""

    def push(self, item: AudioChunk) -> list[AvFrame]: ...

    def flush(self) -> list[AvFrame]: ...

    def reset(self, last: AvFrame | None = None) -> None: ...
