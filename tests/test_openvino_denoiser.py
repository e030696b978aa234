"""The optional OpenVINO stage-2 denoiser (avatar/openvino_denoiser.py) through the real openvino package,
on the tiny stage-2 model. Skipped only where openvino is not installed (``bash install.sh dev`` installs it)."""
from __future__ import annotations

import builtins
from types import SimpleNamespace

import pytest
import torch

from avatar import pipeline
from avatar.motion import MotionConfig
from avatar.openvino_denoiser import OpenVinoDenoiser
from models.errors import AnitalkerError
from models.precision import prepare_bf16
from tests.conftest import tiny_stage2
from tests.test_motion import inputs, stream_all

try:
    import openvino as ov
except ImportError:
    ov = None
needs_openvino = pytest.mark.skipif(ov is None, reason="openvino is not installed (optional: pip install "
                                    "'anitalker-live[openvino]'; bash install.sh dev installs it)")

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def condition(model, frames, batch=1, seed=1):
    wa, alpha0, audio = inputs(model, frames, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.inference_mode():
        cond = model.condition(wa, alpha0, audio)
    return cond, torch.randn(batch, frames, model.dims.motion_dim, generator=g)


def test_missing_package_is_one_clear_error(monkeypatch):
    real = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(AnitalkerError, match=r"pip install 'anitalker-live\[openvino\]'"):
        pipeline.Models(SimpleNamespace(render=None), tiny_stage2(), None, torch.device("cpu"),
                        pipeline.Speed(denoiser="openvino"))


def test_unknown_denoiser_is_refused():
    with pytest.raises(AnitalkerError, match="unknown denoiser"):
        pipeline.Speed(denoiser="tensorrt")


@needs_openvino
@pytest.mark.parametrize("frames,batch", [(25, 1), (13, 1), (25, 3)])
def test_fp32_equals_torch(frames, batch):
    model = tiny_stage2()
    cond, x = condition(model, frames, batch)
    t = torch.full((batch,), 980)
    with torch.inference_mode():
        ref = model.eps(cond, x, t)
    den = OpenVinoDenoiser(model, "fp32")
    got = den(cond, x, t)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert rel(got, ref) < 1e-5
    assert not torch.equal(den(cond, x, torch.full((batch,), 20)), got)    # t reaches the network


@needs_openvino
def test_one_model_for_every_shape_and_the_weights_read_once():
    """Converted once, with dynamic batch and frames: other window lengths and batches (a batch-1 prefix
    broadcast over them) are right without a new conversion."""
    model = tiny_stage2()
    den = OpenVinoDenoiser(model, "fp32")
    cond, x = condition(model, 25)
    t = torch.tensor([500])
    first = den(cond, x, t)
    assert torch.equal(den(cond, x, t), first)     # a copy, not the request's reused buffer
    for frames, batch in ((13, 1), (40, 3), (25, 2)):
        c, xb = condition(model, frames, batch, seed=frames)
        tb = torch.full((batch,), 300)
        with torch.inference_mode():
            ref = model.eps(c, xb, tb)
        assert rel(den(c, xb, tb), ref) < 1e-5
    assert den.conversions == 1
    with torch.no_grad():
        model.out_proj.bias.add_(1.0)               # read at construction: not seen
    assert torch.equal(den(cond, x, t), first)


@needs_openvino
def test_bf16_close_to_fp32_and_from_bf16_prepared_weights():
    model = tiny_stage2()
    cond, x = condition(model, 25)
    t = torch.tensor([700])
    with torch.inference_mode():
        ref = model.eps(cond, x, t)
    prepare_bf16(model)                             # what load_models does for --precision bf16
    got = OpenVinoDenoiser(model, "bf16")(cond, x, t)
    assert 0 < rel(got, ref) < 0.05                 # bf16 rounding, not another function


@needs_openvino
def test_models_use_it_for_motion_and_say_so():
    """Speed(denoiser="openvino") puts it under every eps call: a streamed motion window agrees with the
    torch denoiser's to fp32 rounding, and the start-up description names it."""
    model = tiny_stage2()
    wa, alpha0, audio = inputs(model)
    cfg = MotionConfig(hop=10, context=5, lookahead=5, steps=10, seed=3)
    ref, _ = stream_all(model, wa, alpha0, audio, cfg)
    models = pipeline.Models(SimpleNamespace(render=None), model, None, torch.device("cpu"),
                             pipeline.Speed(denoiser="openvino"))
    assert isinstance(model.eps_backend, OpenVinoDenoiser)
    assert model.eps_backend.conversions == 1       # at load, not in the stream's first hop
    assert f"stage-2 denoiser on OpenVINO {ov.__version__.split('-')[0]}" in models.describe()
    got, _ = stream_all(model, wa, alpha0, audio, cfg)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-4
    assert model.eps_backend.conversions == 1       # the window lengths of the start, the middle, the end


@needs_openvino
def test_bf16_under_autocast_as_the_engine_samples():
    """The engine samples under bf16 autocast: the denoiser is traced without it and its codes stay
    within bf16 rounding of the exact ones."""
    model = tiny_stage2()
    wa, alpha0, audio = inputs(model)
    cfg = MotionConfig(hop=10, context=5, lookahead=5, steps=10, seed=3)
    ref, _ = stream_all(model, wa, alpha0, audio, cfg)
    models = pipeline.Models(SimpleNamespace(render=None), model, None, torch.device("cpu"),
                             pipeline.Speed(precision="bf16", denoiser="openvino"))
    assert model.eps_backend.precision == "bf16"
    with models.autocast():
        got, _ = stream_all(model, wa, alpha0, audio, cfg)
    assert 0 < rel(got, ref) < 0.05
