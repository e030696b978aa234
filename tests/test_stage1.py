"""Stage 1 (models/stage1.py): official key layout, batching, the cached LMD basis, memory formats.
Numerical parity with the official code is in test_parity.py."""
from __future__ import annotations

import pytest
import torch

import parity_fixtures
from models import stage1 as s1
from models.stage1 import Stage1, Stage1Dims

TINY = Stage1Dims(style_dim=32, channel_divisor=16)
KERNEL = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64


def tiny(seed: int = 0) -> Stage1:
    """Tiny model with every parameter random (biases and mixing weights included). The flow
    heads are scaled down: with 4-8 channels at 128-256 px, full-size flows warp so far that
    float rounding (amplified ~100x by grid_sample at 256 px) would hide real differences."""
    torch.manual_seed(seed)
    m = Stage1(TINY).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p) + (1.0 if name.endswith("modulation.bias") else 0.0))
            elif name.startswith("dec.to_flows") and name.endswith("conv.weight"):
                p.mul_(0.2)
    return m


def portrait(batch: int = 1, seed: int = 1) -> torch.Tensor:
    """A smooth image (upsampled 8x8 noise): white noise would make the warps needlessly
    sensitive to float rounding."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(256, 256), mode="bicubic", align_corners=False).clamp(-1, 1)


def test_key_names_and_shapes_match_the_official_layout():
    with torch.device("meta"):
        full = Stage1()
    sd = full.state_dict()
    assert len(sd) == 204
    assert sum(1 for _ in full.parameters()) == 174 and sum(1 for _ in full.buffers()) == 30
    assert sum(p.numel() for p in full.parameters()) == 46_923_173
    manifest = parity_fixtures.manifest(parity_fixtures.CASE_A, "manifest_stage1.json")
    assert {k: list(v.shape) for k, v in sd.items()} == {k: e["shape"] for k, e in manifest.items()}
    # Tiny dims: the same names; every channel count (64..512) divided by 16.
    small = tiny().state_dict()
    assert small.keys() == sd.keys()
    for k, v in sd.items():
        assert list(small[k].shape) == [d // 16 if d in (64, 128, 256, 512) else d for d in v.shape], k


def test_blur_kernels_are_persistent_buffers_with_the_official_values():
    sd = tiny().state_dict()
    kernels = {k: v for k, v in sd.items() if k.endswith("kernel")}
    assert len(kernels) == 30
    for k, v in kernels.items():
        assert torch.equal(v, KERNEL * (4 if k.startswith("dec.") else 1)), k


def test_style_dim_must_equal_the_channels_at_32():
    with pytest.raises(ValueError, match="style_dim"):
        Stage1(Stage1Dims(style_dim=64, channel_divisor=16))


@torch.inference_mode()
def test_encode_shapes_and_motion():
    m = tiny()
    img = portrait(2)
    wa, alpha0, feats = m.encode(img)
    assert wa.shape == (2, 32) and alpha0.shape == (2, 20)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 8), (2, 32, 16, 16), (2, 32, 32, 32),
                                               (2, 16, 64, 64), (2, 8, 128, 128), (2, 4, 256, 256)]
    torch.testing.assert_close(m.motion(img), alpha0, rtol=0, atol=1e-6)
    assert m.render(wa, alpha0, feats).shape == (2, 3, 256, 256)


@torch.inference_mode()
def test_batched_render_equals_per_frame_render():
    # Tolerance 1e-3: fp32 summation order differs, and grid_sample amplifies rounding in the flow
    # (~100x at 256 px); a wrong broadcast or batch mix-up gives errors of order 0.1-1.
    m = tiny()
    wa, _, feats = m.encode(portrait())
    alphas = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    one_by_one = torch.cat([m.render(wa, a[None], feats) for a in alphas])
    batched = m.render(wa, alphas, feats)                                 # feats of batch 1, broadcast
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-3)
    expanded = m.render(wa.expand(3, -1), alphas, [f.expand(3, -1, -1, -1) for f in feats])
    torch.testing.assert_close(expanded, one_by_one, rtol=0, atol=1e-3)


@torch.inference_mode()
def test_self_reconstruction_render_is_deterministic():
    m = tiny()
    wa, alpha0, feats = m.encode(portrait())
    a, b = m.render(wa, alpha0, feats), m.render(wa, alpha0, feats)
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_basis_is_orthonormal_and_cached_in_eval(monkeypatch):
    m = tiny()
    w = m.dec.direction.weight
    q = m.basis()
    assert q.shape == (32, 20) and not q.requires_grad
    torch.testing.assert_close(q.T @ q, torch.eye(20), rtol=0, atol=1e-5)
    torch.testing.assert_close(q, torch.linalg.qr(w.detach() + 1e-8, mode="reduced")[0])
    calls = []
    real_qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: calls.append(1) or real_qr(*a, **k))
    with torch.inference_mode():
        wa, _, feats = m.encode(portrait())
        m.render(wa, torch.zeros(2, 20), feats)
        m.render(wa, torch.zeros(1, 20), feats)
    assert m.basis() is q and not calls                       # no QR per frame
    with torch.no_grad():
        w.add_(0.5)                                          # an in-place change (an optimizer step)
    q2 = m.basis()
    assert len(calls) == 1 and not torch.allclose(q2, q)
    torch.testing.assert_close(q2, real_qr(w.detach() + 1e-8, mode="reduced")[0])
    m.load_state_dict(tiny(seed=5).state_dict())             # loading weights is seen too
    assert not torch.allclose(m.basis(), q2) and len(calls) == 2


def test_basis_and_renderer_get_gradients_in_training_mode():
    m = tiny().train()
    assert m.basis() is not m.basis()                        # recomputed, differentiable
    with torch.no_grad():
        wa, _, feats = m.encode(portrait())
    alpha = torch.randn(2, 20, requires_grad=True)
    m.render(wa, alpha, feats).square().mean().backward()
    g = m.dec.direction.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert alpha.grad is not None and m.dec.convs[0].conv.modulation.weight.grad.abs().sum() > 0


@torch.inference_mode()
def test_memory_formats_give_the_same_result():
    m = tiny()
    img = portrait()
    wa, alpha0, feats = m.encode(img)
    alphas = torch.stack([alpha0[0], -alpha0[0]])
    ref = m.render(wa, alphas, feats)
    nchw = m.render(wa, alphas, [f.contiguous() for f in feats])          # NCHW features work too
    torch.testing.assert_close(nchw, ref, rtol=0, atol=1e-4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.to(memory_format=torch.channels_last)          # reaches the 5-D modulated weights as well
    assert m.dec.convs[0].conv.weight[0].is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    wa_c, _, feats_c = m.encode(img.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(wa_c, wa, rtol=0, atol=1e-5)
    torch.testing.assert_close(m.render(wa_c, alphas, feats_c), ref, rtol=0, atol=1e-3)
    m.to(memory_format=torch.contiguous_format)
    assert m.dec.convs[0].conv.weight.is_contiguous()
    torch.testing.assert_close(m.render(wa, alphas, feats), ref, rtol=0, atol=1e-3)


@torch.inference_mode()
def test_bf16_runs_close_to_fp32():
    m = tiny()
    wa, alpha0, feats = m.encode(portrait())
    ref = m.render(wa, alpha0, feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.render(wa, alpha0, feats)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # bf16 rounding moves the warps, so a few pixels move a lot; on average the frame agrees.
    assert (out.float() - ref).abs().mean() < 0.02 * ref.abs().mean()
    mb = tiny().bfloat16()                                   # a model cast to bf16 (QR, warp in fp32)
    out = mb.render(*mb.encode(portrait().bfloat16()))
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().mean() < 0.02 * ref.abs().mean()


def test_identity_heads_and_grid_cache():
    m = tiny()
    wa = torch.randn(2, 32)
    ident = m.identity(wa)
    assert ident.shape == (2, 32) and m.identity_density(ident).shape == (2, 32)
    ident2, excluded, density = m.enc.net_decouping(wa)
    torch.testing.assert_close(ident2, ident)
    torch.testing.assert_close(density, m.identity_density(ident))
    torch.testing.assert_close(m.enc.fc(excluded), m.enc.motion_code(wa))
    g = s1._identity_grid(8, 8, torch.device("cpu"), torch.float32)
    assert g is s1._identity_grid(8, 8, torch.device("cpu"), torch.float32)
    assert g.shape == (1, 8, 8, 2) and g[0, 0, 0].tolist() == [-1, -1] and g[0, 0, -1].tolist() == [1, -1]


@pytest.mark.parametrize("channels,size", [(64, 256), (128, 31), (512, 8), (3, 5)])
@torch.inference_mode()
def test_the_skip_blur_computes_only_what_the_strided_1x1_conv_reads(channels, size):
    """A ResBlock's skip (blur pad 1, 1x1 conv stride 2) blurs only at the pixels the strided conv reads:
    the strided blur equals every other pixel of the full blur bit for bit (both memory formats), and the
    layer equals the official order (full blur, then the strided 1x1 conv) to fp32 rounding."""
    g = torch.Generator().manual_seed(channels + size)
    layer = s1.ConvLayer(channels, 2 * channels, 1, downsample=True, activate=False)
    layer[1].weight.copy_(torch.randn(layer[1].weight.shape, generator=g))
    x = torch.randn(2, channels, size, size + 1, generator=g)
    kernel = layer[0].kernel.flip((0, 1)).expand(channels, 1, 4, 4)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf = x.contiguous(memory_format=fmt)
        full = torch.nn.functional.conv2d(xf, kernel, padding=1, groups=channels)
        assert torch.equal(layer[0](xf), full[..., ::2, ::2])
        official = torch.nn.functional.conv2d(full, layer[1].weight * layer[1].scale, stride=2)
        torch.testing.assert_close(layer(xf), official, rtol=1e-5, atol=1e-5)
    assert layer[1].stride == 1 and s1.ConvLayer(8, 8, 3, downsample=True)[1].stride == 2


# ---------------------------------------------------------------- sub-pixel upsampling (exact rewrite)

# (in channels, out channels, input size) of the six upsampling convs at full size, 8x8 to 256x256
FULL_UPSAMPLING = [(512, 512, 4), (512, 512, 8), (512, 512, 16), (512, 256, 32), (256, 128, 64), (128, 64, 128)]


@pytest.mark.parametrize("cin,cout,size", [(32, 32, 4), (16, 8, 7)] + FULL_UPSAMPLING)
@torch.inference_mode()
def test_subpixel_kernel_is_the_transposed_conv(cin, cout, size):
    """In float64 the regular conv + pixel shuffle equals the transposed conv to rounding (1e-12): the
    taps are mapped right. Full channel counts at a smaller size (the mapping does not depend on it)."""
    g = torch.Generator().manual_seed(cin + size)
    size = min(size, 16)
    x = torch.randn(2, cin, size, size + 1, generator=g, dtype=torch.float64)
    w = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
    ref = torch.nn.functional.conv_transpose2d(x, w.transpose(0, 1), stride=2)
    y = torch.nn.functional.conv2d(x, s1.subpixel_kernel(w), padding=1)
    got = torch.nn.functional.pixel_shuffle(y, 2)[..., :2 * size + 1, :2 * size + 3]
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-12 * ref.abs().max()


@torch.inference_mode()
def test_subpixel_upsampling_renders_the_same_frames():
    m = tiny()
    wa, alpha0, feats = m.encode(portrait())
    alphas = torch.stack([alpha0[0], -alpha0[0], 0.5 * alpha0[0]])
    ref_one, ref_batch = m.render(wa, alpha0, feats), m.render(wa, alphas, feats)
    m.set_upsampling("subpixel")
    assert all(c.subpixel for c in m.upsampling_layers()) and len(m.upsampling_layers()) == 6
    # batch 1 folds style and demodulation into the kernel, batch 3 applies them to the activations
    torch.testing.assert_close(m.render(wa, alpha0, feats), ref_one, rtol=0, atol=1e-4)
    torch.testing.assert_close(m.render(wa, alphas, feats), ref_batch, rtol=0, atol=1e-4)
    m.set_upsampling("transposed", layers=[0, 5])
    assert [c.subpixel for c in m.upsampling_layers()] == [False, True, True, True, True, False]
    torch.testing.assert_close(m.render(wa, alpha0, feats), ref_one, rtol=0, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # bf16 runs the same shapes
        out = m.render(wa, alpha0, feats)
    assert (out.float() - ref_one).abs().mean() < 0.02 * ref_one.abs().mean()
    with pytest.raises(ValueError, match="upsampling"):
        m.set_upsampling("nearest")


@torch.inference_mode()
def test_subpixel_upsampling_keeps_full_size_parity():
    """The official frames of parity case A, rendered with every upsampling conv as a sub-pixel conv, then
    also with constant kernels (the fast mode's form), within the parity test's tolerance, and equal to the
    transposed-conv frame to float32 rounding."""
    from parity_fixtures import CASE_A, load, state_dict
    m = Stage1()
    m.load_state_dict(state_dict(CASE_A, "manifest_stage1.json"), strict=True)
    m.eval()
    a = load(CASE_A, "stage1.npz")
    wa, _, feats = m.encode(torch.from_numpy(a["image_in"]))
    alpha = torch.from_numpy(a["alphas"][:1])
    ref = m.render(wa, alpha, feats)
    m.set_upsampling("subpixel")
    frame = m.render(wa, alpha, feats)
    assert (frame.numpy() - a["frames"][:1]).__abs__().max() < 2e-3
    assert (frame - ref).abs().max() < 1e-3


def test_skip_upsampling_stays_float32_under_bf16_autocast():
    """The 3-channel skips' upsampling computes in fp32 under bf16 autocast (oneDNN's bf16 depthwise
    transposed conv is the slow one there), equal to the fp32 computation; a bf16 model gets bf16 back."""
    up = s1.Upsample()
    x = torch.randn(2, 3, 16, 12)
    ref = up(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = up(x)
    assert got.dtype == torch.float32 and torch.equal(got, ref) and got.shape == (2, 3, 32, 24)
    assert up(x.bfloat16()).dtype == torch.bfloat16
