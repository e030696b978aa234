"""Offline rendering to a video file: a portrait and an audio file in one pass over the utterance (or through\nthe streaming engine), and a portrait driven by a video (reenactment)."""
from __future__ import annotations

import os
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from models.errors import AnitalkerError

from .media import Sound, decode_audio, has_audio, read_video_frames, video_seconds, write_mp4
from .pipeline import Controls, Models, encode_portrait, generate_motion, render
from .portrait import load_image, prepare_portrait, to_tensor, to_uint8
from .reenact import ReenactConfig, Reenactor, TimedFrames
from .timebase import SAMPLE_RATE, SAMPLES_PER_FRAME, AudioChunk
from .watermark import make_finish


@dataclass
class Timings:
    """Seconds per stage, in the order they ran."""
    seconds: dict = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    def table(self) -> str:
        total = sum(self.seconds.values())
        rows = [f"  {k:<10} {v:8.2f} s" for k, v in self.seconds.items()]
        return "\n".join(rows + [f"  {'total':<10} {total:8.2f} s"])


def load_sound(path) -> Sound:
    """The input's audio as the output will carry it; a mixdown of more than two channels is said once."""
    sound = decode_audio(path)
    if sound.mixed_from:
        print(f"{os.fspath(path)}: {sound.mixed_from} audio channels, mixed down to stereo for the output",
              file=sys.stderr)
    return sound


def _stream(animator, wave: np.ndarray, step: int):
    """Push ``wave`` in chunks of ``step`` samples as a live source would, then flush: the lists of frames
    the engine returns, ceil(len(wave) / 640) frames in all."""
    for i in range(0, len(wave), step):
        yield animator.push(AudioChunk(wave[i:i + step], i))
    yield animator.flush()


@contextmanager
def _feature_progress(models: Models, progress: bool):
    """A bar for the speech-feature stage, which is one forward pass: it counts HuBERT's convolutional front
    and each transformer layer as they finish (MFCC: one step)."""
    hubert = models.hubert.model if models.hubert is not None and models.stage2.dims.audio == "hubert" else None
    parts = [hubert.feature_extractor, *hubert.encoder.layers] if hubert is not None else []
    with tqdm(total=max(1, len(parts)), desc="features", unit="layer" if parts else "step",
              disable=not progress) as bar:
        def done(*_):                                  # returns None: the module's output stays as it is
            bar.update(1)
        hooks = [m.register_forward_hook(done) for m in parts]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
        bar.update(bar.total - bar.n)


