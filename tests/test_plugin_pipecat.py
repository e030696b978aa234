"""The Pipecat video service, run with pipecat's own test harness (pipecat.tests.utils.run_test: a real
pipeline and worker around the processor): frame order, counts, pairing of each image with its audio,
interruptions, idle images, pass-through, an engine slower than real time, the tiny AniTalker engine."""
import asyncio

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="the [pipecat] extra is not installed")

from pipecat.frames.frames import (InterruptionFrame, OutputImageRawFrame, TextFrame,  # noqa: E402
                                   TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame, UserStartedSpeakingFrame)
from pipecat.processors.frame_processor import FrameDirection  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

from streaming.plugins.pipecat import AvatarVideoService  # noqa: E402
from streaming.testing import ToneAnimator, decode_pts  # noqa: E402


def ramp(n: int, start: int = 1) -> np.ndarray:
    """16-bit samples that name their own index, so any shuffle or loss shows."""
    return (((np.arange(start, start + n) * 7) % 30000) + 1000).astype(np.int16)


def tts_frames(pcm: np.ndarray, rate: int, context: str, ms: int = 40, channels: int = 1) -> list:
    """A TTS answer as pipecat TTS services send it: started, audio in chunks, stopped."""
    step = rate * ms // 1000
    chunks = [TTSAudioRawFrame(audio=pcm[i:i + step].tobytes(), sample_rate=rate, num_channels=channels,
                               context_id=context) for i in range(0, len(pcm), step)]
    return [TTSStartedFrame(context_id=context), *chunks, TTSStoppedFrame(context_id=context)]


def run(service, frames, **kw):
    down, up = asyncio.run(run_test(service, frames_to_send=frames, **kw))
    return down, up


def speaking(down) -> list[tuple[int, TTSAudioRawFrame]]:
    """(image pts, audio) for every image followed by audio; asserts audio never comes without its image."""
    out = []
    for i, f in enumerate(down):
        if isinstance(f, TTSAudioRawFrame):
            img = down[i - 1]
            assert isinstance(img, OutputImageRawFrame), f"audio after {type(img).__name__}, not its image"
            w, h = img.size
            out.append((decode_pts(np.frombuffer(img.image, np.uint8).reshape(h, w, 3)), f))
    return out


