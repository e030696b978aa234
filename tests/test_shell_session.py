"""Session behaviour: interrupts, errors, metrics, the TTS source end to end."""
import asyncio

import numpy as np
import pytest

from avatar.timebase import SAMPLE_RATE
from streaming.clock import FakeTime, RealTime
from streaming.session import Session
from streaming.sources import PcmSource, TTSSource, espeak_pcm, sentences
from streaming.testing import ToneAnimator


async def speak_then_interrupt(time_source, animator):
    """Push 4 s of speech, interrupt after 10 speaking frames; return (frames before, frames after)."""
    async with Session(animator, time_source=time_source) as avatar:
        frames = avatar.frames()
        avatar.push(np.full(SAMPLE_RATE * 4, 0.5, np.float32))
        before, after = [], []
        while sum(f.audio.any() for f in before) < 10:
            before.append(await frames.__anext__())
        avatar.interrupt()
        for _ in range(15):
            after.append(await frames.__anext__())
        await frames.aclose()
        depth = dict(avatar.metrics.depth)
    return before, after, depth


@pytest.mark.parametrize("time_source", [FakeTime, RealTime])
def test_interrupt_drops_queued_speech_within_one_frame(time_source):
    animator = ToneAnimator(delay=0.002)
    before, after, depth = asyncio.run(speak_then_interrupt(time_source(), animator))
    assert not any(f.audio.any() for f in after)       # the very next frame is already silent
    assert after[0].pts == before[-1].pts + 1           # and it came in the next slot
    assert animator.resets == 1


def test_an_engine_that_cannot_run_ends_the_session_with_its_error():
    class Broken(ToneAnimator):
        def push(self, chunk):
            raise ValueError("engine broke")

    async def main():
        await Session(Broken(), time_source=FakeTime()).run(TTSSource("Hi."))

    with pytest.raises(ValueError, match="engine broke"):
        asyncio.run(main())


@pytest.mark.parametrize("time_source", [FakeTime, RealTime])
def test_one_failing_item_is_reported_and_the_session_goes_on(time_source):
    """An error in one piece of work costs that piece (reported once), never the session: the engine is
    reset and the audio queued after it still plays, at 25 frames a second."""
    class Flaky(ToneAnimator):
        calls = 0

        def push(self, chunk):
            Flaky.calls += 1
            if Flaky.calls == 8:
                raise ValueError("one bad window")
            return super().push(chunk)

    async def main():
        errors = []
        async with Session(Flaky(), time_source=time_source()) as avatar:
            avatar.on_error.append(errors.append)
            frames = avatar.frames()
            avatar.push(np.full(SAMPLE_RATE * 2, 0.5, np.float32))
            out = [await frames.__anext__() for _ in range(75)]
            await frames.aclose()
            return out, errors, avatar.summary()

    out, errors, s = asyncio.run(main())
    assert errors == ["one bad window"] and s["errors"] == 1 and s["last_error"] == "one bad window"
    assert [f.pts for f in out] == list(range(out[0].pts, out[0].pts + 75))
    loud = sum(f.audio.any() for f in out)
    assert 40 <= loud < 50                   # the failed window's audio is lost, the rest plays


def test_metrics_measure_latency_and_rate():
    async def tone():
        yield np.full(SAMPLE_RATE, 0.1, np.float32), SAMPLE_RATE

    s = asyncio.run(Session(ToneAnimator(), time_source=FakeTime()).run(PcmSource(tone())))
    assert s["fps"] == 25.0 and s["frames"] >= 25 and s["repeats"] == 0
    assert s["first_audio_to_frame_ms"] is not None and s["latency_p95_ms"] >= s["latency_p50_ms"]
    assert set(s["queue_depth_max"]) == {"input", "worker", "output"}


