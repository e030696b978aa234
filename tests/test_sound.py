"""The user's audio keeps its quality: `render` and `reenact --video`, run as a user runs them (the real
command line, a subprocess, tiny checkpoints), put the input's sound into the output at its own rate and
channels (more than two are mixed down to stereo), while the models read 16 kHz mono; the sound lasts
exactly as long as the frames (rate / 25 samples a frame)."""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from avatar.media import decode_audio, write_mp4
from conftest import ROOT
from test_bad_input import anitalker

LEFT, RIGHT = 440.0, 1250.0          # Hz: the channels of a stereo input differ


def tones(seconds: float, rate: int, freqs) -> np.ndarray:
    """(n, len(freqs)) float32: one sine per channel."""
    t = np.arange(round(seconds * rate)) / rate
    return np.stack([0.4 * np.sin(2 * np.pi * f * t) for f in freqs], 1).astype(np.float32)


def write_wav(path, samples: np.ndarray, rate: int, layout: str):
    """A 16-bit WAV with (n, channels) samples, as a user's file would be."""
    with av.open(str(path), "w") as f:
        s = f.add_stream("pcm_s16le", rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16).reshape(1, -1), format="s16",
                                           layout=layout)
        frame.sample_rate = rate
        for p in list(s.encode(frame)) + list(s.encode(None)):
            f.mux(p)
    return path


def peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec)) * rate / len(x)


def output_sound(path):
    """(rate, channels, the container's audio length in samples, decoded (n, channels) float32, frames)."""
    with av.open(str(path)) as f:
        frames = sum(1 for _ in f.decode(video=0))
    with av.open(str(path)) as f:
        a = f.streams.audio[0]
        rate, channels = a.rate, len(a.layout.channels)
        length = a.duration * a.time_base * rate          # the edit list's length: what a player plays
        decoded = np.concatenate([fr.to_ndarray() for fr in f.decode(a)], axis=1)   # fltp: (channels, n)
    return rate, channels, length, decoded.T, frames


def check_exact(path, rate: int, channels: int):
    """The output has ``rate`` and ``channels`` and exactly rate / 25 samples a frame."""
    got_rate, got_channels, length, decoded, frames = output_sound(path)
    assert (got_rate, got_channels) == (rate, channels)
    assert length == Fraction(frames * rate, 25), (length, frames)
    # the decoder also hands out the zero padding of the last 1024-sample AAC frame
    assert frames * rate // 25 <= len(decoded) < frames * rate // 25 + 1024
    return decoded, frames


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("sound")
    write_wav(d / "stereo48k.wav", tones(1.3, 48000, (LEFT, RIGHT)), 48000, "stereo")
    write_wav(d / "mono44k.wav", tones(1.3, 44100, (LEFT,)), 44100, "mono")
    # 5.1: FL FR FC LFE BL BR; the left side and the right side carry different tones, the rest is quiet
    six = np.zeros((round(1.3 * 48000), 6), np.float32)
    six[:, [0, 4]], six[:, [1, 5]] = tones(1.3, 48000, (LEFT, LEFT)), tones(1.3, 48000, (RIGHT, RIGHT))
    write_wav(d / "surround.wav", six * 0.5, 48000, "5.1")
    write_wav(d / "odd7350.wav", tones(1.3, 7350, (LEFT, RIGHT)) * 0.5, 7350, "stereo")
    # a clip to drive the portrait: the photo sliding, with a 48 kHz stereo sound track
    import cv2
    from avatar.portrait import asset_path, load_image
    face = cv2.resize(np.asarray(load_image(asset_path("portrait.jpg"))), (192, 192))
    write_mp4(d / "clip.mp4", [np.roll(face, i % 5, axis=1) for i in range(30)],
              tones(30 / 25, 48000, (LEFT, RIGHT)), sample_rate=48000)
    return d


