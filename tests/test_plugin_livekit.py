"""The LiveKit Agents adapter in process, with the real livekit-agents package: its AvatarRunner (with its
real AVSynchronizer, AudioSource and VideoSource) over a stand-in room whose local participant records the
tracks it is asked to publish (streaming.testing.stand_in_room), TTS-like audio through a real
QueueAudioOutput. No LiveKit server exists here; the stand-in room is the only double."""
import asyncio

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="the [livekit] extra is not installed")

from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarRunner, QueueAudioOutput  # noqa: E402

from streaming.plugins import pcm16  # noqa: E402
from streaming.plugins.livekit import AvatarSession, AvatarVideo, avatar_options  # noqa: E402
from streaming.testing import ToneAnimator, decode_pts, stand_in_room  # noqa: E402


class Recorder:
    """What the runner hands its AVSynchronizer, in order (it publishes exactly this). audio_wait: seconds
    each AudioFrame's push takes, as when the AudioSource's queue is full."""

    def __init__(self, runner, audio_wait: float = 0.0):
        self.items = []
        push = runner.av_sync.push

        async def recording_push(frame, timestamp=None):
            self.items.append(frame)
            if audio_wait and isinstance(frame, rtc.AudioFrame):
                await asyncio.sleep(audio_wait)
            await push(frame, timestamp)

        runner.av_sync.push = recording_push

    def speech(self):
        return [f for f in self.items if isinstance(f, rtc.AudioFrame)]


def ramp(n: int, start: int = 1) -> np.ndarray:
    """16-bit samples that name their own index, so any shuffle or loss shows."""
    return (((np.arange(start, start + n) * 7) % 30000) + 1000).astype(np.int16)


async def tts(output: QueueAudioOutput, pcm: np.ndarray, rate: int, ms: int = 20, flush=True):
    """Push PCM as a TTS does: frames of `ms` as fast as they come, then flush (end of the segment)."""
    step = rate * ms // 1000
    for i in range(0, len(pcm), step):
        part = pcm[i:i + step]
        await output.capture_frame(rtc.AudioFrame(part.tobytes(), rate, 1, len(part)))
    if flush:
        output.flush()


async def start_runner(video, audio_wait: float = 0.0, **runner_kw):
    room = stand_in_room()
    output = QueueAudioOutput(wait_playback_start=True)
    finished = asyncio.Queue()
    output.on("playback_finished", finished.put_nowait)
    runner = AvatarRunner(room, audio_recv=output, video_gen=video, options=avatar_options(video), **runner_kw)
    rec = Recorder(runner, audio_wait)
    await runner.start()
    return room, output, runner, rec, finished


