"""The streaming engine end to end on tiny generated checkpoints: frames, their audio, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from avatar.animator import StreamConfig, StreamingAnimator
from avatar.pipeline import Controls, encode_portrait, generate_motion, load_models, render
from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor, to_uint8
from avatar.timebase import AudioChunk, frames_for_samples
from conftest import tone


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    models = load_models(tiny_checkpoints, "hubert_full_control", "cpu")
    code = encode_portrait(models, to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image))
    return models, code


def stream(engine, wave, chunk, config=StreamConfig(steps=5), controls_at=None, flush=True):
    """Push wave in chunks of `chunk` samples; controls_at = (sample, Controls) changes controls there."""
    animator = StreamingAnimator(*engine, config)
    frames = []
    for i in range(0, len(wave), chunk):
        if controls_at and i <= controls_at[0] < i + chunk:
            animator.set_controls(controls_at[1])
        frames += animator.push(AudioChunk(wave[i:i + chunk], i))
    if flush:
        frames += animator.flush()
    return animator, frames


def test_frames_carry_exactly_their_audio(engine):
    wave = tone(1.37)                         # 21920 samples: 34.25 frames -> 35, the last padded
    _, frames = stream(engine, wave, 320)
    assert len(frames) == frames_for_samples(len(wave)) == 35
    assert [f.pts for f in frames] == list(range(35))
    audio = np.concatenate([f.audio for f in frames])
    assert all(len(f.audio) == 640 for f in frames)
    np.testing.assert_array_equal(audio[:len(wave)], wave)
    assert not audio[len(wave):].any()
    assert all(f.image.shape == (256, 256, 3) and f.image.dtype == np.uint8 for f in frames)
    assert all(f.pushed_at <= f.produced_at for f in frames)


def test_output_does_not_depend_on_chunking(engine):
    wave = tone(1.2, freq=180)
    _, a = stream(engine, wave, 16)           # 1 ms chunks
    _, b = stream(engine, wave, 16000)        # 1 s chunks
    assert len(a) == len(b) == 30
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.audio, y.audio)


def test_one_window_equals_offline_generation(engine):
    models, code = engine
    wave = tone(0.8, freq=300)                # 20 whole frames
    config = StreamConfig(hop=64, context=0, lookahead=0, audio_context=64, steps=5, normalize="window", seed=3)
    _, frames = stream(engine, wave, 640, config)
    audio, n = models.features(wave)
    with torch.inference_mode():
        alphas = generate_motion(models, code, audio, n, steps=5, seed=3)[0]
        offline = to_uint8(torch.cat(list(render(models, code, alphas))))
    assert len(frames) == n == 20
    assert all(np.array_equal(f.image, o) for f, o in zip(frames, offline))


def test_silence_keeps_frames_coming(engine):
    animator, frames = stream(engine, np.zeros(16000, np.float32), 640, flush=False)
    assert len(frames) >= 25 - animator.latency_frames     # all but the hop + lookahead still in flight
    assert np.isfinite(np.stack([f.image for f in frames]).astype(float)).all()


def test_reset_drops_pending_audio_and_keeps_the_last_code(engine):
    wave = tone(1.0)
    animator, frames = stream(engine, wave, 480, flush=False)
    before = animator.motion.last_code.clone()
    pending = len(wave) // 640 - len(frames)
    assert pending > 0
    animator.reset()
    assert torch.equal(animator.motion.last_code, before)
    more = animator.push(AudioChunk(tone(0.8), 0)) + animator.flush()
    assert len(more) == 20                    # only the new audio: the pending frames were dropped
    assert [f.pts for f in more] == list(range(frames[-1].pts + 1, frames[-1].pts + 21))


def test_reset_continues_from_the_frame_the_viewer_saw_last(engine):
    """Frames carry their motion code; reset(last) makes that code the next window's hint, so frames that
    were computed but never shown do not pull the head along."""
    animator, frames = stream(engine, tone(1.6), 640, flush=False)
    assert all(f.meta["motion"].shape == (20,) for f in frames)
    shown = frames[3]
    assert not np.array_equal(animator.motion.last_code[0].numpy(), shown.meta["motion"])
    animator.reset(shown)
    np.testing.assert_array_equal(animator.motion.last_code[0].numpy(), shown.meta["motion"])
    hints = []
    step = animator.motion.step
    animator.motion.step = lambda *a, **k: (hints.append(animator.motion.tail[:, 0].clone()), step(*a, **k))[1]
    animator.push(AudioChunk(tone(0.8), 0))
    np.testing.assert_array_equal(hints[0][0].numpy(), shown.meta["motion"])


def test_controls_the_model_lacks_or_out_of_range_are_refused_at_the_call(tiny_checkpoints, engine):
    from avatar.pipeline import encode_portrait
    from models.errors import AnitalkerError

    audio_only = load_models(tiny_checkpoints, "hubert_audio_only", "cpu")
    animator = StreamingAnimator(audio_only, encode_portrait(audio_only, torch.zeros(1, 3, 256, 256)))
    assert animator.control_names == ()
    with pytest.raises(AnitalkerError, match="no pose control"):
        animator.set_controls(Controls(pose=np.zeros(3, np.float32)))
    full = StreamingAnimator(*engine)
    assert full.control_names == ("location", "scale", "pose") or set(full.control_names) == {"location", "scale", "pose"}
    for bad, why in ((Controls(location=float("nan")), "finite"), (Controls(scale=1.5), "within"),
                     (Controls(pose=np.array([2.0, 0, 0], np.float32)), "within"),
                     (Controls(pose=np.array([0, np.inf, 0], np.float32)), "finite")):
        with pytest.raises(AnitalkerError, match=why):
            full.set_controls(bad)
    assert full.controls == Controls()                  # a refused control changes nothing
    with pytest.raises(AnitalkerError, match="no pose control"):
        StreamingAnimator(audio_only, encode_portrait(audio_only, torch.zeros(1, 3, 256, 256)),
                          controls=Controls(pose=np.zeros(3, np.float32)))


def test_controls_change_between_hops(engine):
    wave = tone(1.6)
    _, base = stream(engine, wave, 640, StreamConfig(steps=5))
    change_at = 16 * 640                      # during the second hop's audio
    _, changed = stream(engine, wave, 640, StreamConfig(steps=5),
                        controls_at=(change_at, Controls(pose=np.array([0.5, 0.0, 0.0], np.float32))))
    same = [np.array_equal(a.image, b.image) for a, b in zip(base, changed)]
    assert all(same[:10])                     # hops already committed are not touched
    assert not all(same[10:])                 # the new pose takes effect from a following hop


def test_latency_is_stated(engine):
    animator = StreamingAnimator(*engine, StreamConfig(hop=8, lookahead=4))
    assert animator.latency_frames == 13 and abs(animator.latency_s - 0.52) < 1e-9


def test_live_command_with_the_real_engine(tiny_checkpoints, tmp_path, capsys):
    """`anitalker live --audio F --to file:` through the session, the clock and the tiny models."""
    from avatar.media import read_video_info
    from streaming.cli import build_parser, make_live_animator
    from streaming.clock import FakeTime
    from streaming.live import cmd_live
    from test_render import write_wav

    wav, out = write_wav(tmp_path / "a.wav", tone(1.0)), tmp_path / "live.mp4"
    args = build_parser().parse_args(["live", "--checkpoints", str(tiny_checkpoints), "--audio", str(wav),
                                      "--to", f"file:{out}", "--metrics-every", "0", "--steps", "5"])
    assert cmd_live(args, make_live_animator, time_source=FakeTime()) == 0
    err = capsys.readouterr().err
    assert "configured latency" in err and "metrics:" in err
    info = read_video_info(out)
    assert info["frames"] >= 25 and (info["width"], info["height"]) == (256, 256)