def render(tiny_checkpoints, audio, out, *extra):
    p = anitalker("render", "--checkpoints", tiny_checkpoints, "--audio", audio, "-o", out, "--steps", 2,
                  *extra, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("streaming", [False, True], ids=["one-pass", "streaming"])
def test_render_keeps_48k_stereo(inputs, tiny_checkpoints, tmp_path, streaming):
    out = tmp_path / "out.mp4"
    render(tiny_checkpoints, inputs / "stereo48k.wav", out, *(["--streaming"] if streaming else []))
    decoded, frames = check_exact(out, 48000, 2)
    # the models' count: HuBERT's rows in one pass, ceil(samples / 640) through the streaming engine
    assert frames == (33 if streaming else 32)
    mid = decoded[4800:48000]
    assert peak_hz(mid[:, 0], 48000) == pytest.approx(LEFT, abs=2)
    assert peak_hz(mid[:, 1], 48000) == pytest.approx(RIGHT, abs=2)
    # each channel is its own tone, not a mix: the other channel's tone is far below it
    spec = np.abs(np.fft.rfft(mid[:, 0] * np.hanning(len(mid))))
    assert spec[round(RIGHT * len(mid) / 48000)] < 0.01 * spec.max()
    if streaming:     # 1.3 s of sound in 33 frames: the input's samples, then silence to the last frame's end
        assert np.abs(decoded[round(1.3 * 48000) + 100:frames * 1920]).max() < 0.01


def test_render_keeps_44k_mono(inputs, tiny_checkpoints, tmp_path):
    out = tmp_path / "out.mp4"
    render(tiny_checkpoints, inputs / "mono44k.wav", out)
    decoded, frames = check_exact(out, 44100, 1)
    assert frames * 1764 == frames * 44100 // 25
    assert peak_hz(decoded[4410:44100, 0], 44100) == pytest.approx(LEFT, abs=2)


def test_render_mixes_surround_down_to_stereo(inputs, tiny_checkpoints, tmp_path):
    out = tmp_path / "out.mp4"
    p = render(tiny_checkpoints, inputs / "surround.wav", out)
    assert "6 audio channels, mixed down to stereo" in p.stderr
    decoded, _ = check_exact(out, 48000, 2)
    mid = decoded[4800:48000]
    assert peak_hz(mid[:, 0], 48000) == pytest.approx(LEFT, abs=2)
    assert peak_hz(mid[:, 1], 48000) == pytest.approx(RIGHT, abs=2)


def test_render_resamples_a_rate_aac_does_not_take(inputs, tiny_checkpoints, tmp_path):
    """7,350 Hz is no AAC rate: the sound goes up to the next one (8 kHz), still exact per frame."""
    out = tmp_path / "out.mp4"
    render(tiny_checkpoints, inputs / "odd7350.wav", out)
    decoded, _ = check_exact(out, 8000, 2)
    assert peak_hz(decoded[800:8000, 0], 8000) == pytest.approx(LEFT, abs=3)
    assert peak_hz(decoded[800:8000, 1], 8000) == pytest.approx(RIGHT, abs=3)


def test_reenact_keeps_the_clips_sound(inputs, tiny_checkpoints, tmp_path):
    out = tmp_path / "out.mp4"
    p = anitalker("reenact", "--checkpoints", tiny_checkpoints, "--video", inputs / "clip.mp4", "-o", out,
                  "--device", "cpu", cwd=ROOT)
    assert p.returncode == 0, p.stderr
    decoded, frames = check_exact(out, 48000, 2)
    assert frames == 30
    mid = decoded[4800:48000]
    assert peak_hz(mid[:, 0], 48000) == pytest.approx(LEFT, abs=2)
    assert peak_hz(mid[:, 1], 48000) == pytest.approx(RIGHT, abs=2)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 96000])
def test_models_still_read_16k_mono(tmp_path, rate):
    """decode_audio keeps the file as it is; mono16k() is the mean of its channels at 16 kHz."""
    sound = decode_audio(write_wav(tmp_path / "a.wav", tones(1.0, rate, (LEFT, RIGHT)), rate, "stereo"))
    assert (sound.rate, sound.channels, len(sound.samples)) == (rate, 2, rate)
    wave = sound.mono16k()
    assert wave.ndim == 1 and abs(len(wave) - 16000) <= 2
    spec = np.abs(np.fft.rfft(wave[:16000] * np.hanning(16000)))     # 1 Hz bins
    assert spec[int(LEFT)] > 0.3 * spec.max() and spec[int(RIGHT)] > 0.3 * spec.max()   # both channels heard


# ------------------------------------------------------------------------------------------------ live outputs
# A 10 kHz tone is above what 16 kHz audio can hold (8 kHz): it reaches a live output only if the input's own
# 48 kHz sound travels beside the models' 16 kHz, frame by frame.
HIGH = 10000.0


