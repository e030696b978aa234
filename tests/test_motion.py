"""Sliding-window motion (avatar/motion.py) on the tiny stage-2 model."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from avatar import pipeline
from avatar.motion import MotionConfig, MotionStream, motion_noise
from models.errors import AnitalkerError
from models.sampler import ddim_sample, ddim_schedule
from tests.conftest import tiny_stage2

F = 50


def inputs(model, frames=F, seed=1):
    d, g = model.dims, torch.Generator().manual_seed(seed)
    audio = (torch.randn(1, d.hubert_layers, 2 * frames, d.hubert_dim, generator=g) if d.audio == "hubert"
             else torch.randn(1, 4 * frames, d.mfcc_dim, generator=g))
    return torch.randn(1, d.style_dim, generator=g), torch.rand(1, d.motion_dim, generator=g) * 2 - 1, audio


def window_audio(model, audio, lo, hi):
    return audio[:, :, 2 * lo:2 * hi] if model.dims.audio == "hubert" else audio[:, 4 * lo:4 * hi]


def stream_all(model, wa, alpha0, audio, cfg, frames=F, controls=lambda start: None, copies=None):
    """Drive a stream over the whole input as a caller would: -> (frames, M) and the per-hop outputs
    (cloned into ``copies`` as they come, when given)."""
    s, outs = MotionStream(model, wa, alpha0, cfg), []
    while s.next < frames:
        lo, hi = s.window(s.next)
        outs.append(s.step(s.next, window_audio(model, audio, lo, min(hi, frames)), controls(s.next), hi >= frames))
        if copies is not None:
            copies.append(outs[-1].clone())
    return torch.cat(outs), outs


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_stage2()


def test_noise_is_per_frame():
    whole = motion_noise(3, 0, 200, 20)
    assert whole.shape == (1, 200, 20)
    assert torch.equal(motion_noise(3, 70, 130, 20), whole[:, 70:130])
    assert torch.equal(motion_noise(3, 5, 5, 20), whole[:, :0])
    assert not torch.allclose(motion_noise(4, 0, 64, 20), whole[:, :64])


def test_config_is_checked():
    with pytest.raises(AnitalkerError):
        MotionConfig(continuity="blend")
    with pytest.raises(AnitalkerError, match="nearby valid step counts"):
        MotionConfig(steps=1)


def offline(model, wa, alpha0, audio, steps, seed, frames=F):
    """The one-pass offline generation (pipeline.generate_motion's body) with motion_noise as x_T."""
    cond = model.condition(wa, alpha0, audio)
    x_T = motion_noise(seed, 0, frames, model.dims.motion_dim)
    return ddim_sample(lambda x, t: model.eps(cond, x, t), x_T, ddim_schedule(steps))[0]


@pytest.mark.parametrize("audio_kind", ["hubert", "mfcc"])
def test_one_window_equals_offline(audio_kind):
    model = tiny_stage2(audio_kind)
    wa, alpha0, audio = inputs(model)
    ref = offline(model, wa, alpha0, audio, steps=10, seed=7)
    for cfg in (MotionConfig(hop=F, context=0, lookahead=0, steps=10, seed=7),
                MotionConfig(hop=1000, context=0, lookahead=0, steps=10, seed=7)):
        out, _ = stream_all(model, wa, alpha0, audio, cfg)
        assert torch.equal(out, ref)


def test_one_window_equals_generate_motion(model):
    if "motion_noise" not in inspect.unwrap(pipeline.generate_motion).__code__.co_names:
        pytest.skip("pipeline.generate_motion does not draw its noise from motion_noise yet")
    wa, alpha0, audio = inputs(model)
    models = pipeline.Models(SimpleNamespace(render=None), model, None, torch.device("cpu"))
    ref = pipeline.generate_motion(models, pipeline.PortraitCode(wa, alpha0, []), audio, F, steps=10, seed=7)
    out, _ = stream_all(model, wa, alpha0, audio, MotionConfig(hop=F, context=0, lookahead=0, steps=10, seed=7))
    assert torch.equal(out, ref[0])


@pytest.mark.parametrize("continuity", ["inpaint", "crossfade", "inpaint+crossfade", "none"])
def test_deterministic_and_causal(model, continuity):
    wa, alpha0, audio = inputs(model)
    cfg = MotionConfig(hop=10, context=10, lookahead=5, steps=5, continuity=continuity)
    a, hops = stream_all(model, wa, alpha0, audio, cfg)
    b, _ = stream_all(model, wa, alpha0, audio, cfg)
    assert a.shape == (F, 20) and [len(h) for h in hops] == [10, 10, 10, 10, 10]
    assert torch.equal(a, b)
    # Audio after the second window's end (frame 25) cannot change the frames committed so far.
    changed = audio.clone()
    changed[:, :, 2 * 25:] = 0
    c, _ = stream_all(model, wa, alpha0, changed, cfg)
    assert torch.equal(c[:20], a[:20]) and not torch.equal(c[20:], a[20:])


def test_committed_frames_never_change(model):
    wa, alpha0, audio = inputs(model)
    for continuity in ("inpaint", "inpaint+crossfade"):
        copies = []
        _, hops = stream_all(model, wa, alpha0, audio, MotionConfig(steps=5, continuity=continuity), copies=copies)
        assert all(torch.equal(h, c) for h, c in zip(hops, copies))


def record_hints(model, monkeypatch) -> list:
    """The alpha0 (hint) of every condition() call from now on."""
    hints, condition = [], model.condition
    monkeypatch.setattr(model, "condition",
                        lambda wa, a0, *rest, **kw: hints.append(a0) or condition(wa, a0, *rest, **kw))
    return hints


def test_inpaint_keeps_context_and_hints_with_frame_before_window(model, monkeypatch):
    wa, alpha0, audio = inputs(model)
    cfg = MotionConfig(hop=10, context=10, lookahead=5, steps=5)
    s = MotionStream(model, wa, alpha0, cfg)
    hints = record_hints(model, monkeypatch)
    first = s.step(0, window_audio(model, audio, *s.window(0)))
    assert s.window(10) == (0, 25)
    second = s.step(10, window_audio(model, audio, 0, 25))
    seen, eps = [], model.eps
    monkeypatch.setattr(model, "eps", lambda cond, x, t: seen.append((x.clone(), int(t[0]))) or eps(cond, x, t))
    assert s.window(20) == (10, 35)
    s.step(20, window_audio(model, audio, 10, 35))
    # windows [0, 15) and [0, 25) start at frame 0: the portrait's code; [10, 35): frame 9
    assert torch.equal(hints[0], alpha0) and torch.equal(hints[1], alpha0) and torch.equal(hints[2], first[-1:])
    sched, noise = ddim_schedule(5), motion_noise(0, 10, 20, 20)
    for x, t in seen:
        a = sched.alphas_cumprod.float()[list(sched.timesteps).index(t)]
        assert torch.equal(x[:, :10], a.sqrt() * second[None] + (1 - a).sqrt() * noise)
    assert len(seen) == 5


def test_controls_change_from_the_next_hop():
    model = tiny_stage2(control="full_control")
    wa, alpha0, audio = inputs(model)
    cfg = MotionConfig(hop=10, context=10, lookahead=5, steps=5)
    still = lambda start: {"pose": [0.0, 0.0, 0.0], "location": 0.5}  # noqa: E731
    turn = lambda start: {"pose": [0.0, 0.0, 0.0] if start < 20 else [0.8, -0.3, 0.2], "location": 0.5}  # noqa: E731
    a, _ = stream_all(model, wa, alpha0, audio, cfg, controls=still)
    b, _ = stream_all(model, wa, alpha0, audio, cfg, controls=turn)
    assert torch.equal(a[:20], b[:20]) and not torch.allclose(a[20:30], b[20:30])
    with pytest.raises(ValueError):   # one row per window frame, or one row held
        stream_all(model, wa, alpha0, audio, cfg, controls=lambda start: {"pose": torch.zeros(3, 3)})
    with pytest.raises(AnitalkerError):   # an audio-only model has no pose control
        stream_all(tiny_stage2(), wa, alpha0, audio, cfg, controls=still)


def test_reset_keeps_last_code(model, monkeypatch):
    wa, alpha0, audio = inputs(model)
    s = MotionStream(model, wa, alpha0, MotionConfig(steps=5))
    s.step(0, window_audio(model, audio, *s.window(0)))
    last = s.step(10, window_audio(model, audio, *s.window(10)))[-1:]
    s.reset()
    assert s.n_ctx == 0 and s.next == 20 and torch.equal(s.last_code, last)
    assert s.window(20) == (20, 35)
    hints = record_hints(model, monkeypatch)
    s.step(20, window_audio(model, audio, 20, 35))
    assert torch.equal(hints[0], last)
    s.reset(start=100)
    assert s.next == 100 and s.window(100) == (100, 115)
    with pytest.raises(ValueError):
        s.step(99, window_audio(model, audio, 0, 15))


def test_crossfade_blends_from_the_previous_lookahead(model):
    wa, alpha0, audio = inputs(model)
    a, _ = stream_all(model, wa, alpha0, audio, MotionConfig(steps=5, continuity="crossfade", crossfade=0))
    b, _ = stream_all(model, wa, alpha0, audio, MotionConfig(steps=5, continuity="none"))
    c, _ = stream_all(model, wa, alpha0, audio, MotionConfig(steps=5, continuity="crossfade", crossfade=4))
    assert torch.equal(a, b)
    s = MotionStream(model, wa, alpha0, MotionConfig(steps=5, continuity="none"))
    s.step(0, window_audio(model, audio, 0, 15))
    w = torch.tensor([0.8, 0.6, 0.4, 0.2])[:, None]      # the previous window's weight, falling to 0
    assert torch.allclose(c[10:14], w * s.pending[0, :4] + (1 - w) * b[10:14], atol=1e-6)
    assert torch.equal(c[:10], b[:10]) and torch.equal(c[14:20], b[14:20])


def test_seams_smaller_with_inpaint_and_crossfade_than_none():
    """On the tiny random stage 2 every method gives the same seams: its eps hardly reads x_t (redrawing
    x_t moves eps by ~0.3% of its size), so its codes are clamped noise with or without context. So this
    uses bench/seams.py's SmoothPrior, an exact denoiser of smooth motion, where the context must help."""
    from bench.seams import SmoothPrior, run_stream, seam_stats

    prior, frames = SmoothPrior(), 80
    ratios = {}
    for continuity in ("inpaint", "crossfade", "none"):
        cfg = MotionConfig(hop=10, context=10, lookahead=5, steps=10, continuity=continuity)
        codes, starts, _ = run_stream(prior, torch.zeros(1, 1), torch.zeros(1, 20), torch.zeros(1, 4 * frames, 1),
                                      frames, cfg)
        jump, inner = seam_stats(codes, starts)
        ratios[continuity] = jump / inner
    assert ratios["inpaint"] < 0.8 * ratios["none"] and ratios["crossfade"] < 0.8 * ratios["none"], ratios