def test_a_file_read_ahead_is_not_latency():
    """A file is read ahead into the session's input queue (64 chunks, here 6.4 s) and taken as the lead
    allows: its latency counts from when the feed takes its audio, so it is the lead plus compute, not
    how far ahead the reader got."""
    async def file():
        for _ in range(200):                            # 20 s in 100 ms pieces, read as fast as asked
            yield np.full(SAMPLE_RATE // 10, 0.1, np.float32), SAMPLE_RATE

    session = Session(ToneAnimator(), time_source=FakeTime())
    s = asyncio.run(session.run(PcmSource(file())))
    assert s["frames"] >= 500 and s["repeats"] == 0
    assert s["latency_p95_ms"] <= 1000 * (session.lead + 2) / 25, s


def test_sentences():
    assert sentences("Hello there. How are you? Fine!  ") == ["Hello there.", "How are you?", "Fine!"]


def test_tts_speaks_before_the_whole_text_is_synthesised():
    made = []

    async def engine(text, voice, speed):             # espeak-ng, counting the sentences it has made
        async for pcm, rate in espeak_pcm(text, voice, speed):
            made.append(len(pcm))
            yield pcm, rate

    async def main():
        chunks, made_at_first = [], None
        async for c in TTSSource("The first sentence is here. And then a second one. And a third.", engine=engine):
            made_at_first = len(made) if made_at_first is None else made_at_first
            chunks.append(c.samples)
        return chunks, made_at_first

    chunks, made_at_first = asyncio.run(main())
    assert made_at_first == 1 and len(made) == 3
    speech = [c for c in chunks if len(c) > 0.3 * SAMPLE_RATE]    # the last is the resampler's tail
    assert len(speech) == 3
    for c in speech:
        assert c.dtype == np.float32 and np.sqrt(np.mean(c ** 2)) > 0.01


def test_pcm_adapter_resamples_any_rate():
    async def gen():
        for _ in range(3):
            yield (np.sin(np.arange(4800) / 48000 * 2 * np.pi * 300) * 20000).astype(np.int16), 48000

    async def main():
        return [c async for c in PcmSource(gen())]

    chunks = asyncio.run(main())
    assert abs(sum(len(c.samples) for c in chunks) - 4800) <= 2
    assert [c.pts for c in chunks] == list(np.cumsum([0] + [len(c.samples) for c in chunks[:-1]]))
    assert 0.5 < np.abs(np.concatenate([c.samples for c in chunks])).max() < 0.7


def test_readme_api_example(tmp_path):
    """The README's embedding example, verbatim but for the engine and the display."""
    from streaming.session import Session
    shown = []

    def show(image, audio):
        shown.append((image.shape, audio.shape))

    async def main(animator):
        async with Session(animator) as avatar:          # idles (silence) until audio is pushed
            avatar.push(np.zeros(48000, np.float32), rate=48000)   # any rate; chunks or whole utterances
            async for frame in avatar.frames():          # AvFrame: image (H, W, 3) uint8, audio (640,) float32
                show(frame.image, frame.audio)
                if frame.pts == 10:
                    avatar.interrupt()                   # stop talking now
                if frame.pts == 20:
                    break

    asyncio.run(main(ToneAnimator()))
    assert shown[0] == ((64, 64, 3), (640,)) and len(shown) >= 20


@pytest.mark.parametrize("live", [False, True])
def test_live_pushes_stay_bounded_and_others_play_in_full(live):
    """2 s pushed at once: as an utterance it plays in full; as live input (a microphone that the engine
    fell behind on) only the newest few frames survive, so latency stays bounded."""
    async def main():
        async with Session(ToneAnimator(), time_source=FakeTime()) as avatar:
            frames = avatar.frames()
            avatar.push(np.full(SAMPLE_RATE * 2, 0.5, np.float32), rate=SAMPLE_RATE, live=live, stream="a")
            loud = [(await frames.__anext__()).audio.any() for _ in range(100)]
            await frames.aclose()
            return sum(loud), avatar.summary()["dropped_input_ms"]

    loud, dropped = asyncio.run(main())
    if live:
        assert 0 < loud <= 12 and abs(dropped + 40 * loud - 2000) <= 40
    else:
        assert loud == 50 and dropped == 0


def test_capture_latency_metric_and_max_lead():
    """Frames that carry the capture time of the camera frame they show feed the capture-latency metric;
    max_lead_frames caps how far a late engine is fed ahead."""
    class Camera(ToneAnimator):
        def __init__(self, clock):
            super().__init__(delay=0.05)           # slower than real time: the lead would grow without a cap
            self.clock = clock

        def push(self, chunk):
            out = super().push(chunk)
            return [type(f)(f.image, f.audio, f.pts, f.pushed_at, f.produced_at,
                            {**f.meta, "captured_at": self.clock.now() - 0.01}) for f in out]

    async def main():
        clock = RealTime()
        session = Session(Camera(clock), time_source=clock, lead_frames=1, max_lead_frames=2)
        async def stop():
            await asyncio.sleep(1.0)
            session.stop()
        asyncio.get_running_loop().create_task(stop())
        s = await session.run()
        return s, session

    s, session = asyncio.run(main())
    assert s["capture_latency_p50_ms"] >= 10 and s["repeats"] > 0
    assert session.lead <= 2 and s["queue_depth_max"]["worker"] <= 2


def test_chunks_say_when_their_frame_is_due():
    """AudioChunk.due is the slot time at which the frame holding the chunk's first sample is shown."""
    dues = {}

    class Recording(ToneAnimator):
        def push(self, chunk):
            out = super().push(chunk)
            if chunk.due is not None:
                dues[chunk.pts // 640] = chunk.due
            return out

    async def main():
        session = Session(Recording(), time_source=FakeTime())
        shown = {}
        session.clock.on_release = lambda f, t, orig=session.clock.on_release: (orig(f, t), shown.setdefault(
            f.pts, t) if not f.meta.get("repeat") else None)
        async def tone():
            yield np.full(SAMPLE_RATE, 0.1, np.float32), SAMPLE_RATE
        await session.run(PcmSource(tone()))
        return shown

    shown = asyncio.run(main())
    # engine frame i is the i-th non-repeated slot; compare where a chunk started a frame. Frame 0 is
    # shown as soon as it is ready: the clock polls for it before anchoring the slots.
    order = sorted(shown)
    checked = 0
    for i, slot in enumerate(order):
        if i in dues and i > 0:
            assert dues[i] == pytest.approx(shown[slot], abs=1e-9), (i, dues[i], shown[slot])
            checked += 1
    assert checked >= 20


def test_tags_say_which_frames_hold_a_segment_and_where_it_ended():
    """Pushed audio carries a tag into the frames that hold it; end_segment marks the frame with its last
    sample (after the stream's resampler gave up its tail), so a caller knows what has been played."""
    async def main():
        async with Session(ToneAnimator(), time_source=FakeTime()) as avatar:
            frames = avatar.frames()
            avatar.push(np.full(16000 + 100, 0.5, np.float32), tag="a")      # 25 frames + 100 samples
            avatar.end_segment("a")
            avatar.push(np.full(24000, 0.25, np.float32), rate=48000, stream="tts", tag="b")   # 0.5 s
            avatar.end_segment("b", stream="tts")
            out = []
            while not any("b" in f.meta.get("ended", ()) for f in out):
                out.append(await frames.__anext__())
            for _ in range(5):
                out.append(await frames.__anext__())
            await frames.aclose()
            return out

    out = asyncio.run(main())
    a = [i for i, f in enumerate(out) if "a" in f.meta.get("tags", ())]
    b = [i for i, f in enumerate(out) if "b" in f.meta.get("tags", ())]
    assert len(a) == 26 and a == list(range(a[0], a[0] + 26))
    end_a = [i for i, f in enumerate(out) if "a" in f.meta.get("ended", ())]
    end_b = [i for i, f in enumerate(out) if "b" in f.meta.get("ended", ())]
    assert end_a == [a[-1]] and end_b == [b[-1]]
    assert b[0] == a[-1]                      # the 100 samples of "a" share a frame with the start of "b"
    assert 12 <= len(b) <= 14                 # 0.5 s + the resampler's tail, starting mid-frame
    assert not any(f.meta.get("tags") for f in out[b[-1] + 1:])    # idle silence carries no tag


@pytest.mark.parametrize("time_source", [FakeTime, RealTime])
def test_after_an_interrupt_motion_continues_from_the_frame_shown_last(time_source):
    """The engine's codes follow a known ramp (one step per frame). Frames computed ahead of the viewer
    (a 10-frame hop) are dropped by the interrupt, so the engine must continue from the code of the last
    frame *shown*: the first code after the interrupt is one ordinary step from it, not a jump over the
    frames the viewer never saw."""
    from streaming.testing import CODE_STEP

    async def main():
        async with Session(ToneAnimator(hop=10, latency_frames=10), time_source=time_source()) as avatar:
            frames = avatar.frames()
            avatar.push(np.full(SAMPLE_RATE * 4, 0.5, np.float32))
            shown = []
            while sum(f.audio.any() for f in shown) < 11:
                shown.append(await frames.__anext__())
            avatar.interrupt()
            after = [await frames.__anext__() for _ in range(30)]
            await frames.aclose()
            return shown, after

    shown, after = asyncio.run(main())
    last = [f for f in shown if not f.meta.get("repeat")][-1].meta["motion"][0]
    new = [f.meta["motion"][0] for f in after if not f.meta.get("repeat") and "motion" in f.meta]
    steps = np.diff([last] + new)
    assert len(new) >= 10
    assert np.allclose(steps, CODE_STEP, atol=1e-5), steps    # never a jump: each step is one frame's change


@pytest.mark.parametrize("preempt", [True, False])
def test_speech_after_idle_does_not_wait_behind_the_idle_silence_in_flight(preempt):
    """An engine that declares 20 frames of latency is fed 23 frames of idle silence ahead of the clock.
    Speech pushed while idle drops that silence (preempt_idle, the default): its first frame is among the
    next few shown, the motion continues from the frame shown last, and it counts as preempted, not as an
    interrupt. Without it, the speech waits behind the 23 frames."""
    from streaming.testing import CODE_STEP

    async def main():
        animator = ToneAnimator(latency_frames=20)
        async with Session(animator, time_source=FakeTime(), preempt_idle=preempt) as avatar:
            frames = avatar.frames()
            idle = [await frames.__anext__() for _ in range(40)]
            avatar.push(np.full(SAMPLE_RATE, 0.5, np.float32))
            waited = 0
            while not (f := await frames.__anext__()).audio.any():
                waited += 1
            await frames.aclose()
            return idle[-1], f, waited, avatar.summary()

    last_idle, first_speech, waited, s = asyncio.run(main())
    if preempt:
        assert waited <= 2 and s["preempted"] == 1 and s["interrupts"] == 0
        # the engine went on from the last idle frame shown: a step or two of motion, not 23
        assert first_speech.meta["motion"][0] - last_idle.meta["motion"][0] <= (waited + 1) * CODE_STEP + 1e-6
    else:
        assert waited >= 20 and s["preempted"] == 0
