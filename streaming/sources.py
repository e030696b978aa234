"""Audio sources: async iterators of 16 kHz AudioChunks.

File and TTS sources yield as fast as they are read; the session's bounded queues and the clock make them
play in real time (pacing lives in the clock only). The microphone is paced by its device, so it is
marked ``live``: the session drops its oldest audio rather than let latency grow.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil

import numpy as np

from avatar.media import Splitter, check_finite
from avatar.timebase import SAMPLE_RATE, AudioChunk
from models.errors import AnitalkerError


class PcmSource:
    """Adapts any async iterator of (pcm, rate) -- piper, kokoro, a cloud TTS, a socket -- to AudioChunks.
    pcm: float in [-1, 1] or int16, mono or (N, C). live=True for audio that arrives in real time (a
    remote microphone): the session then bounds its latency by dropping the oldest audio."""

    def __init__(self, pcm_iter, live: bool = False):
        self._it, self.live = pcm_iter, live

    async def __aiter__(self):
        pts, resamplers = 0, {}
        async for pcm, rate in self._it:
            x = np.asarray(pcm)
            x = x.astype(np.float32) / 32768.0 if x.dtype == np.int16 else x.astype(np.float32)
            if not np.isfinite(x).all():    # a broken producer must not turn the models' output into NaN
                x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
            hi = None
            if rate != SAMPLE_RATE:         # the models get 16 kHz, the outputs keep 48 kHz of it
                x, hi = resamplers.setdefault(rate, Splitter(rate))(x)
            elif x.ndim == 2:
                x = x.mean(axis=1)
            if len(x):
                yield AudioChunk(x, pts, hi=hi)
                pts += len(x)
        for r in resamplers.values():       # the ms still inside the filters
            tail, hi = r.flush()
            if len(tail):
                yield AudioChunk(tail, pts, hi=hi)
                pts += len(tail)


class FileSource:
    """Any audio PyAV decodes (first audio track), decoded incrementally. Samples that are not numbers (a
    damaged float wav) end it with one line naming the file and the time, like the offline commands."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise AnitalkerError(f"audio file not found: {self.path}")

    def __aiter__(self):
        return PcmSource(self._decode()).__aiter__()

    async def _decode(self):
        import av
        try:
            with av.open(self.path) as box:
                if not box.streams.audio:
                    raise AnitalkerError(f"{self.path} has no audio track")
                done = 0                                # samples so far, at the file's rate
                for frame in box.decode(box.streams.audio[0]):
                    x = frame.to_ndarray()
                    # planar (C, N) or packed (1, N*C) -> (N, C)
                    x = x.T if frame.format.is_planar else x.reshape(-1, len(frame.layout.channels))
                    if x.dtype.kind == "f":
                        check_finite(x, self.path, done, frame.sample_rate)
                    done += len(x)
                    yield x, frame.sample_rate
                    await asyncio.sleep(0)         # a long file must not hold the event loop
        except av.FFmpegError as e:
            raise AnitalkerError(f"cannot decode audio from {self.path}: {e}") from e


def sentences(text: str) -> list[str]:
    """Split after . ! ? (and their CJK forms) so the first sentence can be spoken while the rest wait."""
    return [s.strip() for s in re.split(r"(?<=[.!?。！？])\s+", text.strip()) if s.strip()]


async def espeak_pcm(text: str, voice: str | None = None, speed: int | None = None):
    """(int16 pcm, rate) per sentence from espeak-ng; the next sentence is synthesised while one plays."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise AnitalkerError("espeak-ng is not installed: apt install espeak-ng (macOS: brew install espeak-ng)")
    args = [exe, "--stdout"] + (["-v", voice] if voice else []) + (["-s", str(speed)] if speed else [])

    async def synth(sentence: str):
        proc = await asyncio.create_subprocess_exec(*args, "--", sentence, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        wav, err = await proc.communicate()
        if proc.returncode != 0 or wav[:4] != b"RIFF":
            raise AnitalkerError(f"espeak-ng failed: {err.decode(errors='replace').strip()}")
        # espeak-ng streams its wav with placeholder sizes, so read the header by hand
        rate = int.from_bytes(wav[24:28], "little")
        data = wav.index(b"data") + 8
        return np.frombuffer(wav[data:len(wav) - (len(wav) - data) % 2], np.int16), rate

    parts = sentences(text)
    nxt = asyncio.ensure_future(synth(parts[0])) if parts else None
    for i in range(len(parts)):
        cur = await nxt
        nxt = asyncio.ensure_future(synth(parts[i + 1])) if i + 1 < len(parts) else None
        yield cur


class TTSSource:
    """Speaks text with espeak-ng (or any (pcm, rate) iterator factory), one sentence at a time.
    interrupt() drops the sentences not yet spoken."""

    def __init__(self, text: str, voice: str | None = None, speed: int | None = None, engine=espeak_pcm):
        self.text, self.voice, self.speed, self.engine = text, voice, speed, engine
        self._stopped = False

    async def __aiter__(self):
        async for chunk in PcmSource(self.engine(self.text, self.voice, self.speed)):
            if self._stopped:
                return
            yield chunk

    def interrupt(self) -> None:
        self._stopped = True


class MicSource:
    """A microphone through sounddevice at the device's own rate: 16 kHz for the models, 48 kHz of it kept
    for the outputs.

    The PortAudio callback runs on its own thread; it copies the block and hands it to the event loop
    with call_soon_threadsafe (never blocks). Overflows (the device's and our own full queue) are counted.
    """
    live = True

    def __init__(self, device=None, blocks: int = 100):
        self.device = device
        self.overflows = 0
        self.rate = None
        self._blocks = blocks

    async def __aiter__(self):
        from .sinks import import_sounddevice
        sd = import_sounddevice()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue(maxsize=self._blocks)

        def put(block):                 # runs on the loop
            try:
                q.put_nowait(block)
            except asyncio.QueueFull:
                self.overflows += 1

        def callback(indata, frames, _time, status):   # runs on PortAudio's thread
            if status.input_overflow:
                self.overflows += 1
            hand_off(indata[:, 0].copy())

        def hand_off(block):
            try:
                loop.call_soon_threadsafe(put, block)
            except RuntimeError:        # the loop has closed: nobody is listening any more
                pass

        try:
            self.rate = int(sd.query_devices(self.device, "input")["default_samplerate"])
            stream = sd.InputStream(device=self.device, samplerate=self.rate, channels=1, dtype="float32",
                                    callback=callback,
                                    finished_callback=lambda: hand_off(None))
        except (sd.PortAudioError, ValueError) as e:
            raise AnitalkerError(f"cannot open the microphone: {e} (anitalker devices lists them)") from None
        split, pts = Splitter(self.rate) if self.rate != SAMPLE_RATE else None, 0
        with stream:
            while (block := await q.get()) is not None:     # None: the stream has finished
                x, hi = split(block) if split is not None else (block, None)
                if len(x):
                    yield AudioChunk(x, pts, hi=hi)
                    pts += len(x)