def index(down, cls, **attrs) -> int:
    return next(i for i, f in enumerate(down) if isinstance(f, cls) and
                all(getattr(f, k) == v for k, v in attrs.items()))


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_speech_comes_out_paired_complete_and_in_order(delay):
    """One answer of 1.02 s at 48 kHz, then a text frame: every TTS chunk is replaced by frames of exactly
    1,920 samples at 48 kHz (the TTS's own, bit for bit), each right after its image; the audio is complete and in order; the TTSStoppedFrame
    comes after the last of it and the text after that. delay: an engine slower than real time."""
    speech = ramp(48000 + 960)
    service = AvatarVideoService(ToneAnimator(delay=delay, hop=5 if delay else 1))
    down, _ = run(service, [SleepFrame(0.3 + 3 * delay), *tts_frames(speech, 48000, "c1"), TextFrame("after")])
    pairs = speaking(down)
    frames = -(-len(speech) // 1920)
    assert len(pairs) == frames
    assert all(a.sample_rate == 48000 and a.num_frames == 1920 and a.context_id == "c1" for _, a in pairs)
    audio = np.concatenate([np.frombuffer(a.audio, np.int16) for _, a in pairs])
    assert np.array_equal(audio[:len(speech)], speech) and not audio[len(speech):].any()
    first = pairs[0][0]
    assert [pts for pts, _ in pairs] == list(range(first, first + frames))      # each image with its audio
    last_audio = max(i for i, f in enumerate(down) if isinstance(f, TTSAudioRawFrame))
    assert index(down, TTSStartedFrame) < down.index(pairs[0][1])
    assert last_audio < index(down, TTSStoppedFrame) < index(down, TextFrame, text="after")
    assert isinstance(down[0], OutputImageRawFrame)                             # idle images before speech
    if delay:
        assert service.session.summary()["repeats"] > 0


def test_any_rate_and_stereo():
    """24 kHz mono and 48 kHz stereo answers: resampled and mixed down on the way in, played in full at
    48 kHz."""
    t = np.arange(int(48000 * 0.6)) / 48000
    stereo = np.repeat((0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype(np.int16)[:, None], 2, axis=1)
    frames = tts_frames(ramp(int(24000 * 0.77)), 24000, "a") + tts_frames(stereo.reshape(-1), 48000, "b",
                                                                          channels=2)
    down, _ = run(AvatarVideoService(ToneAnimator()), frames)
    a = [f for _, f in speaking(down) if f.context_id == "a"]
    b = [f for _, f in speaking(down) if f.context_id == "b"]
    assert len(a) in (20, 21) and len(b) in (15, 16)       # 0.77 s and 0.6 s, rounded up to whole frames
    assert {(f.sample_rate, f.num_frames) for f in a + b} == {(48000, 1920)}
    tone = np.concatenate([np.frombuffer(f.audio, np.int16) for f in b[1:-1]]) / 32768
    assert abs(np.sqrt(np.mean(tone ** 2)) - 0.3 / np.sqrt(2)) < 0.01                  # level kept
    assert index(down, TTSStoppedFrame, context_id="a") < index(down, TTSStartedFrame, context_id="b")


@pytest.mark.parametrize("interruption", [InterruptionFrame, UserStartedSpeakingFrame])
@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_interruption_drops_queued_speech_within_one_frame(interruption, delay):
    """A 3 s answer interrupted after 0.8 s: no speech after the interruption frame (the images go on,
    idle), far less than the answer was played, and the answer's TTSStoppedFrame, queued behind speech
    that was dropped, is dropped with it as pipecat drops interrupted frames."""
    frames = tts_frames(ramp(16000 * 3), 16000, "c1")
    service = AvatarVideoService(ToneAnimator(delay=delay, hop=5 if delay else 1))
    down, _ = run(service, [*frames, SleepFrame(0.8 + delay), interruption(), SleepFrame(0.5),
                            TextFrame("next turn")])
    cut = index(down, interruption)
    before = [f for f in down[:cut] if isinstance(f, TTSAudioRawFrame)]
    after = down[cut + 1:]
    assert 5 <= len(before) <= 40
    assert not any(isinstance(f, TTSAudioRawFrame) for f in after)
    assert sum(isinstance(f, OutputImageRawFrame) for f in after) >= 5
    assert not any(isinstance(f, TTSStoppedFrame) for f in down)
    assert isinstance(down[-1], (TextFrame, OutputImageRawFrame))
    assert any(isinstance(f, TextFrame) and f.text == "next turn" for f in after)
    summary = service.session.summary()
    assert summary["interrupts"] == 1 and summary["preempted"] == 1   # the answer started while idle


def test_speaks_again_after_an_interruption():
    first = tts_frames(ramp(16000 * 2), 16000, "c1")
    second = tts_frames(ramp(1920 * 10), 48000, "c2")
    down, _ = run(AvatarVideoService(ToneAnimator()), [*first, SleepFrame(0.5), InterruptionFrame(),
                                                      SleepFrame(0.2), *second])
    later = [f for _, f in speaking(down) if f.context_id == "c2"]
    assert len(later) == 10
    assert np.array_equal(np.concatenate([np.frombuffer(f.audio, np.int16) for f in later]), ramp(19200))
    assert index(down, TTSStoppedFrame, context_id="c2") > down.index(later[-1])


def test_back_to_back_answers_keep_their_order():
    """Two answers sent at once (whole frames each): the second's TTSStartedFrame waits behind the first's
    TTSStoppedFrame, which waits for the first's last frame; the frames after them keep their place."""
    a, b = ramp(640 * 12), ramp(640 * 8, start=50000)
    down, _ = run(AvatarVideoService(ToneAnimator()),
                  [*tts_frames(a, 16000, "a"), *tts_frames(b, 16000, "b"), TextFrame("end")])
    audio = [f for _, f in speaking(down)]
    assert [f.context_id for f in audio] == ["a"] * 12 + ["b"] * 8
    stop_a, start_b = index(down, TTSStoppedFrame, context_id="a"), index(down, TTSStartedFrame, context_id="b")
    assert down.index(audio[11]) < stop_a < start_b < down.index(audio[12])
    assert down.index(audio[-1]) < index(down, TTSStoppedFrame, context_id="b") < index(down, TextFrame, text="end")


def test_other_frames_pass_through_and_idle_shows_images():
    """Without speech: text passes straight on (down and up), images keep coming at about 25 fps, no audio."""
    service = AvatarVideoService(ToneAnimator())
    down, _ = run(service, [TextFrame("hello"), SleepFrame(1.0), TextFrame("bye")])
    texts = [f.text for f in down if isinstance(f, TextFrame)]
    images = [f for f in down if isinstance(f, OutputImageRawFrame)]
    assert texts == ["hello", "bye"] and 15 <= len(images) <= 40
    assert not any(isinstance(f, TTSAudioRawFrame) for f in down)
    assert [decode_pts(np.frombuffer(f.image, np.uint8).reshape(64, 64, 3)) for f in images[:5]] == [0, 1, 2, 3, 4]
    _, up = run(AvatarVideoService(ToneAnimator()), [TextFrame("up")],
                frames_to_send_direction=FrameDirection.UPSTREAM)
    assert [f.text for f in up if isinstance(f, TextFrame)] == ["up"]


def test_tiny_engine(tiny_checkpoints, one_thread):
    """The real (tiny) AniTalker engine: idle motion between turns, the speech out complete and paired."""
    from avatar.animator import StreamConfig, StreamingAnimator
    from avatar.pipeline import encode_portrait, load_models
    from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor
    from conftest import tone

    models = load_models(tiny_checkpoints, "hubert_audio_only", "cpu")
    code = encode_portrait(models, to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image))
    animator = StreamingAnimator(models, code, StreamConfig(hop=5, context=5, lookahead=2, audio_context=10, steps=3))
    speech = (tone(1.0, 24000) * 32767).astype(np.int16)
    down, _ = run(AvatarVideoService(animator), [SleepFrame(0.8), *tts_frames(speech, 24000, "c1")])
    start = index(down, TTSStartedFrame)
    idle = [np.frombuffer(f.image, np.uint8).astype(int) for f in down[:start] if isinstance(f, OutputImageRawFrame)]
    assert len(idle) >= 5 and max(np.abs(a - b).mean() for a, b in zip(idle, idle[1:])) > 0
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert len(audio) == 25 and max(np.abs(np.frombuffer(f.audio, np.int16)).max() for f in audio) > 3000
    assert all(isinstance(down[down.index(f) - 1], OutputImageRawFrame) for f in audio)


class BrokenAnimator(ToneAnimator):
    """The models cannot run: every push fails (as a GPU out of memory would)."""

    def push(self, chunk):
        raise MemoryError("out of memory in the renderer")


def test_an_engine_that_cannot_run_is_reported_upstream_as_permanent():
    """The engine's fatal failure reaches the pipeline as one ErrorFrame upstream that names it and marks
    the processor unusable (pipecat's current API, not the deprecated fatal flag); frames from before and
    around it still pass through."""
    from pipecat.frames.frames import ErrorFrame
    service = AvatarVideoService(BrokenAnimator())
    down, up = run(service, [SleepFrame(0.5), *tts_frames(ramp(3200), 16000, "c1"), SleepFrame(0.3),
                             TextFrame("after")])
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "the avatar engine stopped" in errors[0].error
    assert "out of memory" in errors[0].error
    assert not getattr(errors[0], "fatal", False)