def render_file_streaming(animator, original, box, audio_path, out_path, *, paste_back: bool = False,
                          watermark: str | None = None, chunk_ms: int = 20, progress: bool = True) -> Timings:
    """Render a file through the streaming engine: the audio is pushed in ``chunk_ms`` chunks as a live
    source would push it, and the frames go to the video file with the input's audio at its own rate."""
    sound = load_sound(audio_path)
    wave = sound.mono16k()
    finish = make_finish(original, box, paste_back=paste_back, watermark=watermark)
    step = 16 * chunk_ms

    def frames():  # written as they come, so a long file never sits in memory
        with tqdm(total=-(-len(wave) // 640), desc="stream", unit="frame", disable=not progress) as bar:
            for out in _stream(animator, wave, step):
                bar.update(len(out))
                for f in out:
                    yield finish(f.image)

    # The frames carry exactly the wave's samples, padded with silence to whole frames: write_mp4 pads the
    # input's own sound the same way, so it lines up with them sample for sample.
    t0 = time.perf_counter()
    write_mp4(out_path, frames(), sound)
    timings = Timings(dict(animator.timings))
    timings.seconds["encode"] = time.perf_counter() - t0 - sum(animator.timings.values())
    return timings


def render_file(models: Models, portrait_path, audio_path, out_path, *, controls: Controls = Controls(),
                steps: int = 50, seed: int = 0, crop: bool = True, paste_back: bool = False,
                watermark: str | None = None, batch: int | None = None, progress: bool = True) -> Timings:
    """Render ``out_path`` (H.264 + AAC, 25 fps) in one pass over the utterance, as the official code does.
    Nothing is written unless every step succeeds. batch: frames per renderer call (default: the models'
    clip_batch: 16 on a GPU, not measured there yet; 2 compiled on a CPU, 1 otherwise)."""
    timings = Timings()
    with timings("portrait"):
        original = load_image(portrait_path)
        portrait = prepare_portrait(original, crop=crop)
        code = encode_portrait(models, to_tensor(portrait.image))
    sound = load_sound(audio_path)
    wave = sound.mono16k()
    with timings("features"), _feature_progress(models, progress):
        audio, frames = models.features(wave)
    if frames < 1:
        raise AnitalkerError(f"{audio_path} is too short: it needs at least 40 ms of audio for one video frame")
    with timings("motion"), tqdm(total=steps, desc="motion", unit="step", disable=not progress) as bar:
        alphas = generate_motion(models, code, audio, frames, controls, steps, seed,
                                 on_step=lambda *_: bar.update(1))[0]
    finish = make_finish(original, portrait.box, paste_back=paste_back, watermark=watermark)

    def frames_u8():
        with tqdm(total=frames, desc="render", unit="frame", disable=not progress) as bar:
            batches = render(models, code, alphas, batch)
            while True:
                with timings("render"):  # the renderer runs inside next(), so time it there
                    out = next(batches, None)
                    if out is None:
                        return
                    imgs = to_uint8(out)              # converted on the device: only bytes come back
                    if finish:
                        imgs = np.stack([finish(img) for img in imgs])
                bar.update(len(imgs))
                yield from imgs

    t0 = time.perf_counter()
    write_mp4(out_path, frames_u8(), sound)           # the input's audio at its own rate and channels
    timings.seconds["encode"] = time.perf_counter() - t0 - timings.seconds["render"]
    return timings


def reenact_file(models: Models, portrait_path, video_path, out_path, *, config: ReenactConfig = ReenactConfig(),
                 crop: bool = True, paste_back: bool = False, watermark: str | None = None,
                 progress: bool = True) -> Timings:
    """The face in ``video_path`` drives the portrait: ``out_path`` at 25 fps for the clip's duration, with
    the clip's audio (silence when it has none). ``crop`` is about the portrait; ``config.crop`` about the
    driving frames. Frames are written as they come, so a long clip never sits in memory."""
    timings = Timings()
    with timings("portrait"):
        original = load_image(portrait_path)
        portrait = prepare_portrait(original, crop=crop)
        code = encode_portrait(models, to_tensor(portrait.image))
    frames = read_video_frames(video_path)        # checks the file and its video track first
    with closing(frames):                         # the decoder's file is closed also when writing fails
        seconds = video_seconds(video_path)
        n_samples = max(SAMPLES_PER_FRAME, round(seconds * SAMPLE_RATE))
        track = np.zeros(n_samples, np.float32)       # what the engine reads: 16 kHz mono for the clip's length
        if has_audio(video_path):                     # the output keeps the clip's sound as it is
            sound = load_sound(video_path)
            sound = sound.cut(round(seconds * sound.rate))
            wave = sound.mono16k()
            track[:min(len(wave), n_samples)] = wave[:n_samples]
        else:                                         # no sound: driven over silence
            sound = Sound.silence(n_samples)
        animator = Reenactor(models, code, TimedFrames(frames), config)
        finish = make_finish(original, portrait.box, paste_back=paste_back, watermark=watermark)
        step = 16 * 20                            # 20 ms chunks, as a live source pushes them

        def out_frames():
            with tqdm(total=-(-n_samples // SAMPLES_PER_FRAME), desc="reenact", unit="frame",
                      disable=not progress) as bar:
                for out in _stream(animator, track, step):
                    bar.update(len(out))
                    for f in out:
                        yield finish(f.image)

        t0 = time.perf_counter()
        write_mp4(out_path, out_frames(), sound)
    timings.seconds.update(animator.timings)
    timings.seconds["encode"] = time.perf_counter() - t0 - sum(animator.timings.values())
    return timings