def pairs(items):
    """(video pts, AudioFrame or None) per video frame, in the order the runner pushed them."""
    out = []
    for item in items:
        if isinstance(item, rtc.VideoFrame):
            image = np.frombuffer(item.data, np.uint8).reshape(item.height, item.width, 3)
            out.append([decode_pts(image), None])
        elif isinstance(item, rtc.AudioFrame):
            assert out and out[-1][1] is None, "an AudioFrame that does not follow its video frame"
            out[-1][1] = item
    return out


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_runner_plays_speech_paired_and_reports_where_it_ended(delay):
    """48 kHz speech in 20 ms frames: each speaking video frame is followed by exactly its own 1,920
    samples at 48 kHz, the TTS's own (bit for bit, complete and in order, not the models' 16 kHz), and
    playback_finished reports the segment's duration (rounded up to whole frames) once it has been shown.
    delay=0.3 s per 5 frames: an engine slower than real time."""
    speech = ramp(48000 * 2 + 900)          # 2.02 s: the last frame is partly padding

    async def main():
        video = AvatarVideo(ToneAnimator(delay=delay, hop=5 if delay else 1))
        room, output, runner, rec, finished = await start_runner(video)
        while len(rec.items) < 5:           # idle first: video without audio
            await asyncio.sleep(0.01)
        idle_items = len(rec.items)
        await tts(output, speech, 48000)
        ev = await asyncio.wait_for(finished.get(), 30)
        items = list(rec.items)
        await asyncio.sleep(0.2)            # idle again
        after = rec.items[len(items):]
        summary = video.session.summary()
        await runner.aclose()
        return room, items, idle_items, after, ev, summary

    room, items, idle_items, after, ev, summary = asyncio.run(main())
    kinds = sorted(p.kind for p in room.local_participant.track_publications.values())
    assert kinds == sorted([rtc.TrackKind.KIND_AUDIO, rtc.TrackKind.KIND_VIDEO])
    assert idle_items >= 3 and not any(isinstance(f, rtc.AudioFrame) for f in items[:idle_items])
    assert not any(isinstance(f, rtc.AudioFrame) for f in after) and len(after) >= 2
    played = [(pts, a) for pts, a in pairs(items) if a is not None]
    frames = -(-len(speech) // 1920)
    assert len(played) == frames
    assert all(a.sample_rate == 48000 and a.samples_per_channel == 1920 for _, a in played)
    audio = np.concatenate([np.frombuffer(a.data, np.int16) for _, a in played])
    assert np.array_equal(audio[:len(speech)], speech) and not audio[len(speech):].any()
    first = played[0][0]                    # frame p shows the engine frame that holds speech[640(p-first):]
    assert [pts for pts, _ in played] == list(range(first, first + frames))
    assert not ev.interrupted and ev.playback_position == pytest.approx(frames * 0.04)
    assert 0 <= ev.playback_position - len(speech) / 48000 < 0.04
    if delay:
        assert summary["repeats"] > 0       # the clock held the picture while the engine caught up


def test_any_rate_and_channels_play_in_full():
    """48 kHz stereo and 24 kHz TTS audio: mixed down and resampled once on the way in, played in full at
    48 kHz, and each segment reported with its own duration."""
    async def main():
        video = AvatarVideo(ToneAnimator())
        room, output, runner, rec, finished = await start_runner(video)
        t = np.arange(int(48000 * 1.5)) / 48000
        stereo = np.repeat((0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype(np.int16)[:, None], 2, axis=1)
        step = 960
        for i in range(0, len(stereo), step):
            part = np.ascontiguousarray(stereo[i:i + step])
            await output.capture_frame(rtc.AudioFrame(part.tobytes(), 48000, 2, len(part)))
        output.flush()
        ev1 = await asyncio.wait_for(finished.get(), 30)
        n1 = len(rec.speech())
        await tts(output, ramp(int(24000 * 0.77)), 24000)
        ev2 = await asyncio.wait_for(finished.get(), 30)
        n2 = len(rec.speech()) - n1
        await runner.aclose()
        return ev1, n1, ev2, n2, rec.speech()

    ev1, n1, ev2, n2, speech = asyncio.run(main())
    assert 0 <= ev1.playback_position - 1.5 < 0.04 and n1 == round(ev1.playback_position / 0.04)
    assert 0 <= ev2.playback_position - 0.77 < 0.04 and n2 == round(ev2.playback_position / 0.04)
    assert {(a.sample_rate, a.samples_per_channel) for a in speech} == {(48000, 1920)}
    tone = np.concatenate([np.frombuffer(a.data, np.int16) for a in speech[:n1]]) / 32768
    assert abs(np.sqrt(np.mean(tone[1920:-1920] ** 2)) - 0.3 / np.sqrt(2)) < 0.01   # level kept
    answer = np.concatenate([np.frombuffer(a.data, np.int16) for a in speech[n1:]])
    assert np.abs(answer).min(initial=0) == 0 and np.median(answer[1920:-1920]) > 1000   # the 24 kHz ramp


@pytest.mark.parametrize("delay,audio_wait", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.03)])
def test_interrupt_mid_utterance_reports_the_played_position(delay, audio_wait):
    """clear_buffer (what AgentSession does when the user barges in) after about 0.8 s of a 3 s answer:
    playback_finished says interrupted at the position played, and no speech follows. audio_wait: each
    AudioFrame's push waits 30 ms (a full AudioSource), so the barge-in lands while the runner is still
    pushing a frame it has not yet counted; that frame is played all the same and must be counted."""
    async def main():
        video = AvatarVideo(ToneAnimator(delay=delay, hop=5 if delay else 1))
        room, output, runner, rec, finished = await start_runner(video, audio_wait)
        await tts(output, ramp(16000 * 3), 16000, flush=False)
        while len(rec.speech()) < 20:
            await asyncio.sleep(0.01)
        output.clear_buffer()
        ev = await asyncio.wait_for(finished.get(), 5)
        heard = len(rec.speech())
        at_event = len(rec.items)
        await asyncio.sleep(0.3)
        output.flush()                      # the agent closes the segment it started; nothing more is due
        await asyncio.sleep(0.2)
        late = rec.items[at_event:]
        extra_event = not finished.empty()
        await runner.aclose()
        return ev, heard, late, extra_event, video.speech.cut

    ev, heard, late, extra_event, cut = asyncio.run(main())
    assert ev.interrupted and ev.playback_position == pytest.approx(heard * 0.04)
    assert 20 <= heard <= 22 and ev.playback_position < 3.0
    assert len(late) >= 5 and not any(isinstance(f, (rtc.AudioFrame, AudioSegmentEnd)) for f in late)
    assert not extra_event and cut == 0