def level(x: np.ndarray, rate: int, freq: float) -> float:
    """The amplitude of ``freq`` in x (a Hann-windowed spectrum's peak within 20 Hz of it)."""
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)))) * 4 / len(x)
    f = np.fft.rfftfreq(len(x), 1 / rate)
    return float(spec[np.abs(f - freq) < 20].max())


def test_splitter_keeps_the_same_instants_at_both_rates():
    from avatar.media import Splitter
    rng = np.random.default_rng(0)
    for rate in (48000, 44100, 22050, 96000):
        x = tones(1.0, rate, (LEFT,))[:, 0]
        split, lo, hi, i = Splitter(rate), [], [], 0
        while i < len(x):                                   # chunks of any size, as pushes come
            n = int(rng.integers(1, 4000))
            a, b = split(x[i:i + n])
            assert len(b) == 3 * len(a)
            lo.append(a), hi.append(b)
            i += n
        a, b = split.flush()
        lo, hi = np.concatenate(lo + [a]), np.concatenate(hi + [b])
        assert (len(lo), len(hi)) == (16000, 48000), rate
        ref = lambda n, r: 0.4 * np.sin(2 * np.pi * LEFT * np.arange(n) / r)     # noqa: E731
        assert np.abs(lo[100:-100] - ref(16000, 16000)[100:-100]).max() < 1e-3, rate
        assert np.abs(hi[300:-300] - ref(48000, 48000)[300:-300]).max() < 1e-3, rate


class Recorder:
    """A sink that keeps each frame's 16 kHz and 48 kHz sound."""

    def __init__(self):
        self.lo, self.hi = [], []

    async def open(self, spec):
        self.spec = spec

    async def write(self, frame):
        self.lo.append(frame.audio)
        self.hi.append(frame.meta["audio48k"])

    async def aclose(self):
        pass


