"""Audio in, MP4 out, through PyAV only (no ffmpeg binary, no torchaudio).

The model works on 16 kHz mono float32 audio and 25 fps video: one video frame per 640 samples. The
user's audio goes into the output as it came (its own rate, mono or stereo): a Sound, which gives the
models their 16 kHz mono with mono16k().
"""
import os
import secrets
import tempfile
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from models.errors import AnitalkerError

SAMPLE_RATE = 16000
# sample rates the AAC encoder accepts (at each of them a 25 fps frame is a whole number of samples)
AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


class Resampler:
    """Stateful mono resampler to 16 kHz float32: feed chunks, then flush() once at the end.

    One instance per stream keeps the filter state across chunks (live sources); resample()
    wraps it for a whole array.
    """

    def __init__(self, rate: int):
        self.rate = int(rate)
        self._swr = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def __call__(self, chunk) -> np.ndarray:
        """(N,) mono or (N, C) channels-last -> (M,) float32 at 16 kHz (M ~ N * 16000 / rate)."""
        x = np.asarray(chunk, dtype=np.float32)
        if x.ndim == 2:
            x = x.mean(axis=1)              # downmix by averaging, as librosa.load does
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x.reshape(1, -1)),
                                           format="flt", layout="mono")
        frame.sample_rate = self.rate
        return _concat(self._swr.resample(frame))

    def flush(self) -> np.ndarray:
        """The samples still inside the filter (a few ms)."""
        return _concat(self._swr.resample(None))


def _concat(frames) -> np.ndarray:
    """Packed float mono AudioFrames -> (N,) float32."""
    parts = [f.to_ndarray()[0] for f in frames]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


# A Kaiser-windowed sinc at 48 kHz, 2 * _HALF + 1 taps: flat to ~6 kHz, -80 dB from 8 kHz (16 kHz's Nyquist).
_HALF = 48
_LOWPASS = (lambda n: (np.sinc(2 * 7000 / 48000 * n) * np.kaiser(len(n), 8.0)))(np.arange(-_HALF, _HALF + 1))
_LOWPASS = (_LOWPASS / _LOWPASS.sum()).astype(np.float32)