@pytest.mark.parametrize("audio_wait", [0.0, 0.03])
def test_interrupt_then_next_answer_starts_from_zero(audio_wait):
    """After a barge-in the next answer is a new segment: its position counts from zero (also when the
    barge-in lands while a frame's push is under way: its duration must not be added after the reset)."""
    async def main():
        video = AvatarVideo(ToneAnimator())
        room, output, runner, rec, finished = await start_runner(video, audio_wait)
        await tts(output, ramp(16000 * 2), 16000, flush=False)
        while len(rec.speech()) < 10:
            await asyncio.sleep(0.01)
        output.clear_buffer()
        first = await asyncio.wait_for(finished.get(), 5)
        output.flush()
        await tts(output, ramp(8000), 16000)
        second = await asyncio.wait_for(finished.get(), 10)
        await runner.aclose()
        return first, second

    first, second = asyncio.run(main())
    assert first.interrupted and not second.interrupted
    assert second.playback_position == pytest.approx(0.52)     # 8000 samples = 12.5 frames -> 13


@pytest.mark.parametrize("preempt", [True, False])
def test_an_answer_from_idle_does_not_wait_behind_idle_silence(preempt):
    """An engine that declares 20 frames of latency has the session feed 23 frames of idle silence ahead of
    the clock. An answer that starts while idle drops that silence first (preempt_idle, the default): its
    first frame is among the next few shown, not behind 23 frames of silence; the motion goes on from the
    frame shown (the engine restarts once per answer)."""
    async def main():
        animator = ToneAnimator(latency_frames=20)
        video = AvatarVideo(animator, preempt_idle=preempt)
        room, output, runner, rec, finished = await start_runner(video)
        while sum(isinstance(f, rtc.VideoFrame) for f in rec.items) < 30:
            await asyncio.sleep(0.01)
        mark = len(rec.items)
        await tts(output, ramp(16000), 16000)
        await asyncio.wait_for(finished.get(), 10)
        await runner.aclose()
        first = next(i for i, f in enumerate(rec.items) if isinstance(f, rtc.AudioFrame))
        waited = sum(isinstance(f, rtc.VideoFrame) for f in rec.items[mark:first]) - 1
        return waited, animator.resets, video.session.metrics.preempted

    waited, resets, preempted = asyncio.run(main())
    if preempt:
        assert waited <= 4 and resets == preempted == 1
    else:
        assert waited >= 20 and resets == preempted == 0


