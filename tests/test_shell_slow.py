"""Engines slower than real time, long idle stretches: latency stays bounded, motion and audio stay complete.

In virtual time (FakeTime) an engine that calls spend() is busy for that long while the clock goes on
ticking, exactly as a slow machine behaves, so these tests are deterministic; the real-time variants run
the same engines with real sleeps.
"""
from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from avatar.animator import StreamConfig, StreamingAnimator
from avatar.pipeline import encode_portrait, load_models
from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor
from avatar.timebase import FPS, SAMPLE_RATE
from conftest import tone
from streaming.clock import FakeTime, RealTime
from streaming.session import Session
from streaming.testing import ToneAnimator

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    models = load_models(tiny_checkpoints, "hubert_audio_only", "cpu")
    code = encode_portrait(models, to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image))
    return models, code


def slow_animator(tiny, clock, render_s: float, motion_s: float) -> StreamingAnimator:
    """The real tiny engine made slow: each drawn frame costs render_s and each hop motion_s on `clock`."""
    models, code = tiny
    models = dataclasses.replace(models)                  # its own _render, the shared modules
    draw = models._render

    def render(*args):
        clock.spend(render_s)
        return draw(*args)

    models._render = render
    animator = StreamingAnimator(models, code, StreamConfig(steps=2), now=clock.now)
    plan = animator.motion.plan

    def motion(*args, **kw):
        clock.spend(motion_s)
        return plan(*args, **kw)

    animator.motion.plan = motion
    return animator


async def speak(session: Session, wave: np.ndarray, after_s: float = 1.0) -> list:
    """Push wave 40 ms per shown frame (speech arriving in real time), collect frames until all of it has
    played and after_s more."""
    frames = session.frames()
    out, heard, i = [], 0, 0
    need = np.count_nonzero(wave)
    while heard < need:
        if i < len(wave):
            session.push(wave[i:i + 640])
            i += 640
        out.append(await frames.__anext__())
        heard += np.count_nonzero(out[-1].audio)
    out += [await frames.__anext__() for _ in range(round(after_s * FPS))]
    await frames.aclose()
    return out