class Splitter:
    """Any-rate mono audio -> (16 kHz for the models, 48 kHz for the outputs) of the same instants: each
    call returns (lo, hi) with len(hi) == 3 * len(lo) and hi[3 i] at the time of lo[i], so a frame's 640
    model samples and its 1,920 output samples are the same 1/25 s. lo is hi low-passed and decimated by 3.
    Stateful: feed chunks of any size ((N,) or (N, C), averaged), then flush() once; the last ~1 ms waits
    for the samples after it until then."""

    def __init__(self, rate: int):
        self.rate = int(rate)
        self._swr = av.AudioResampler(format="flt", layout="mono", rate=48000) if self.rate != 48000 else None
        self._buf = np.zeros(_HALF, np.float32)     # the filter's view back: silence before the start

    def __call__(self, chunk) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(chunk, dtype=np.float32)
        x = x.mean(axis=1) if x.ndim == 2 else x
        if self._swr is not None:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x.reshape(1, -1)), format="flt",
                                               layout="mono")
            frame.sample_rate = self.rate
            x = _concat(self._swr.resample(frame))
        return self._split(x)

    def flush(self) -> tuple[np.ndarray, np.ndarray]:
        """The rest: hi padded with silence to whole model samples."""
        tail = _concat(self._swr.resample(None)) if self._swr is not None else np.zeros(0, np.float32)
        return self._split(tail, end=True)

    def _split(self, x: np.ndarray, end: bool = False) -> tuple[np.ndarray, np.ndarray]:
        buf = np.concatenate([self._buf, x])            # buf[_HALF] is the next model sample's instant
        if end:
            real = len(buf) - _HALF
            buf = np.concatenate([buf, np.zeros(-real % 3 + _HALF, np.float32)])
        n = max(0, (len(buf) - 2 * _HALF - 1) // 3 + 1)   # model samples whose whole window is here
        lo = np.convolve(buf[:3 * n - 3 + 2 * _HALF + 1], _LOWPASS, "valid")[::3] if n else buf[:0]
        hi = buf[_HALF:_HALF + 3 * n]
        self._buf = buf[3 * n:]
        return lo.astype(np.float32), hi.copy()


class Upsampler:
    """16 kHz -> 48 kHz, exactly three samples out for each one in, chunk by chunk (a frame's 640 -> its
    1,920), for output audio that only exists at 16 kHz (an engine's own sound, a 16 kHz input). The output
    is 1 ms late (the filter's half-length): the price of never waiting for the next chunk."""

    def __init__(self):
        self._hist = np.zeros(-(-2 * _HALF // 3), np.float32)

    def __call__(self, x) -> np.ndarray:
        s = np.concatenate([self._hist, np.asarray(x, np.float32)])
        z = np.zeros(3 * len(s), np.float32)
        z[::3] = 3 * s                                  # zero-stuffed; the filter's gain of 1/3 restored
        y = np.convolve(z, _LOWPASS)[3 * len(self._hist):3 * len(s)]
        self._hist = s[len(s) - len(self._hist):]
        return y.astype(np.float32)


def resample(wave, rate: int) -> np.ndarray:
    """(N,) or (N, C) audio at `rate` Hz -> (M,) float32 mono at 16 kHz, M = round(N*16000/rate)."""
    x = np.asarray(wave, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if int(rate) == SAMPLE_RATE or x.size == 0:
        return x.copy()
    r = Resampler(rate)
    return np.concatenate([r(x), r.flush()])


@dataclass(frozen=True, eq=False)
class Sound:
    """The user's audio as it goes into the output: samples (n, channels) float32, 1 or 2 channels, at
    its own rate. mixed_from: the channel count of the file when it had more than two (mixed to stereo)."""
    samples: np.ndarray
    rate: int
    mixed_from: int = 0

    @property
    def channels(self) -> int:
        return self.samples.shape[1]

    def mono16k(self) -> np.ndarray:
        """What the models read: the mean of the channels (librosa.load's to_mono) at 16 kHz, (N,) float32."""
        return resample(self.samples, self.rate)

    def cut(self, n: int) -> "Sound":
        """The first n samples (all of them when there are fewer)."""
        return Sound(self.samples[:n], self.rate, self.mixed_from)

    def for_aac(self) -> "Sound":
        """This sound at a rate the AAC encoder takes: its own, or else the next one above (96 kHz at most),
        resampled here in one pass so the file's length stays exact."""
        if self.rate in AAC_RATES:
            return self
        to = next((r for r in AAC_RATES if r >= self.rate), AAC_RATES[-1])
        layout = "mono" if self.channels == 1 else "stereo"
        swr = av.AudioResampler(format="flt", layout=layout, rate=to)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(self.samples).reshape(1, -1), format="flt",
                                           layout=layout)
        frame.sample_rate = self.rate
        parts = [f.to_ndarray().reshape(-1, self.channels) for f in swr.resample(frame) + swr.resample(None)]
        return Sound(np.concatenate(parts) if parts else np.zeros((0, self.channels), np.float32), to,
                     self.mixed_from)

    @staticmethod
    def silence(n: int, rate: int = SAMPLE_RATE) -> "Sound":
        return Sound(np.zeros((n, 1), np.float32), rate)


def decode_audio(path) -> Sound:
    """Any file PyAV decodes (its first audio track) -> a Sound at the file's own rate: mono stays mono,
    stereo stays stereo, more channels (5.1) are mixed down to stereo with FFmpeg's standard matrix."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AnitalkerError(f"audio file not found: {path}")
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise AnitalkerError(f"{path} has no audio track: give a wav/mp3/ogg/flac file "
                                     "or a video with sound")
            stream = container.streams.audio[0]
            chunks, swr, channels = [], None, 0
            for frame in container.decode(stream):
                if swr is None:             # the first frame fixes the output: its rate, mono or stereo
                    channels = len(frame.layout.channels)
                    rate = frame.sample_rate
                    swr = av.AudioResampler(format="flt", layout="mono" if channels == 1 else "stereo",
                                            rate=rate)
                chunks += [f.to_ndarray() for f in swr.resample(frame)]
            if swr is not None:
                chunks += [f.to_ndarray() for f in swr.resample(None)]
    except (av.FFmpegError, ValueError) as e:       # ValueError: format change mid-stream
        raise AnitalkerError(f"cannot decode audio from {path}: {e}") from e
    if not chunks or sum(c.size for c in chunks) == 0:
        raise AnitalkerError(f"{path} contains no audio samples")
    out = min(channels, 2)
    samples = np.concatenate(chunks, axis=1).reshape(-1, out)        # packed: (1, n * c) -> (n, c)
    return Sound(check_finite(samples, path, rate=rate), rate, channels if channels > 2 else 0)


def load_audio(path) -> np.ndarray:
    """Any file PyAV decodes (its first audio track) -> (N,) float32 mono at 16 kHz."""
    return decode_audio(path).mono16k()


def check_finite(samples: np.ndarray, path, start: int = 0, rate: int = SAMPLE_RATE) -> np.ndarray:
    """``samples`` (channels last) if every one is a number; else one line naming the file and the first bad
    sample's time (a NaN or inf would turn every model output and the encoded sound into garbage).
    start: index of samples[0] in the file, at ``rate``."""
    bad = ~np.isfinite(samples)
    if bad.any():
        first = start + int(np.argmax(bad.reshape(len(samples), -1).any(axis=1)))
        raise AnitalkerError(f"{os.fspath(path)} has audio samples that are not numbers (NaN or infinite), the "
                             f"first at {first / rate:.2f} s: the file is damaged; export it again")
    return samples


def has_audio(path) -> bool:
    """Whether a media file has an audio track (a missing or unreadable file: an AnitalkerError)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AnitalkerError(f"file not found: {path}")
    try:
        with av.open(path) as container:
            return bool(container.streams.audio)
    except (av.FFmpegError, ValueError) as e:
        raise AnitalkerError(f"cannot open {path}: {e}") from None


def read_video_frames(path):
    """Decode a video's first video track lazily -> iterator of (t_seconds, uint8 (H, W, 3) RGB), upright
    (a display rotation is applied).

    t is the frame's presentation time from the start of the track, so a variable-rate clip keeps its
    timing. The file is opened here, so a missing file or a file without video fails at the call.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AnitalkerError(f"video file not found: {path}")
    try:
        container = av.open(path)
    except (av.FFmpegError, ValueError) as e:
        raise AnitalkerError(f"cannot open video {path}: {e}") from e
    if not container.streams.video:
        container.close()
        raise AnitalkerError(f"{path} has no video track: give a video file (mp4, webm, mov, ...)")
    return _Frames(container, path)


def check_video(path) -> None:
    """One line unless ``path`` is a file with a video track (a quick look at the container, no decoding)."""
    read_video_frames(path).close()     # opens and checks; closing the unstarted reader closes the file


def video_seconds(path) -> float:
    """Duration of the first video track from the container's metadata, without decoding; falls back to
    counting frames (at the track's rate) when the container does not say."""
    path = os.fspath(path)
    with av.open(path) as container:
        vs = container.streams.video[0]
        if vs.duration:
            return float(vs.duration * vs.time_base)
        if container.duration:
            return container.duration / av.time_base
    info = read_video_info(path)
    return info["frames"] / (info["fps"] or 25)


def _upright(frame) -> np.ndarray:
    """A decoded frame as shown: phone clips store the picture sideways and a display rotation (the
    display matrix) with it; players, OpenCV and ffmpeg apply it, so the face is upright only then."""
    img = frame.to_ndarray(format="rgb24")
    k = round((getattr(frame, "rotation", 0) or 0) / 90) % 4      # degrees counterclockwise
    return np.ascontiguousarray(np.rot90(img, k)) if k else img


class _Frames:
    """The frames of an open container; close() (or the end) closes the file, also before the first frame."""

    def __init__(self, container, path):
        self._container, self._it = container, _frames(container, path)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self) -> None:
        self._it.close()
        self._container.close()


def _frames(container, path):
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"                 # frame threads: decoding keeps up with a live engine
    start = None
    with container:
        try:
            for i, frame in enumerate(container.decode(stream)):
                if frame.pts is None or frame.time_base is None:   # raw streams carry no timestamps
                    t = i / float(stream.average_rate or 25)
                else:
                    t = float(frame.pts * frame.time_base)
                start = t if start is None else start
                yield t - start, _upright(frame)
        except (av.FFmpegError, ValueError) as e:
            raise AnitalkerError(f"cannot decode video from {path}: {e}") from e


def _even(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H', W', 3) C-contiguous with H', W' even (yuv420p); drops at most 1 row/col."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    return np.ascontiguousarray(img[:h, :w])


# ------------------------------------------------------------------------------------------ writing video
# Output names the writer understands -> the container it writes (H.264 + AAC in each).
CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
# Said in every file the project writes (the paper's ethics section asks that generated faces be marked).
DISCLOSURE = ("Generated with anitalker-live from one photo (AniTalker model): a synthetic video, not a "
              "recording of the person shown.")


def container_format(path) -> str:
    """The container for an output name, or one line that says which names work."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in CONTAINERS:
        raise AnitalkerError(f"cannot write video to {os.fspath(path)}: the name must end in "
                             f"{', '.join(CONTAINERS)} (H.264 + AAC)")
    return CONTAINERS[ext]


def check_output(path) -> None:
    """Refuse, in one line naming the path, an output that cannot be written: a name that is not a video
    container, a missing folder, a folder that is not writable, a folder given as the file. Commands call
    it before any model loads, so a typo costs a second, not a render."""
    path = os.fspath(path)
    container_format(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AnitalkerError(f"output folder does not exist: {folder}")
    if os.path.isdir(path):
        raise AnitalkerError(f"{path} is a folder; give the output file's name (e.g. {os.path.join(path, 'out.mp4')})")
    try:                                   # the real test: permissions, a read-only disk, ACLs, quotas
        fd, probe = tempfile.mkstemp(prefix=".anitalker-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise AnitalkerError(f"cannot write to the output folder {folder}: {e.strerror}") from None


class VideoWriter:
    """H.264 (libx264, yuv420p, crf 18) + AAC into the container the name asks for, frame by frame.

    The file grows under a hidden temporary name in the same folder and close() renames it into place, so
    ``path`` is either the finished file or untouched: discard() (and any error inside write or close)
    removes the temporary file instead. Every file carries DISCLOSURE in its metadata.
    write(image, audio): image uint8 (H, W, 3) RGB, every frame the size of the first (odd sizes lose the
    last row/column); audio: the samples that belong to this frame, (n,) mono or (n, C), any n, or None
    when the writer has no sound (audio=False).
    live: the file is recorded beside a live engine (the sinks' FileSink): x264's fastest preset on one
    thread, so that the encoder takes as little as it can of the cores the engine needs. On the 2-core
    machine `live --fast` to a file drew 8.6-9.7 frames/s with it against 7.7-7.9 with the default
    (preset medium, threads auto), interleaved runs; the file is larger for the same quality (crf 18).
    """

    def __init__(self, path, fps: int = 25, sample_rate: int = SAMPLE_RATE, audio: bool = True,
                 live: bool = False):
        self.path = os.fspath(path)
        self.format = container_format(self.path)
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise AnitalkerError(f"output folder does not exist: {folder}")
        # a hidden unique name in the same folder (so the rename is atomic); not mkstemp, whose 0600 mode
        # would end up on the finished video
        self.tmp = os.path.join(folder, f".{os.path.basename(self.path)}.{os.getpid()}.{secrets.token_hex(4)}.part")
        self.fps, self.rate, self.has_audio = Fraction(fps), int(sample_rate), audio
        if audio and self.rate not in AAC_RATES:
            raise ValueError(f"AAC takes {', '.join(map(str, AAC_RATES))} Hz, not {self.rate} (Sound.for_aac)")
        self.live = live
        self.frames = 0
        self._samples = 0                         # audio samples given to the encoder
        self._box = self._video = self._sound = None
        self.closed = False

    def _open(self, image: np.ndarray, audio) -> None:
        import av
        self._box = av.open(self.tmp, mode="w", format=self.format)
        self._box.metadata["comment"] = DISCLOSURE
        self._box.metadata["description"] = DISCLOSURE
        self._size = _even(image).shape[:2]
        self._video = self._box.add_stream("libx264", rate=self.fps)
        self._video.height, self._video.width = self._size
        options = {"crf": "18"} | ({"preset": "ultrafast", "threads": "1"} if self.live else {})
        self._video.pix_fmt, self._video.options = "yuv420p", options
        if self.has_audio:
            channels = 1 if audio is None or np.ndim(audio) == 1 else np.shape(audio)[1]
            self._layout = {1: "mono", 2: "stereo"}.get(channels)
            if self._layout is None:
                raise AnitalkerError(f"{self.path}: {channels}-channel audio; mono or stereo only")
            self._sound = self._box.add_stream("aac", rate=self.rate)
            self._sound.layout = self._layout
            # 96 kbps a channel keeps music clean; an AAC frame holds at most 6 bits a sample a channel
            self._sound.bit_rate = channels * min(96000, 6 * self.rate)

    def write(self, image, audio=None) -> None:
        try:
            self._write(np.asarray(image, dtype=np.uint8), audio)
        except BaseException:
            self.discard()
            raise

    def _write(self, image: np.ndarray, audio) -> None:
        import av
        if self.closed:
            raise ValueError(f"{self.path}: write after close")
        if self._box is None:
            self._open(image, audio)
        img = _even(image)
        if img.shape[:2] != self._size:
            raise ValueError(f"frame {self.frames + 1} is {img.shape[1]}x{img.shape[0]}, the first was "
                             f"{self._size[1]}x{self._size[0]}")
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = self.frames, 1 / self.fps
        self._box.mux(self._video.encode(frame))
        self.frames += 1
        if self._sound is not None and audio is not None and len(audio):
            x = np.ascontiguousarray(audio, dtype=np.float32)
            af = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="flt", layout=self._layout)
            # pts in samples lets the encoder's priming go into the edit list, so the decoded audio starts
            # exactly at the first video frame
            af.sample_rate, af.pts, af.time_base = self.rate, self._samples, Fraction(1, self.rate)
            self._box.mux(self._sound.encode(af))
            self._samples += len(x)

    def close(self) -> None:
        """Finish the file and rename it into place."""
        if self.closed:
            return
        try:
            if self._box is None:
                raise AnitalkerError("no video frames to write (is the audio shorter than one frame?)")
            self._box.mux(self._video.encode(None))
            if self._sound is not None:
                self._box.mux(self._sound.encode(None))
            self._box.close()
            os.replace(self.tmp, self.path)
            self.closed = True
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Drop what was written; ``path`` stays as it was."""
        self.closed = True
        if self._box is not None:
            try:
                self._box.close()
            except Exception:                  # a half-written container may not close cleanly: it goes anyway
                pass
            self._box = None
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_mp4(path, frames, audio, fps=25, sample_rate=SAMPLE_RATE, progress=None) -> None:
    """Write a video file (H.264 + AAC; mp4, mov or mkv by the name) atomically, with VideoWriter.

    frames: iterable of uint8 (H, W, 3) RGB, all the same size (odd sizes lose the last row/col).
    audio: a Sound (written at its own rate and channels), float32 (N,) mono or (N, C) at ``sample_rate``,
    or None for a silent video. A rate AAC does not take is resampled to the next one it does. The sound is
    cut or zero-padded to exactly round(n_frames * rate / fps) samples and interleaved with the video as it
    goes, frame by frame.
    progress(n) is called after each frame with the number of frames written so far.
    On any exception (or an interrupt) nothing is left behind and ``path`` is untouched.
    """
    if audio is not None and not isinstance(audio, Sound):
        x = np.asarray(audio, dtype=np.float32)
        audio = Sound(x.reshape(len(x), -1), int(sample_rate))
    sound = audio.for_aac() if audio is not None else None
    writer = VideoWriter(path, fps, sound.rate if sound else SAMPLE_RATE, audio=sound is not None)
    try:
        for count, img in enumerate(frames, start=1):
            chunk = None
            if sound is not None:              # the audio that belongs to the frames so far, zero-padded
                start, end = writer._samples, round(count * sound.rate / fps)
                chunk = np.zeros((end - start, sound.channels), np.float32)
                have = sound.samples[start:end]
                chunk[:len(have)] = have
            writer.write(img, chunk)
            if progress is not None:
                progress(count)
        writer.close()
    finally:
        if not writer.closed:
            writer.discard()


def read_video_info(path) -> dict:
    """Decode a video file -> {frames, width, height, fps, audio_seconds, audio_decoded_seconds,
    audio_rate}.

    audio_seconds is the container's (edit-list corrected) length in seconds; the decoder
    also outputs the padding of the last AAC frame, so audio_decoded_seconds may be up to one
    AAC frame (1024 samples) longer. Audio fields are 0 for a silent video.
    """
    path = os.fspath(path)
    with av.open(path) as container:
        vs = container.streams.video[0]
        info = {"width": vs.codec_context.width, "height": vs.codec_context.height,
                "fps": float(vs.average_rate), "frames": sum(1 for _ in container.decode(vs)),
                "audio_seconds": 0.0, "audio_decoded_seconds": 0.0, "audio_rate": 0}
    with av.open(path) as container:                   # a second pass: decode() demuxes it all
        if container.streams.audio:
            aus = container.streams.audio[0]
            info["audio_rate"] = aus.rate
            info["audio_seconds"] = float(aus.duration * aus.time_base) if aus.duration else 0.0
            samples = sum(f.samples for f in container.decode(aus))
            info["audio_decoded_seconds"] = samples / aus.rate
    return info