def test_tiny_engine_idles_and_speaks(tiny_checkpoints, one_thread):
    """The real (tiny) AniTalker engine behind the runner: it moves while idle, its frames have the model's
    size, speech comes out paired and complete, and the segment end is reported."""
    from avatar.animator import StreamConfig, StreamingAnimator
    from avatar.pipeline import encode_portrait, load_models
    from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor
    from conftest import TINY, tone

    models = load_models(tiny_checkpoints, "hubert_audio_only", "cpu")
    code = encode_portrait(models, to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image))
    animator = StreamingAnimator(models, code, StreamConfig(hop=5, context=5, lookahead=2, audio_context=10, steps=3))
    speech = (tone(1.0, 24000) * 32767).astype(np.int16)

    async def main():
        video = AvatarVideo(animator)
        room, output, runner, rec, finished = await start_runner(video)
        while sum(isinstance(f, rtc.VideoFrame) for f in rec.items) < 15:
            await asyncio.sleep(0.02)
        idle = [f for f in rec.items if isinstance(f, rtc.VideoFrame)]
        await tts(output, speech, 24000)
        ev = await asyncio.wait_for(finished.get(), 60)
        await runner.aclose()
        return idle, ev, rec.speech(), video.session.summary()

    idle, ev, heard, summary = asyncio.run(main())
    size = TINY["stage1"]["size"]
    assert (idle[0].width, idle[0].height) == (size, size)
    images = [np.frombuffer(f.data, np.uint8) for f in idle]
    assert max(np.abs(a.astype(int) - b).mean() for a, b in zip(images, images[1:])) > 0   # idle motion
    assert not ev.interrupted and 0 <= ev.playback_position - 1.0 < 0.04
    assert len(heard) == round(ev.playback_position / 0.04)
    assert max(np.abs(np.frombuffer(a.data, np.int16)).max() for a in heard) > 3000      # the speech itself
    assert summary["first_audio_to_frame_ms"] is not None


def test_avatar_session_wires_itself_into_an_agent_session():
    """The three-line helper: AvatarSession.start puts a QueueAudioOutput at the tail of a real
    AgentSession's audio output and runs the runner, so what the agent says comes out as the avatar."""
    from livekit.agents import AgentSession

    async def main():
        session = AgentSession()
        room = stand_in_room()
        avatar = AvatarSession(ToneAnimator())
        await avatar.start(session, room)
        rec = Recorder(avatar.runner)
        out = session.output.audio
        finished = asyncio.Queue()
        out.on("playback_finished", finished.put_nowait)
        await tts(out, ramp(16000), 16000)
        ev = await asyncio.wait_for(finished.get(), 10)
        await avatar.wait_for_join(timeout=5)
        pubs = room.local_participant.track_publications.values()
        await avatar.aclose()
        return ev, rec.speech(), pubs

    ev, heard, pubs = asyncio.run(main())
    assert not ev.interrupted and ev.playback_position == pytest.approx(1.0)
    assert len(heard) == 25
    assert {p.source for p in pubs} == {rtc.TrackSource.SOURCE_MICROPHONE, rtc.TrackSource.SOURCE_CAMERA}


def test_avatar_options_follow_the_engine():
    opts = avatar_options(AvatarVideo(ToneAnimator(size=96)))
    assert (opts.video_width, opts.video_height, opts.video_fps) == (96, 96, 25)
    scaled = AvatarVideo(ToneAnimator(size=64), video_size=(160, 128))
    assert (avatar_options(scaled).video_width, avatar_options(scaled).video_height) == (160, 128)
    frame = scaled._video_frame(np.full((64, 64, 3), 200, np.uint8))
    assert (frame.width, frame.height) == (160, 128) and set(np.frombuffer(frame.data, np.uint8)) == {200}
    assert (opts.audio_sample_rate, opts.audio_channels) == (48000, 1)
    assert pcm16(np.array([1.5, -1.5, 0.5], np.float32)) == np.array([32767, -32768, 16384], "<i2").tobytes()