def test_live_outputs_send_the_inputs_48k(tmp_path):
    """A 48 kHz file through a session: the file sink, the speaker and a frames reader get 1,920 samples a
    frame with the 10 kHz tone in them, while the engine was given 16 kHz (no 10 kHz there)."""
    import asyncio

    from streaming.clock import FakeTime
    from streaming.session import Session
    from streaming.sinks import FileSink, SpeakerSink
    from streaming.sources import FileSource
    from streaming.testing import FakeOutputStream, ToneAnimator
    wav = write_wav(tmp_path / "in.wav", 0.5 * tones(2.0, 48000, (LEFT, HIGH)).sum(1, keepdims=True), 48000, "mono")
    clock = FakeTime()
    rec, out = Recorder(), tmp_path / "out.mp4"
    speaker = SpeakerSink(stream_factory=FakeOutputStream(clock), now=clock.now, latency=0.02)
    speaker.log = []
    s = asyncio.run(Session(ToneAnimator(size=64), [FileSink(out), speaker, rec], time_source=clock)
                    .run(FileSource(wav)))
    assert rec.spec.sample_rate == 48000
    assert s["frames"] == len(rec.hi) == 50 and {len(h) for h in rec.hi} == {1920}
    assert {len(a) for a in rec.lo} == {640}
    hi, lo = np.concatenate(rec.hi), np.concatenate(rec.lo)
    assert level(lo, 16000, LEFT) > 0.15 and level(hi[4800:-4800], 48000, LEFT) > 0.15
    assert level(hi[4800:-4800], 48000, HIGH) > 0.15            # the input's own sound
    decoded, frames = check_exact(out, 48000, 1)
    assert frames == 50 and level(decoded[4800:86400, 0], 48000, HIGH) > 0.15
    played = np.concatenate([x for _, x in speaker.log])
    assert level(played[len(played) // 4:len(played) // 2], 48000, HIGH) > 0.15


def test_live_outputs_upsample_what_only_exists_at_16k(tmp_path):
    """16 kHz input (and an engine's own sound) still leaves at 48 kHz, 1,920 samples a frame."""
    import asyncio

    from streaming.clock import FakeTime
    from streaming.session import Session
    from streaming.testing import ToneAnimator

    async def main():
        rec = Recorder()
        async with Session(ToneAnimator(size=64), [rec], time_source=FakeTime()) as avatar:
            avatar.push(tones(1.0, 16000, (LEFT,))[:, 0])
            while len(rec.hi) < 40:
                await asyncio.sleep(0)
        return rec
    rec = asyncio.run(main())
    assert {len(h) for h in rec.hi} == {1920}
    lo, hi = np.concatenate(rec.lo[:25]), np.concatenate(rec.hi[:25])
    assert level(hi, 48000, LEFT) == pytest.approx(level(lo, 16000, LEFT), rel=0.05)
    # the upsampled sound is the 16 kHz one, 1 ms (48 samples) late
    lo_at = np.flatnonzero(np.abs(lo) > 0.1)[0]
    assert np.flatnonzero(np.abs(hi) > 0.1)[0] - 3 * lo_at in range(44, 53)


def test_webrtc_viewer_hears_48k():
    pytest.importorskip("aiortc")
    import asyncio

    from streaming.session import Session
    from streaming.testing import ToneAnimator
    from streaming.webrtc import WebRTCSink
    from test_shell_webrtc import receiver

    async def main():
        sink = WebRTCSink()
        async with Session(ToneAnimator(size=64), [sink]) as avatar:
            pc, got, _ = await receiver(sink)
            for _ in range(100):                          # connected: the viewer gets frames from now on
                if sink.viewers and all(v.pc.connectionState == "connected" for v in sink.viewers.values()):
                    break
                await asyncio.sleep(0.1)
            avatar.push(0.5 * tones(3.0, 48000, (LEFT, HIGH)).sum(1), rate=48000)
            for _ in range(100):
                if sum(f.samples for f in got["audio"]) >= 48000 * 3:
                    break
                await asyncio.sleep(0.1)
            await pc.close()
        return got["audio"]
    audio = asyncio.run(main())
    assert {f.sample_rate for f in audio} == {48000}
    x = np.concatenate([f.to_ndarray().reshape(-1, len(f.layout.channels))[:, 0] for f in audio]) / 32768
    loud = np.flatnonzero(np.abs(x) > 0.1)
    speech = x[loud[0] + 4800:loud[0] + 4800 + 48000]
    assert level(speech, 48000, LEFT) > 0.1 and level(speech, 48000, HIGH) > 0.1


def test_live_command_keeps_48k_in_its_file(inputs, tiny_checkpoints, tmp_path):
    """`live --audio FILE -o out.mp4`, the real command and engine: the file holds the input's 10 kHz."""
    wav = write_wav(tmp_path / "in.wav", 0.5 * tones(1.3, 48000, (LEFT, HIGH)).sum(1, keepdims=True), 48000, "mono")
    out = tmp_path / "out.mp4"
    p = anitalker("live", "--checkpoints", tiny_checkpoints, "--audio", wav, "-o", out, "--steps", 5,
                  "--metrics-every", 0, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    decoded, frames = check_exact(out, 48000, 1)
    loud = np.flatnonzero(np.abs(decoded[:, 0]) > 0.1)
    assert level(decoded[loud[0] + 4800:loud[0] + 4800 + 24000, 0], 48000, HIGH) > 0.1


def test_spoken_text_reaches_the_outputs_at_the_voices_own_rate():
    """The server's `say`: a voice that speaks at 48 kHz (here a tone with 10 kHz in it) reaches the
    outputs with its 10 kHz, not the models' 16 kHz upsampled."""
    import asyncio
    import json

    from websockets.asyncio.client import connect

    from streaming.server import AvatarServer
    from streaming.session import Session
    from streaming.testing import ToneAnimator
    from streaming.webrtc import WebRTCSink

    async def voice(text, voice=None, speed=None):
        yield 0.5 * tones(1.0, 48000, (LEFT, HIGH)).sum(1), 48000

    async def main():
        sink, rec = WebRTCSink(), Recorder()
        async with Session(ToneAnimator(size=64), [sink, rec]) as session:
            async with AvatarServer(session, sink, port=0, tts=voice) as server:
                async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
                    await ws.send(json.dumps({"op": "say", "text": "One."}))
                    for _ in range(400):
                        if sum(np.abs(a).max() > 0.1 for a in rec.lo) >= 25:
                            break
                        await asyncio.sleep(0.02)
            await sink.aclose()
        return rec
    rec = asyncio.run(main())
    spoken = [i for i, a in enumerate(rec.lo) if np.abs(a).max() > 0.1]
    assert len(spoken) >= 25
    hi = np.concatenate([rec.hi[i] for i in spoken[2:22]])
    assert level(hi, 48000, HIGH) > 0.15 and level(hi, 48000, LEFT) > 0.15
