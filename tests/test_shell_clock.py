"""The program clock and the session's feeding, on a fake time source (fast, deterministic)."""
import asyncio

import numpy as np

from avatar.timebase import SAMPLES_PER_FRAME, AudioChunk
from streaming.clock import FakeTime
from streaming.session import Session
from streaming.testing import ToneAnimator, decode_pts

SCALE = 2.0 ** 20          # ramp sample n has the value (n + 1) / SCALE, exact in float32


class Recorder:
    def __init__(self, time_source):
        self.time, self.frames, self.times, self.spec = time_source, [], [], None

    async def open(self, spec):
        self.spec = spec

    async def write(self, frame):
        self.frames.append(frame)
        self.times.append(self.time.now())

    async def aclose(self):
        pass


async def ramp(n, chunk=1000):
    x = (np.arange(n, dtype=np.float32) + 1) / SCALE
    for i in range(0, n, chunk):
        yield AudioChunk(x[i:i + chunk], i)


def play(animator, n_samples, **kw):
    t = FakeTime(**kw)
    rec = Recorder(t)
    summary = asyncio.run(Session(animator, [rec], time_source=t).run(ramp(n_samples)))
    return rec, summary


def check_pairing(frames):
    """Every real frame's image (its engine pts) and audio (ramp index) stay one fixed offset apart."""
    offsets = {decode_pts(f.image) * SAMPLES_PER_FRAME - (round(f.audio[0] * SCALE) - 1)
               for f in frames if not f.meta.get("repeat") and f.audio[0] > 0}
    assert len(offsets) == 1, offsets


def test_early_engine_frames_wait_for_their_slot():
    rec, s = play(ToneAnimator(), 16000 * 2)
    t0 = rec.times[0]
    assert [round((t - t0) * 25, 6) for t in rec.times] == list(range(len(rec.times)))
    assert [f.pts for f in rec.frames] == list(range(len(rec.frames)))
    assert s["repeats"] == 0 and s["fps"] == 25.0
    assert rec.spec.width == 64 and rec.spec.fps == 25
    check_pairing(rec.frames)


def test_late_engine_repeats_last_frame_with_silence_and_loses_nothing():
    n = 16000 * 3
    rec, s = play(ToneAnimator(hiccup=(20, 10)), n)
    repeats = [i for i, f in enumerate(rec.frames) if f.meta.get("repeat")]
    assert s["repeats"] == len(repeats) > 0
    for i in repeats:
        assert rec.frames[i].image is rec.frames[i - 1].image or np.array_equal(rec.frames[i].image,
                                                                                 rec.frames[i - 1].image)
        assert not rec.frames[i].audio.any()
    assert [f.pts for f in rec.frames] == list(range(len(rec.frames)))     # never stalls, never skips
    speech = np.concatenate([f.audio for f in rec.frames if not f.meta.get("repeat")])
    speech = speech[speech > 0]
    np.testing.assert_array_equal(speech, (np.arange(n, dtype=np.float32) + 1) / SCALE)
    check_pairing(rec.frames)


def test_lead_adapts_to_an_engine_that_needs_more_lookahead_than_it_declares():
    rec, s = play(ToneAnimator(hop=10, latency_frames=0), 16000 * 40)
    late = [i for i, f in enumerate(rec.frames) if f.meta.get("repeat")]
    assert len(late) <= 20 and max(late, default=0) < 100  # at most a few while it learns, then none
    check_pairing(rec.frames)


def test_a_frame_with_the_wrong_audio_length_is_refused_and_reported():
    """Never padded: a frame whose audio is not exactly 640 samples is dropped, counted and reported (its
    slot repeats), so a broken engine shows up in the metrics instead of as drift at the receiver."""
    class Sloppy(ToneAnimator):           # an engine that gets the audio length wrong now and then
        def push(self, chunk):
            return [f if f.pts % 7 else type(f)(f.image, f.audio[:600], f.pts) for f in super().push(chunk)]

    t = FakeTime()
    rec, errors = Recorder(t), []
    session = Session(Sloppy(), [rec], time_source=t)
    session.on_error.append(errors.append)
    s = asyncio.run(session.run(ramp(16000)))
    sloppy = 25 // 7 + 1                  # frames 0, 7, 14, 21
    assert all(len(f.audio) == SAMPLES_PER_FRAME for f in rec.frames)
    assert s["bad_frames"] == len(errors) == sloppy and "600 audio samples" in errors[0]
    shown = {decode_pts(f.image) for f in rec.frames if not f.meta.get("repeat")}
    assert not shown & {0, 7, 14, 21} and len(shown) >= 25 - sloppy
    check_pairing(rec.frames)


def test_wakeup_jitter_does_not_accumulate():
    rng = np.random.default_rng(0)
    rec, s = play(ToneAnimator(), 16000 * 20, jitter=lambda: float(rng.uniform(0, 0.015)))
    t0 = rec.times[0]
    late = [t - t0 - k / 25 for k, t in enumerate(rec.times)]
    assert max(late) < 0.031 and s["slips"] == 0      # one jitter of t0 plus one of the slot, no drift


def test_no_reset_between_utterances():
    t = FakeTime()
    animator = ToneAnimator()

    async def main():
        out = []
        async with Session(animator, time_source=t) as avatar:
            frames = avatar.frames()
            for utterance in range(2):
                avatar.push(np.full(16000, 0.5, np.float32))
                heard = silent = 0
                while not (heard and silent >= 5):    # until the utterance has played and stopped
                    f = await frames.__anext__()
                    out.append(f)
                    heard += bool(f.audio.any())
                    silent = 0 if f.audio.any() else silent + bool(heard)
                await asyncio.sleep(0)
            await frames.aclose()
        return out

    out = asyncio.run(main())
    assert [f.pts for f in out] == list(range(out[0].pts, out[0].pts + len(out)))
    engine_pts = [decode_pts(f.image) for f in out if not f.meta.get("repeat")]
    assert engine_pts == list(range(engine_pts[0], engine_pts[0] + len(engine_pts)))
    assert sum(f.audio.any() for f in out) == 50 and animator.resets == 0
