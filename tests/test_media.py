"""avatar.media: decoding any audio file to 16 kHz mono, resampling, and the MP4 writer."""
from fractions import Fraction

import av
import numpy as np
import pytest

from avatar.media import Resampler, load_audio, read_video_info, resample, write_mp4
from models.errors import AnitalkerError


def tone(freq, seconds, rate, channels=1, amp=0.5):
    """(channels, N) float32 sine; channel c is scaled by 1/(c+1) so a downmix is visible."""
    t = np.arange(int(round(seconds * rate))) / rate
    x = amp * np.sin(2 * np.pi * freq * t)
    return np.stack([x / (c + 1) for c in range(channels)]).astype(np.float32)


def peak_hz(x, rate=16000):
    """Frequency of the strongest FFT bin, refined by parabolic interpolation."""
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spec))
    a, b, c = np.log(spec[k - 1:k + 2])
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * rate / len(x)


def write_audio(path, wave, rate, codec, fmt):
    """Encode (C, N) float audio with PyAV: the files a user would give us."""
    layout = "mono" if wave.shape[0] == 1 else "stereo"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave), format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        if fmt == "s16":            # wav: int16 samples as most wav files hold
            s16 = (wave.T.reshape(1, -1) * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(s16, format="s16", layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


# (file name, codec, input rate, channels, sample format, allowed length error in samples)
FORMATS = [
    ("a.wav", "pcm_s16le", 22050, 2, "s16", 2),
    ("a.flac", "flac", 44100, 2, "fltp", 2),
    ("a.mp3", "libmp3lame", 44100, 1, "fltp", 64),     # measured 0: the decoders trim
    ("a.ogg", "libopus", 48000, 2, "fltp", 64),       # the codec delay and padding
]


@pytest.mark.parametrize("name,codec,rate,channels,fmt,slack", FORMATS)
def test_load_audio_formats(tmp_path, name, codec, rate, channels, fmt, slack):
    path = tmp_path / name
    wave = tone(440, 1.0, rate, channels)
    write_audio(path, wave, rate, codec, fmt)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 16000) <= slack, len(x)
    assert abs(peak_hz(x[:16000]) - 440) < 1.0
    # mono = mean of the channels (librosa.load): amplitude 0.5 for mono, 0.375 for L + L/2
    expected = 0.5 if channels == 1 else 0.375
    assert abs(np.abs(x[2000:14000]).max() - expected) < 0.03   # mp3 loses ~5 % here


def test_load_audio_wav_is_exact(tmp_path):
    """Lossless input: the decoded, resampled wave is the 16 kHz tone itself."""
    path = tmp_path / "a.wav"
    write_audio(path, tone(440, 1.0, 22050, 2), 22050, "pcm_s16le", "s16")
    x = load_audio(path)
    ref = tone(440, 1.0, 16000, 2).mean(axis=0)
    assert np.abs(x[100:-100] - ref[100:-100]).max() < 1e-3


def test_resample_keeps_frequency_and_length():
    for rate in (8000, 22050, 44100, 48000):
        x = resample(tone(440, 2.0, rate)[0], rate)
        assert x.dtype == np.float32
        assert abs(len(x) - 32000) <= 2, (rate, len(x))
        assert abs(peak_hz(x) - 440) < 0.5, rate
    assert np.array_equal(resample(tone(440, 0.1, 16000)[0], 16000), tone(440, 0.1, 16000)[0])
    stereo = resample(tone(440, 1.0, 48000, 2).T, 48000)        # (N, C) channels last
    assert stereo.ndim == 1 and abs(np.abs(stereo[1000:-1000]).max() - 0.375) < 0.01


def test_streaming_resampler_matches_one_shot():
    x = tone(440, 1.0, 48000)[0]
    r = Resampler(48000)
    chunks = [r(x[i:i + 960]) for i in range(0, len(x), 960)] + [r.flush()]
    streamed = np.concatenate(chunks)
    assert np.abs(streamed - resample(x, 48000)).max() < 1e-5


def test_load_audio_errors(tmp_path):
    with pytest.raises(AnitalkerError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"this is not audio" * 50)
    with pytest.raises(AnitalkerError, match="junk.mp3"):
        load_audio(junk)
    silent = tmp_path / "silent.mp4"
    write_mp4(silent, [np.zeros((64, 64, 3), np.uint8)] * 3, None)
    with pytest.raises(AnitalkerError, match="no audio track"):
        load_audio(silent)
    empty = tmp_path / "empty.wav"
    with av.open(str(empty), "w") as out:
        out.add_stream("pcm_s16le", rate=16000)
    with pytest.raises(AnitalkerError, match="empty.wav"):
        load_audio(empty)


def frames_rgb(n, h, w):
    """Moving gradient frames, uint8 (h, w, 3)."""
    y, x = np.mgrid[0:h, 0:w]
    for i in range(n):
        yield np.stack([(x + 4 * i) % 256, (y * 2) % 256, np.full_like(x, 128)], -1).astype(np.uint8)


@pytest.mark.parametrize("n_audio", [30 * 640 - 1000, 30 * 640 + 5000])   # shorter / longer
def test_write_mp4_round_trip(tmp_path, n_audio):
    path = tmp_path / "out.mp4"
    audio = tone(440, n_audio / 16000, 16000)[0]
    seen = []
    write_mp4(path, frames_rgb(30, 256, 256), audio, progress=seen.append)
    assert seen == list(range(1, 31))
    info = read_video_info(path)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (30, 256, 256, 25.0)
    assert info["audio_seconds"] == pytest.approx(30 / 25)           # exactly 30 * 640 samples
    # the decoder also returns the zero padding of the last 1024-sample AAC frame
    assert 0 <= info["audio_decoded_seconds"] - 30 / 25 < 1024 / 16000
    decoded = load_audio(path)
    assert abs(peak_hz(decoded[:16000]) - 440) < 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_write_mp4_odd_size_is_cropped_to_even(tmp_path):
    path = tmp_path / "odd.mp4"
    write_mp4(path, frames_rgb(5, 121, 97), np.zeros(16000, np.float32))
    info = read_video_info(path)
    assert (info["frames"], info["width"], info["height"]) == (5, 96, 120)
    assert info["audio_seconds"] == pytest.approx(0.2)


def test_write_mp4_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "out.mp4"

    def failing():
        yield from frames_rgb(10, 64, 64)
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_mp4(path, failing(), np.zeros(16000, np.float32))
    assert list(tmp_path.iterdir()) == []
    # an existing file is only replaced by a complete one
    path.write_bytes(b"old")
    with pytest.raises(AnitalkerError, match="no video frames"):
        write_mp4(path, [], np.zeros(16000, np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"] and path.read_bytes() == b"old"
    with pytest.raises(AnitalkerError, match="does not exist"):
        write_mp4(tmp_path / "nowhere" / "x.mp4", frames_rgb(2, 64, 64), None)
