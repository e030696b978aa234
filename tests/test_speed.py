"""avatar.pipeline speed modes: which mode a machine gets, the upsampling choice, bf16 weights prepared once."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import avatar.pipeline as pipeline
from avatar.pipeline import Models, Speed, encode_portrait, load_models, render
from models.precision import PackedLinear, can_pack
from models.errors import AnitalkerError

from conftest import tiny_stage1

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def test_fastest_mode_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(pipeline.importlib.util, "find_spec", lambda name: object())   # openvino "installed"
    monkeypatch.setattr(pipeline, "native_bf16", lambda device: False)
    assert Speed.fastest().resolve(CPU) == Speed(precision="fp32", compile=False, upsampling="auto")
    monkeypatch.setattr(pipeline, "native_bf16", lambda device: True)
    assert Speed.fastest().resolve(CPU) == Speed(precision="bf16", compile=True, upsampling="auto",
                                                 denoiser="openvino")
    assert Speed.fastest().resolve(torch.device("cuda")).denoiser == "torch"      # OpenVINO is the CPU's
    monkeypatch.setattr(pipeline.importlib.util, "find_spec", lambda name: None)     # the extra not installed
    assert Speed.fastest().resolve(CPU).denoiser == "torch"
    # explicit choices are kept whatever the machine
    assert Speed(precision="fp32", compile=False).resolve(CPU) == Speed()
    assert Speed(precision="bf16").resolve(CPU).compile is False


def test_native_bf16_matches_the_cpu_flags():
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if "avx512_bf16" not in flags and "amx_bf16" not in flags and flags:
        assert pipeline.native_bf16(CPU) is False
    assert pipeline.cpu_name().startswith(torch.backends.cpu.get_cpu_capability())


def test_bad_modes_are_user_errors():
    with pytest.raises(AnitalkerError, match="precision"):
        Speed(precision="fp16")
    with pytest.raises(AnitalkerError, match="upsampling"):
        Speed(upsampling="bilinear")


def test_the_command_line_picks_the_denoiser():
    from streaming.cli import build_parser, speed_from_args

    parse = lambda *a: speed_from_args(build_parser().parse_args(["render", *a]))     # noqa: E731
    assert parse().denoiser == "torch"
    assert parse("--denoiser", "openvino").denoiser == "openvino"
    assert parse("--fast").denoiser == "auto"


@torch.inference_mode()
def test_auto_upsampling_times_each_layer_and_keeps_the_frames(monkeypatch):
    s1 = tiny_stage1()
    img = torch.rand(1, 3, 256, 256) * 2 - 1
    ref = Models(s1, None, None, CPU)
    code = encode_portrait(ref, img)
    alpha = code.alpha0 + 0.1
    before = ref._render(code.wa, alpha, code.feats)
    calls = []
    real = pipeline.choose_upsampling
    monkeypatch.setattr(pipeline, "choose_upsampling", lambda m: calls.append(m) or real(m))
    auto = Models(s1, None, None, CPU, Speed(upsampling="auto"))
    assert calls and auto.upsampling in ("transposed", "subpixel", "mixed")
    picks = [c.subpixel for c in s1.upsampling_layers()]
    assert auto.upsampling == ("subpixel" if all(picks) else "mixed" if any(picks) else "transposed")
    # equal sums in another order: float32 rounding, amplified by the warps of random flows
    torch.testing.assert_close(auto._render(code.wa, alpha, code.feats), before, rtol=0, atol=2e-3)
    Models(s1, None, None, CPU, Speed(upsampling="subpixel"))
    assert all(c.subpixel for c in s1.upsampling_layers())
    assert Models(s1, None, None, CPU).upsampling == "transposed"
    assert not any(c.subpixel for c in s1.upsampling_layers())


def test_bf16_mode_prepares_weights_once_without_changing_the_results(tiny_checkpoints):
    """load_models in bf16 casts the stage-2 and HuBERT matmul weights in place once (norms and LSTMs stay
    float32; stage 1 keeps float32 parameters and memoised bf16 copies). Autocast would have rounded the
    same weights to bf16 on every call, so features, motion and frames are those of plain autocast."""
    wave = (0.1 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 220)).astype(np.float32)
    img = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1

    @torch.inference_mode()
    def run(models):
        code = encode_portrait(models, img)
        audio, n = models.features(wave)
        alphas = pipeline.generate_motion(models, code, audio, n, steps=5)[0]
        return audio, alphas, torch.cat([f.float() for f in render(models, code, alphas)])

    m = load_models(tiny_checkpoints, "hubert_audio_only", "cpu", Speed(precision="bf16"))
    assert m.stage2.coarse_decoder.encoders[0].self_attn.linear_q.weight.dtype == torch.bfloat16
    assert m.stage2.coarse_decoder.encoders[0].norm_ff.weight.dtype == torch.float32
    dense = m.hubert.model.encoder.layers[0].feed_forward.intermediate_dense
    assert (dense.dtype if can_pack(m.device) else dense.weight.dtype) == torch.bfloat16
    assert isinstance(dense, PackedLinear) == can_pack(m.device)
    assert m.stage1.dec.convs[0].conv.weight.dtype == torch.float32
    fp32 = load_models(tiny_checkpoints, "hubert_audio_only", "cpu")
    plain = Models(fp32.stage1, fp32.stage2, fp32.hubert, fp32.device, Speed(precision="bf16"))
    got, want = run(m), run(plain)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    audio, alphas, frames = run(fp32)
    assert 0 < float((got[0] - audio).norm() / audio.norm()) < 0.05      # bf16 is not fp32, but close
    assert 0 < float((got[1] - alphas).abs().mean()) < 0.05
