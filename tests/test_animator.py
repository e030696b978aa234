"""The streaming engine end to end on tiny generated checkpoints: frames, their audio, determinism."""
from __future__ import annotations

import importlib.util

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


def test_speech_after_the_end_of_an_utterance_starts_a_new_segment(engine):
    """After flush(), more speech is a new segment: its first window has no context (its features have
    none) and continues from the last code; its frames follow on."""
    animator, frames = stream(engine, tone(1.0), 640)
    last = animator.motion.last_code.clone()
    hints = []
    plan = animator.motion.plan
    animator.motion.plan = lambda *a, **k: (lambda w: (hints.append((w.n_ctx, w.hint)), w)[1])(plan(*a, **k))
    more = animator.push(AudioChunk(tone(0.8), 0)) + animator.flush()
    assert [f.pts for f in more] == list(range(len(frames), len(frames) + 20))
    assert hints[0][0] == 0 and torch.equal(hints[0][1], last)


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
    plan = animator.motion.plan
    animator.motion.plan = lambda *a, **k: (lambda w: (hints.append(w.hint), w)[1])(plan(*a, **k))
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


def test_fast_live_mode_streams_incremental_hubert(tiny_checkpoints, tmp_path, capsys):
    """--fast: the fastest mode on this machine (fp32 without native bf16), incremental HuBERT."""
    from avatar.media import read_video_info
    from streaming.cli import build_parser, make_live_animator
    from streaming.clock import FakeTime
    from streaming.live import cmd_live
    from test_render import write_wav

    wav, out = write_wav(tmp_path / "a.wav", tone(1.0)), tmp_path / "live.mp4"
    args = build_parser().parse_args(["live", "--checkpoints", str(tiny_checkpoints), "--audio", str(wav),
                                      "--to", f"file:{out}", "--metrics-every", "0", "--steps", "5", "--fast"])
    animator = make_live_animator(args)
    assert animator.config.hubert == "incremental" and animator.features._inc is not None
    assert cmd_live(args, lambda a: animator, time_source=FakeTime()) == 0
    err = capsys.readouterr().err
    assert "speed: " in err
    assert read_video_info(out)["frames"] >= 25
    # on a CPU with native bf16 and the [openvino] extra installed, the denoiser runs there and says so
    openvino = animator.models.speed.denoiser == "openvino"
    assert openvino == (animator.models.speed.precision == "bf16" and importlib.util.find_spec("openvino") is not None)
    assert ("stage-2 denoiser on OpenVINO" in err) == openvino


def test_engine_rate_arithmetic():
    from avatar.probe import EngineRate

    fast = EngineRate(hop=10, features_s=0.05, motion_s=0.05, render_s=0.02)
    assert fast.fps == 25 and abs(fast.rtf - 0.75) < 1e-9 and "real time" in fast.line()
    slow = EngineRate(hop=10, features_s=0.1, motion_s=0.1, render_s=0.1)    # 0.2 s left for 2 renders
    assert abs(slow.fps - 5.0) < 1e-9 and abs(slow.rtf - 3.0) < 1e-9 and "5.0 of 25" in slow.line()
    stuck = EngineRate(hop=10, features_s=0.3, motion_s=0.2, render_s=0.01)
    assert stuck.fps == 0 and "cannot keep up" in stuck.line()


def test_measure_rate_times_every_stage(engine):
    from avatar.probe import measure_rate

    models, code = engine
    for hubert in ("window", "incremental"):
        r = measure_rate(models, code, hop=4, lookahead=2, context=4, steps=2, hubert=hubert)
        assert r.hop == 4 and min(r.features_s, r.motion_s, r.render_s) > 0


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
    # the start says the mode and the frame rate this machine reaches with it
    assert "speed: fp32, transposed upsampling on cpu" in err and "ms/frame" in err
    info = read_video_info(out)
    assert info["frames"] >= 25 and (info["width"], info["height"]) == (256, 256)
