"""Audio in, MP4 out, through PyAV only (no ffmpeg binary, no torchaudio).

The model works on 16 kHz mono float32 audio and 25 fps video: one video frame per 640 samples.
"""
import itertools
import os
import secrets
from fractions import Fraction

import av
import numpy as np

from models.errors import AnitalkerError

SAMPLE_RATE = 16000
# sample rates the AAC encoder accepts; anything else is resampled to 48 kHz in the container
_AAC_RATES = {8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000}


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


def resample(wave, rate: int) -> np.ndarray:
    """(N,) or (N, C) audio at `rate` Hz -> (M,) float32 mono at 16 kHz, M = round(N*16000/rate)."""
    x = np.asarray(wave, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if int(rate) == SAMPLE_RATE or x.size == 0:
        return x.copy()
    r = Resampler(rate)
    return np.concatenate([r(x), r.flush()])


def load_audio(path) -> np.ndarray:
    """Any file PyAV decodes (its first audio track) -> (N,) float32 mono at 16 kHz."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AnitalkerError(f"audio file not found: {path}")
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise AnitalkerError(f"{path} has no audio track: give a wav/mp3/ogg/flac file "
                                     "or a video with sound")
            stream = container.streams.audio[0]
            # keep the channels through the resampler and average afterwards (librosa's to_mono)
            swr = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)
            chunks = [f.to_ndarray() for frame in container.decode(stream)
                      for f in swr.resample(frame)]
            chunks += [f.to_ndarray() for f in swr.resample(None)]
    except (av.FFmpegError, ValueError) as e:       # ValueError: format change mid-stream
        raise AnitalkerError(f"cannot decode audio from {path}: {e}") from e
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise AnitalkerError(f"{path} contains no audio samples")
    return np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32)


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
    return _frames(container, path)


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


def write_mp4(path, frames, audio, fps=25, sample_rate=SAMPLE_RATE, progress=None) -> None:
    """Write H.264 (libx264, yuv420p, crf 18) + AAC mono to `path`, atomically.

    frames: iterable of uint8 (H, W, 3) RGB, all the same size (odd sizes lose the last row/col).
    audio: float32 mono at `sample_rate`, or None for a silent video. It is cut or zero-padded
    to exactly n_frames * sample_rate / fps samples and interleaved with the video as it goes.
    progress(n) is called after each frame with the number of frames written so far.
    The file is written to a temporary name in the same folder and renamed at the end; on any
    exception the temporary file is removed and `path` is left untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AnitalkerError(f"output folder does not exist: {folder}")
    # a hidden unique name in the same folder (so the rename is atomic); not mkstemp, whose
    # 0600 mode would end up on the finished video
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            _mux(container, frames, audio, Fraction(fps), int(sample_rate), progress)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _mux(container, frames, audio, fps: Fraction, rate: int, progress) -> int:
    """Encode frames and the matching audio into an open container -> number of frames."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise AnitalkerError("no video frames to write (is the audio shorter than one frame?)")
    height, width = _even(np.asarray(first)).shape[:2]
    video = container.add_stream("libx264", rate=fps)
    video.width, video.height, video.pix_fmt = width, height, "yuv420p"
    video.options = {"crf": "18"}
    sound = None
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        sound = container.add_stream("aac", rate=rate if rate in _AAC_RATES else 48000)
        sound.layout = "mono"
    fed = 0                                             # audio samples given to the encoder
    for count, img in enumerate(itertools.chain([first], frames), start=1):
        img = _even(np.asarray(img, dtype=np.uint8))
        if img.shape[:2] != (height, width):
            raise ValueError(f"frame {count} is {img.shape[1]}x{img.shape[0]}, "
                             f"the first was {width}x{height}")
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = count - 1, 1 / fps
        container.mux(video.encode(frame))
        if sound is not None:
            end = round(count * rate / fps)             # audio that belongs to the frames so far
            fed = _encode_audio(container, sound, audio, fed, end, rate)
        if progress is not None:
            progress(count)
    container.mux(video.encode(None))
    if sound is not None:
        container.mux(sound.encode(None))
    return count


def _encode_audio(container, sound, audio, start: int, end: int, rate: int) -> int:
    """Encode audio[start:end] (zero-padded past its end) -> end.

    pts in samples lets the encoder's 1024-sample priming go into the mp4 edit list, so the
    decoded audio starts exactly at the first video frame.
    """
    chunk = np.zeros(end - start, np.float32)
    have = audio[start:end]
    chunk[:len(have)] = have
    frame = av.AudioFrame.from_ndarray(chunk[None], format="flt", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
    container.mux(sound.encode(frame))
    return end


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
