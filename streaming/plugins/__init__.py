"""The avatar inside voice-agent frameworks: what the LiveKit Agents and Pipecat adapters share.

    streaming.plugins.livekit   a livekit-agents VideoGenerator and an AvatarSession (extra: [livekit])
    streaming.plugins.pipecat   a pipecat FrameProcessor video service (extra: [pipecat])

Both wrap a Session (streaming/session.py), so they inherit its pacing at 25 fps, idle motion while nobody
speaks, bounded latency on an engine slower than real time, interrupts within one frame and its metrics.
Speech goes in as segments (one TTS utterance each) pushed with a tag; the frames that play a segment
carry its tag in frame.meta["tags"], and the frame holding its last sample carries it in
frame.meta["ended"], which is how both frameworks learn that an utterance has played.

This module imports neither framework; each adapter imports its own lazily (only when used).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools

import numpy as np

from models.errors import AnitalkerError

__all__ = ["Speech", "load_animator", "pcm16", "played"]


def load_animator(portrait=None, *, checkpoints=None, infer_type: str | None = None, device: str = "auto",
                  crop: bool = True, **stream):
    """A new streaming engine for a portrait photo (default: the bundled one) with the downloaded
    checkpoints. The models are loaded once per process and shared; each call makes a fresh engine (one
    per session: an engine belongs to one session's worker thread). stream: StreamConfig fields (hop,
    lookahead, steps, ...); live use defaults to 10 DDIM steps a window."""
    from avatar.animator import StreamConfig, StreamingAnimator
    from avatar.download import DEFAULT_INFER_TYPE
    from avatar.pipeline import encode_portrait
    from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor

    models = _models(None if checkpoints is None else str(checkpoints), infer_type or DEFAULT_INFER_TYPE, device)
    image = prepare_portrait(load_image(portrait or asset_path("portrait.jpg")), crop=crop).image
    code = encode_portrait(models, to_tensor(image))
    stream.setdefault("steps", 10)
    return StreamingAnimator(models, code, StreamConfig(**stream))


@functools.lru_cache(maxsize=2)
def _models(checkpoints, infer_type: str, device: str):
    from avatar.pipeline import load_models

    return load_models(checkpoints, infer_type, device)


def pcm16(audio: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> little-endian signed 16-bit PCM, as both frameworks carry audio (the inverse
    of from_pcm16: 16-bit input comes back bit-exact)."""
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2").tobytes()


def from_pcm16(data, channels: int = 1) -> np.ndarray:
    """Interleaved signed 16-bit PCM -> mono float32 (channels averaged)."""
    x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        x = x[:len(x) // channels * channels].reshape(-1, channels).mean(axis=1)
    return x


class Speech:
    """Speech pushed into a Session as tagged segments.

    A TTS hands over a sentence as hundreds of 10-20 ms frames within one event-loop turn; pieces pushed in
    the same turn go to the session as one push, so its bounded input queue never fills. Segment tags are
    increasing integers; after interrupt() every tag up to `cut` is gone, and frames of those segments that
    were already released but not yet consumed must not be played or reported (see `live`, `finished`).

    An answer that starts while the avatar idles does not wait behind the idle silence the session has fed
    ahead of the clock: the session drops it (Session(preempt_idle=True), its `preempted` metric), so the
    answer's first frame comes after one engine hop (bench/plugins.py --modes queued,preempt: 0.7-1.1 s ->
    0.1-0.2 s with the tiny engine on this machine)."""

    def __init__(self, session):
        self.session = session
        self.tag = 0              # the segment being pushed
        self.open = False         # ... and whether it has audio
        self.cut = -1             # segments <= cut were dropped by interrupt()
        self.unplayed: set[int] = set()   # segments with audio whose last frame has not come out yet
        self._buf: list[tuple[np.ndarray, int]] = []
        self._scheduled = False

    def push(self, samples: np.ndarray, rate: int) -> int:
        """Queue mono float32 audio at any rate into the current segment; returns the segment's tag."""
        if not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise AnitalkerError(f"audio needs a positive integer sample rate, got {rate!r}")
        if len(samples):
            self.unplayed.add(self.tag)
            self._buf.append((np.asarray(samples, np.float32), int(rate)))
            self.open = True
            if not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        return self.tag

    def _flush(self) -> None:
        self._scheduled = False
        buf, self._buf = self._buf, []
        for rate, group in itertools.groupby(buf, key=lambda p: p[1]):
            # each segment resamples on its own stream, so its tail is flushed when it ends
            self.session.push(np.concatenate([x for x, _ in group]), rate, stream=self.tag, tag=self.tag)

    def end(self) -> int | None:
        """Close the current segment: returns its tag, whose frame.meta["ended"] will follow; None when the
        segment had no audio (nothing will be reported)."""
        if not self.open:
            return None
        self._flush()
        self.session.end_segment(self.tag, stream=self.tag)
        tag, self.tag, self.open = self.tag, self.tag + 1, False
        return tag

    def interrupt(self) -> None:
        """Drop all queued speech (the session's next frame is silent) and start a new segment."""
        self._buf.clear()
        self.unplayed.clear()
        self.session.interrupt()
        self.session.close_stream(self.tag)
        self.cut, self.tag, self.open = self.tag, self.tag + 1, False

    def live(self, tags) -> list:
        """The tags of a released frame that still count (not cut by an interrupt), in order."""
        return sorted(t for t in tags or () if t > self.cut)

    def finished(self, ended) -> list:
        """The segments a released frame ends (its meta["ended"]) that still count; they are played now."""
        done = self.live(ended)
        self.unplayed.difference_update(done)
        return done


async def played(session, run: asyncio.Task):
    """session.frames() until the session's run task ends; a run that failed raises its error here."""
    frames = session.frames()
    nxt = None
    try:
        while True:
            nxt = asyncio.ensure_future(frames.__anext__())
            await asyncio.wait({nxt, run}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                break
            frame, nxt = nxt.result(), None
            yield frame
        run.result()                      # raises the session's error, if it failed
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await nxt
        await frames.aclose()
