"""The compiled fast renderer's rewrites (models/stage1.py, avatar/pipeline.compile_frozen): each computes the
official sums, so in float32 it renders the official frames up to rounding. Timing is in bench/stages.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avatar.pipeline import Models, PortraitCode, Speed, compile_frozen, render
from models import stage1 as s1

from test_stage1 import portrait, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("channels_last", [True, False])
def test_phase_major_shuffle_is_pixel_shuffle(channels_last):
    """A pure permutation of the same numbers: bitwise equal to pixel_shuffle of subpixel_kernel's order."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 4 * 5, 7, 9, generator=g)            # pixel_shuffle's order: channel 4 o + phase
    pm = y.view(2, 5, 4, 7, 9).transpose(1, 2).reshape(2, 20, 7, 9)    # phase-major: phase O + o
    if channels_last:
        pm = pm.contiguous(memory_format=torch.channels_last)
    assert torch.equal(s1._shuffle(pm), F.pixel_shuffle(y, 2))
    w = torch.randn(5, 3, 3, 3, generator=g)
    k = s1.subpixel_kernel(w)
    assert torch.equal(s1._phase_major(k), k.view(5, 4, 3, 2, 2).transpose(0, 1).reshape(20, 3, 2, 2))


@torch.inference_mode()
@pytest.mark.parametrize("upsampling", ["transposed", "subpixel"])
def test_constant_kernels_render_the_same_frames(upsampling):
    """Style and demodulation on the activations instead of folded into a per-frame kernel: the same
    products in another order (float32 rounding only)."""
    m = tiny()
    m.set_upsampling(upsampling)
    wa, alpha0, feats = m.encode(portrait())
    alpha = alpha0 + 0.1
    ref = m.render(wa, alpha, feats)
    m.set_constant_kernels(True)
    assert not any(c.fold_style for c in m.modules() if isinstance(c, s1.ModulatedConv2d))
    torch.testing.assert_close(m.render(wa, alpha, feats), ref, rtol=0, atol=1e-4)
    m.set_constant_kernels(False)
    assert torch.equal(m.render(wa, alpha, feats), ref)


@torch.inference_mode()
def test_frozen_compile_prepacks_the_weights_and_keeps_the_frames():
    """compile_frozen really freezes (torch.compile's options would silently not): the convolutions run as
    oneDNN's pre-packed pointwise-fused ops, and float32 frames equal the eager ones up to rounding. The
    compiled mode of Models turns constant kernels on."""
    m = tiny()
    models = Models(m, None, None, torch.device("cpu"), Speed(compile=True, upsampling="subpixel"))
    assert not any(c.fold_style for c in m.modules() if isinstance(c, s1.ModulatedConv2d))
    wa, alpha0, feats = m.encode(portrait())
    alpha = alpha0 + 0.1
    ref = m.render(wa, alpha, feats)
    out = models._render(wa, alpha, feats)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    # a batch is drawn frame by frame through the same batch-1 graph (no compile per batch size)
    alphas = torch.cat([alpha, alpha0, alpha0 - 0.1])
    torch._dynamo.utils.counters.clear()
    torch.testing.assert_close(models._render(wa, alphas, feats), m.render(wa, alphas, feats), rtol=0, atol=1e-4)
    with torch.inference_mode(False):
        plain = alpha.clone()                         # a code made outside inference_mode (the live engine's)
    models._render(wa, plain, feats)
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # a whole clip goes in pairs through one batch-2 graph: an odd count's last pair is padded, cut off
    assert models.clip_batch == 2
    clip = torch.cat(list(render(models, PortraitCode(wa, alpha0, feats), alphas)))
    torch.testing.assert_close(clip, m.render(wa, alphas, feats), rtol=0, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    five = torch.cat([alphas, alpha0 + 0.05, alpha0 + 0.2])
    torch.testing.assert_close(models._render_clip(wa, five, feats), m.render(wa, five, feats), rtol=0, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    if torch.backends.mkldnn.is_available():
        with torch.profiler.profile(record_shapes=True) as prof:
            models._render(wa, alpha, feats)
        ops = {e.key for e in prof.key_averages()}
        assert "mkldnn::_convolution_pointwise" in ops, sorted(o for o in ops if "conv" in o)
        # the sub-pixel output's crop is written dense by the compiled shuffle, not copied again for the blur
        copies = [e.input_shapes for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::copy_"]
        assert not [s for s in copies if s and len(s[0]) == 4], copies
    assert Models(m, None, None, torch.device("cpu")).stage1 is m
    assert all(c.fold_style for c in m.modules() if isinstance(c, s1.ModulatedConv2d))   # eager: folded again
    assert compile_frozen(m.render).__wrapped__ == m.render


@torch.inference_mode()
def test_constant_kernels_fold_the_encoders_activation_into_its_convs():
    """With constant kernels each activated ConvLayer of the encoder puts its bias and sqrt(2) gain into
    the conv (leaky ReLU is positively homogeneous): float32 equal up to rounding, bitwise as before once
    switched off, and a frozen compile under bf16 autocast (--fast) runs every such layer as one oneDNN conv
    + bias + leaky ReLU op with no elementwise kernel of its own (unfolded, autocast's fp32 bias add kept
    inductor from fusing them: a cast, add, leaky ReLU and gain pass over every activation)."""
    import re

    from torch._inductor.utils import run_and_get_code
    m = tiny()
    img = portrait()
    ref_wa, ref_feats = m.enc.net_app(img)
    m.set_constant_kernels(True)
    layers = [c for c in m.enc.net_app.modules() if isinstance(c, s1.ConvLayer) and c.fold_activation
              and isinstance(c[-1], s1.FusedLeakyReLU)]
    assert len(layers) == 1 + 2 * (len(m.enc.net_app.convs) - 2)   # the 1x1 input layer, 2 per ResBlock
    wa, feats = m.enc.net_app(img)
    torch.testing.assert_close(wa, ref_wa, rtol=1e-5, atol=1e-5)
    for f, r in zip(feats, ref_feats):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-5)
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            alpha, code = run_and_get_code(compile_frozen(m.motion), img)
        ref_alpha = m.enc.motion_code(ref_wa)
        assert (alpha.float() - ref_alpha).norm() < 0.05 * ref_alpha.norm()
        src = "\n".join(code)
        fused = re.findall(r"_convolution_pointwise\.default\([^\n]*'leaky_relu'", src)
        assert len(fused) == len(layers), src
        assert not re.findall(r"def cpp_fused\w*leaky_relu|cpp_fused\w*leaky_relu\w*\(", src)
    m.set_constant_kernels(False)
    assert not any(c.fold_activation for c in layers)
    assert torch.equal(m.enc.net_app(img)[0], ref_wa)


@torch.inference_mode()
def test_compiled_styles_are_one_matmul_equal_to_each_convs_own():
    """Compiled, the decoder computes every modulated conv's style in one matmul over the concatenated
    modulation weights (Synthesis.styles); eager, each conv computes its own (None)."""
    dec = tiny().dec
    latent = torch.randn(2, dec.conv1.conv.modulation.weight.shape[1])
    assert all(s is None for s in dec.styles(latent))
    got = torch.compile(dec.styles, dynamic=False)(latent)
    mods = [dec.conv1.conv] + [m for i in range(len(dec.to_flows))
                               for m in (dec.convs[2 * i].conv, dec.convs[2 * i + 1].conv, dec.to_flows[i].conv)]
    assert len(got) == len(mods)
    for s, m in zip(got, mods):
        torch.testing.assert_close(s, m.modulation(latent), rtol=1e-5, atol=1e-5)
