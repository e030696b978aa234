"""A cheap Animator for tests and benchmarks: no models, exact frames, optional compute delay.

Frame p shows its pts as 16 black/white bars (decode_pts reads it back) and carries exactly the 640
samples it was given, so tests can check A/V pairing, continuity and counts on real output.
"""
from __future__ import annotations

import time

import numpy as np

from avatar.timebase import SAMPLES_PER_FRAME, AvFrame, AudioChunk

BITS = 16


def encode_pts(pts: int, size: int = 64) -> np.ndarray:
    bits = (int(pts) >> np.arange(BITS)) & 1
    row = np.repeat(bits * 255, size // BITS).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(row[None, :, None], (size, len(row), 3)))


def decode_pts(image: np.ndarray) -> int:
    step = image.shape[1] // BITS
    bits = image[image.shape[0] // 2, step // 2::step, 0][:BITS] > 127
    return int(np.sum(bits.astype(np.int64) << np.arange(BITS)))


class ToneAnimator:
    """delay: seconds of fake compute per push that yields frames. hop: frames come out only in groups
    of hop (a windowed model). hiccup=(pts, n): frames from pts on are held back for n further frames of
    audio (a late engine), then come out in a burst. latency_frames: what it declares to the session."""

    def __init__(self, size: int = 64, delay: float = 0.0, hop: int = 1, hiccup=None, latency_frames: int = 0):
        self.size, self.delay, self.hop, self.hiccup = size, delay, hop, hiccup
        self.latency_frames = latency_frames
        self.resets = -1            # reset() below makes it 0
        self.reset()

    def reset(self, last=None) -> None:
        self._buf = np.zeros(0, np.float32)
        self._next = None           # pts of the next frame
        self._held = []
        self.resets += 1

    def push(self, chunk: AudioChunk) -> list[AvFrame]:
        pushed = time.monotonic()
        if self._next is None:
            self._next = chunk.pts // SAMPLES_PER_FRAME
        self._buf = np.concatenate([self._buf, np.asarray(chunk.samples, np.float32)])
        self._cut(pushed)
        if self.hiccup and self._held and self._held[0].pts <= self.hiccup[0] < self._next:
            if self._next - self.hiccup[0] <= self.hiccup[1]:
                return []
            self.hiccup = None
        return self._emit() if len(self._held) >= self.hop else []

    def _cut(self, pushed: float) -> None:
        n = len(self._buf) // SAMPLES_PER_FRAME
        for i in range(n):
            audio = self._buf[i * SAMPLES_PER_FRAME:(i + 1) * SAMPLES_PER_FRAME].copy()
            self._held.append(AvFrame(encode_pts(self._next, self.size), audio, self._next, pushed))
            self._next += 1
        self._buf = self._buf[n * SAMPLES_PER_FRAME:]

    def flush(self) -> list[AvFrame]:
        if len(self._buf):           # the last partial frame, padded with silence
            self._buf = np.concatenate([self._buf, np.zeros(SAMPLES_PER_FRAME - len(self._buf), np.float32)])
            self._cut(time.monotonic())
        self.hiccup = None
        return self._emit()

    def _emit(self) -> list[AvFrame]:
        out, self._held = self._held, []
        if out and self.delay:
            time.sleep(self.delay)
        done = time.monotonic()
        return [AvFrame(f.image, f.audio, f.pts, f.pushed_at, done) for f in out]


def stand_in_room(identity: str = "agent"):
    """A LiveKit room for tests and benchmarks without a server (needs the [livekit] extra): connected, no
    one else in it, and its local participant records the tracks it is asked to publish (in
    track_publications, as the real one does) instead of sending them anywhere."""
    from livekit import rtc

    class Publication:
        def __init__(self, track, options):
            self.track, self.kind, self.source, self.sid = track, track.kind, options.source, f"TR_{id(track)}"

        async def wait_for_subscription(self):
            return None

    class LocalParticipant:
        kind = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

        def __init__(self, room):
            self.room, self.identity, self.track_publications = room, identity, {}

        async def publish_track(self, track, options):
            pub = Publication(track, options)
            self.track_publications[pub.sid] = pub
            self.room.emit("local_track_published", pub, track)
            return pub

    class Room(rtc.EventEmitter):
        name = "stand-in"

        def __init__(self):
            super().__init__()
            self.local_participant = LocalParticipant(self)
            self.remote_participants = {}

        def isconnected(self):
            return True

    return Room()