@pytest.mark.parametrize("time_source", [FakeTime, RealTime])
def test_an_engine_slower_than_real_time_holds_pictures_and_keeps_every_word(tiny, time_source):
    """Drawing a frame takes 2.5 frame periods and each hop's motion 5: the engine draws the frames it can
    still show on time and holds the picture for the others. Every speech sample is played, in order, at
    25 frames a second; latency stops growing once the lead has learnt the engine's compute."""
    clock = time_source()
    animator = slow_animator(tiny, clock, render_s=0.1, motion_s=0.2)
    wave = tone(4.0 if time_source is RealTime else 8.0)

    async def main():
        async with Session(animator, time_source=clock) as session:
            out = await speak(session, wave)
            return out, session.summary(), list(session.metrics.latencies)

    out, s, latencies = asyncio.run(main())
    speech = np.concatenate([f.audio for f in out])
    np.testing.assert_array_equal(speech[speech != 0], wave[wave != 0])   # every sample, in order, once
    assert [f.pts for f in out] == list(range(out[0].pts, out[0].pts + len(out)))
    assert s["held"] > 0 and animator.skipped >= s["held"]
    drawn = sum(1 for f in out if not f.meta.get("repeat") and not f.meta.get("held"))
    assert 0 < drawn < len(out) / 2                        # about one frame in three or four is drawn
    settled = latencies[len(latencies) // 2:]              # the second half of the utterance
    assert max(settled) < 1.6, max(settled)                # 760 ms configured + the hop's compute
    assert s["repeats"] <= 25                              # only while the lead learns the compute


def test_after_any_idle_time_speech_starts_within_the_same_bound():
    """The engine is slow (each 10-frame hop takes 0.3 s). Idle silence is fed only up to the lead, so
    speech pushed after 10 s or after 10 minutes of idle starts equally soon, and the engine's queue never
    holds more than the lead."""
    def start_latency(idle_s: float):
        clock = FakeTime()
        animator = ToneAnimator(hop=10, latency_frames=10, delay=0.3, spend=clock.spend)

        async def main():
            async with Session(animator, time_source=clock) as session:
                frames = session.frames()
                while clock.now() < idle_s:
                    await frames.__anext__()
                pushed = clock.now()
                session.push(np.full(SAMPLE_RATE, 0.5, np.float32))
                while not (await frames.__anext__()).audio.any():
                    pass
                await frames.aclose()
                return clock.now() - pushed, session.summary(), session.lead

        return asyncio.run(main())

    short, s_short, lead_short = start_latency(10)
    long, s_long, lead_long = start_latency(600)
    assert abs(long - short) <= 1 / FPS + 1e-9, (short, long)
    assert long <= (lead_long + 10) / FPS                   # the lead plus one engine period (a hop)
    for s, lead in ((s_short, lead_short), (s_long, lead_long)):
        assert s["queue_depth_max"]["worker"] <= lead and s["queue_depth_max"]["output"] <= lead + 10


@pytest.mark.parametrize("live", [True, False])
def test_an_engine_that_cannot_keep_up_drops_live_audio_and_plays_utterances_in_full(live):
    """Each 10-frame hop takes 0.6 s (1.5x real time, nothing to skip): a live microphone keeps latency
    bounded by dropping its oldest audio; an utterance plays in full, with repeated slots between hops."""
    clock = FakeTime()
    animator = ToneAnimator(hop=10, latency_frames=10, delay=0.6, spend=clock.spend)

    async def main():
        async with Session(animator, time_source=clock) as session:
            frames = session.frames()
            out = []
            for _ in range(250):                           # 10 s of microphone, 40 ms at a time
                session.push(np.full(640, 0.5, np.float32), live=live, stream="mic")
                out.append(await frames.__anext__())
            out += [await frames.__anext__() for _ in range(500)]
            await frames.aclose()
            return out, session.summary(), list(session.metrics.latencies)

    out, s, latencies = asyncio.run(main())
    if live:
        # bounded: the oldest mic audio goes, and the lead stops growing once the engine's load reaches 1
        assert s["dropped_input_ms"] > 1000 and max(latencies) < 3.0
        assert np.percentile(latencies[-50:], 95) <= np.percentile(latencies[:100], 95) + 0.1
    else:
        assert s["dropped_input_ms"] == 0 and s["repeats"] > 0
        assert sum(1 for f in out if f.audio.any()) == 250  # all of it, later than it came


def test_an_interrupt_before_the_first_picture_is_shown(tiny):
    """The first frame is still being drawn when an interrupt drops it: the engine must draw the next one
    (nothing has been shown that a held frame could repeat), and the session goes on."""
    clock = FakeTime()
    animator = slow_animator(tiny, clock, render_s=0.3, motion_s=0.2)

    async def main():
        async with Session(animator, time_source=clock) as session:
            session.push(tone(2.0))
            while clock.now() < 0.3:                      # the engine is busy with the first hop
                await asyncio.sleep(0)
            assert session.clock.stats.frames == 0 and clock.blocked_until is not None
            session.interrupt()
            frames = session.frames()
            out = [await frames.__anext__() for _ in range(50)]
            await frames.aclose()
            return out, session.summary()

    out, s = asyncio.run(main())
    assert len(out) == 50 and out[0].image is not None and s["interrupts"] == 1


def test_a_slow_engine_spreads_the_frames_it_draws_over_the_hop(tiny):
    """The engine of `live --fast` on 2 cores: a drawn frame costs 45 ms, a hop's features and motion 170
    ms, so about half of a hop's ten frames can be drawn. They are spread over the hop (a new picture every
    other slot), as many as drawing while time lasts drew, which drew them back to back and then held the
    picture for the rest of the hop (runs of 1, 1, 1, 1, 6 slots: frozen 240 ms every hop)."""
    clock = FakeTime()
    animator = slow_animator(tiny, clock, render_s=0.045, motion_s=0.17)

    async def main():
        async with Session(animator, time_source=clock) as session:
            out = await speak(session, tone(8.0))
            return out, session.summary()

    out, s = asyncio.run(main())
    shown = list(session_runs(out))
    settled = shown[len(shown) // 4:]                      # after the lead has learnt the compute
    assert s["drawn_fps"] >= 10.5                          # drawing while time lasts: 11.2
    assert max(settled) <= 3, settled                      # that way: 6
    # the session's own measure of it: the picture's time on screen over the whole session
    assert abs(s["picture_p95_ms"] - 1000 / FPS * np.percentile(shown, 95)) <= 1000 / FPS


def session_runs(frames):
    """Slots each drawn picture stayed on screen, from the frames a session showed."""
    run = None
    for f in frames:
        if not f.meta.get("repeat") and not f.meta.get("held"):
            if run is not None:
                yield run
            run = 0
        if run is not None:
            run += 1
