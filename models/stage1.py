"""Stage 1 of AniTalker: the LIA-style motion encoder and the flow-warping StyleGAN2 renderer.

The module tree, parameter names and shapes match the official ``LIA_Model`` exactly, so an
official ``stage1.ckpt`` loads with ``load_state_dict(strict=True)`` (after stripping ``lia.``).
The numerics follow the official code (rosinality's StyleGAN2 blocks) within float rounding;
where we compute something differently for speed, the comment says why it is equivalent:

* modulated convs scale the *input* by the style and the *output* by the demodulation instead
  of building per-sample weights, so B frames are one ordinary conv; with B = 1 at high
  resolution both go into the (smaller) weight, and the activation's bias and gain ride along;
* the warped feature (sampled * mask) is never built: ToRGB applies the mask to its 3 outputs;
* everything runs channels_last (NHWC), which oneDNN and cuDNN run fastest;
* Q (the LMD basis), the demodulation weight norms, NHWC weight copies and the identity grids
  are computed once and reused while the weights are unchanged (eval mode only).

Shapes: images (B, 3, H, W) in [-1, 1]; S = style_dim, M = motion_dim.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SQRT2 = math.sqrt(2.0)
_BASE_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}


@dataclass(frozen=True)
class Stage1Dims:
    size: int = 256
    style_dim: int = 512          # must equal the channel count at 32x32 and below
    motion_dim: int = 20
    channel_multiplier: int = 1   # decoder only, as in the official Synthesis
    channel_divisor: int = 1      # tiny test models: every channel count of the table divided by this

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    def enc_channels(self, res: int) -> int:
        return _BASE_CHANNELS[res] // self.channel_divisor

    def dec_channels(self, res: int) -> int:
        mult = self.channel_multiplier if res >= 64 else 1
        return _BASE_CHANNELS[res] * mult // self.channel_divisor


# ----------------------------------------------------------------------------------------------
# eval-time memo of tensors derived from parameters


def _memo(owner: nn.Module, name: str, src: Tensor, fn):
    """fn(src), cached on ``owner`` while ``src`` keeps its storage and version (so
    load_state_dict, optimizer steps and in-place edits invalidate it). In training mode it is
    recomputed on every call so that gradients flow through ``fn``."""
    if owner.training or torch.compiler.is_compiling():
        return fn(src)
    version = -1 if src.is_inference() else src._version   # inference tensors have no counter
    key = (src.data_ptr(), version, src.dtype, src.device)
    hit = owner.__dict__.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    # A normal (non-inference) tensor, so the cache stays usable outside inference_mode too.
    with torch.inference_mode(False), torch.no_grad():
        val = fn(src)
    owner.__dict__[name] = (key, val)
    return val


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs convolutions and matmuls in on ``device``, None when it is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _weight(owner: nn.Module, name: str, src: Tensor, fn, device: torch.device) -> Tensor:
    """fn(src) memoised (see _memo); under autocast a copy already in autocast's dtype, so that a bf16
    frame casts no weight (autocast itself would re-cast every weight on every call)."""
    dt = _autocast_dtype(device)
    if dt is None or dt == src.dtype or not src.is_floating_point():
        return _memo(owner, name, src, fn)
    return _memo(owner, f"{name}_{dt}", src, lambda p: fn(p).to(dt))


def _make_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(1, H, W, 2) sampling grid of the identity warp, [..., 0] = x, [..., 1] = y.
    float64 linspace then cast, like the official numpy meshgrid."""
    ys = torch.linspace(-1, 1, h, dtype=torch.float64, device=device)
    xs = torch.linspace(-1, 1, w, dtype=torch.float64, device=device)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).to(dtype).unsqueeze(0)


@functools.lru_cache(maxsize=64)
def _cached_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    with torch.inference_mode(False):  # a normal tensor, usable inside and outside inference_mode
        return _make_grid(h, w, device, dtype)


def _identity_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A constant per (size, device, dtype), built once (torch.compile traces and folds it)."""
    return _make_grid(h, w, device, dtype) if torch.compiler.is_compiling() else _cached_grid(h, w, device, dtype)


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _make_kernel(k=(1, 3, 3, 1), gain: float = 1.0) -> Tensor:
    k = torch.tensor(k, dtype=torch.float32)
    k = torch.outer(k, k)
    return k / k.sum() * gain


# ----------------------------------------------------------------------------------------------
# StyleGAN2 building blocks (equalised learning rate: stored weights unscaled, scaled at runtime)


class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = 1 / math.sqrt(in_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # scale the (B, O) product, not the (O, I) weight: no weight copy per frame
            return torch.addmm(self.bias, x, self.weight.t(), alpha=self.scale)
        return F.linear(x, self.weight * self.scale, self.bias)


class EqualConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale, self.stride, self.padding = 1 / math.sqrt(cin * k * k), stride, padding

    def forward(self, x: Tensor) -> Tensor:
        w = _weight(self, "_w", self.weight, lambda p: p * self.scale, x.device)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x + self.bias, 0.2) * SQRT2


class Blur(nn.Module):
    """Depthwise FIR filter (upfirdn2d with up = down = 1): zero pad, then a true convolution; with
    stride 2 only every other output row and column is computed (what a strided 1x1 conv after it reads)."""

    def __init__(self, pad: int, gain: float = 1.0, stride: int = 1):
        super().__init__()
        self.register_buffer("kernel", _make_kernel(gain=gain))
        self.pad = pad
        self.stride = stride

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        c = x.shape[1]
        w = self.kernel.flip((0, 1)).expand(c, 1, *self.kernel.shape)
        return F.conv2d(x, w, None if bias is None else bias.reshape(-1), stride=self.stride, padding=self.pad,
                        groups=c)


class Upsample(nn.Module):
    """upfirdn2d(up=2, pad=(2, 1)) == depthwise transposed conv, stride 2, padding 1 (2H x 2W).

    It upsamples the renderer's 3-channel RGB and flow skips, and computes in >= fp32 even under bf16
    autocast: on so few channels fp32 costs nothing more, while oneDNN's bf16 depthwise transposed conv
    is slow there (~1 ms for a 128 px skip with 2 threads, against 0.13-0.19 ms in fp32). Under autocast
    the skips are float32 sums already (the biases promote them), so they are no longer rounded to bf16
    here either; a model cast to bf16 gets bf16 back."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", _make_kernel(gain=4.0))

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        with torch.autocast(x.device.type, enabled=False):     # in the input's dtype, at least fp32
            y = x.to(torch.promote_types(x.dtype, torch.float32))
            w = self.kernel.to(y.dtype).expand(c, 1, *self.kernel.shape)
            return F.conv_transpose2d(y, w, stride=2, padding=1, groups=c).to(x.dtype)


class ConvLayer(nn.Sequential):
    """[Blur] -> EqualConv2d -> [FusedLeakyReLU]; Sequential indices give the official keys."""

    def __init__(self, cin: int, cout: int, k: int, downsample: bool = False, activate: bool = True):
        layers = []
        # Downsampling: blur pad (2, 2) for 3x3 and (1, 1) for 1x1, then a strided conv. A strided 1x1 conv
        # reads a quarter of the blurred pixels, so its blur computes just those and the 1x1 conv is
        # unstrided (the same sums; a quarter of the blur's work, 4 ms of a 58 ms bf16 encoder pass).
        pointwise = downsample and k == 1
        if downsample:
            layers.append(Blur(pad=(4 - 2 + k - 1) // 2, stride=2 if pointwise else 1))
        layers.append(EqualConv2d(cin, cout, k, stride=2 if downsample and not pointwise else 1,
                                  padding=0 if downsample else k // 2, bias=False))
        if activate:
            layers.append(FusedLeakyReLU(cout))
        super().__init__(*layers)
        self.fold_activation = False    # Stage1.set_constant_kernels

    def forward(self, x: Tensor) -> Tensor:
        if not (self.fold_activation and isinstance(self[-1], FusedLeakyReLU)):
            return super().forward(x)
        # leaky_relu(z + b) * sqrt(2) == leaky_relu(sqrt(2) z + sqrt(2) b): the bias and the gain go into
        # the conv's constants, so oneDNN runs conv + bias + leaky ReLU as one op with no elementwise
        # pass after it (or the fp32 copy autocast makes of it by adding an fp32 bias).
        conv, act = self[-2], self[-1]
        if isinstance(self[0], Blur):
            x = self[0](x)
        w = _weight(self, "_w", conv.weight, lambda p: p * (conv.scale * SQRT2), x.device)
        b = _weight(self, "_b", act.bias, lambda p: p.reshape(-1) * SQRT2, x.device)
        return F.leaky_relu(F.conv2d(x, w, b, conv.stride, conv.padding), 0.2)


class ResBlock(nn.Module):
    """(B, Cin, H, W) -> (B, Cout, H/2, W/2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = ConvLayer(cin, cin, 3)
        self.conv2 = ConvLayer(cin, cout, 3, downsample=True)
        self.skip = ConvLayer(cin, cout, 1, downsample=True, activate=False)

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


def _pointwise(x: Tensor, w: Tensor) -> Tensor:
    """1x1 conv as a batched matmul: x (B|1, C, H, W), w (B|1, O, C) -> (B, O, H, W).
    oneDNN is slow for the 3-channel outputs of ToRGB / ToFlow; a GEMM reads x once."""
    b, c, h, wd = x.shape
    if _is_channels_last(x):
        y = torch.matmul(x.permute(0, 2, 3, 1).reshape(b, h * wd, c), w.transpose(1, 2))
        return y.view(-1, h, wd, w.shape[1]).permute(0, 3, 1, 2)      # stays channels_last
    return torch.matmul(w, x.reshape(b, c, h * wd)).view(-1, w.shape[1], h, wd)


def subpixel_kernel(w: Tensor) -> Tensor:
    """(O, I, 3, 3) kernel of a stride-2 transposed conv -> (4 O, I, 2, 2) kernel of the equivalent regular
    conv: conv_transpose2d(x, w^T, stride=2) == pixel_shuffle(conv2d(x, W, padding=1), 2)[..., :2H+1, :2W+1].

    Output row 2c + phi of the transposed conv sums x[c] w[u] over the taps u = phi (mod 2): u = 0 (from
    x[c]) and u = 2 (from x[c - 1]) for phi = 0, u = 1 (from x[c]) for phi = 1. A 2-tap conv with padding 1
    reads (x[c - 1], x[c]) at output c, so phase 0 takes taps (w[2], w[0]) and phase 1 (0, w[1]); channel
    4 o + 2 phi_y + phi_x is what pixel_shuffle puts at (2c + phi_y, 2d + phi_x) of channel o. The same
    sums with exact zeros added, so equal to the transposed conv up to summation order (tests)."""
    o, i = w.shape[:2]
    wp = F.pad(w, (0, 1, 0, 1))                              # index 3 = the zero tap
    idx = torch.tensor([[2, 0], [3, 1]], device=w.device)   # [phase, tap] -> kernel index
    k = wp[:, :, idx[:, None, :, None], idx[None, :, None, :]]        # (O, I, phy, phx, ty, tx)
    return k.permute(0, 2, 3, 1, 4, 5).reshape(4 * o, i, 2, 2)


def _phase_major(k: Tensor) -> Tensor:
    """Reorder subpixel_kernel's output channels 4 o + phase (pixel_shuffle's order) to phase O + o."""
    o4 = k.shape[0]
    return k.view(o4 // 4, 4, *k.shape[1:]).transpose(0, 1).reshape(k.shape)


def _shuffle(y: Tensor) -> Tensor:
    """pixel_shuffle(y, 2) for phase-major channels (phase O + o): (B, 4 O, H, W) -> (B, O, 2 H, 2 W). In
    channels_last memory each output pixel's O channels are one contiguous run of the input, so the shuffle
    is a copy of 2 O-element runs; pixel_shuffle's own order makes it a gather of single elements (it took
    longer than the conv itself in a compiled bf16 frame)."""
    b, c, h, w = y.shape
    o = c // 4
    t = y.permute(0, 2, 3, 1).reshape(b, h, w, 2, 2, o).transpose(2, 3).reshape(b, 2 * h, 2 * w, o)
    return t.permute(0, 3, 1, 2)


class ModulatedConv2d(nn.Module):
    """Per-sample modulated conv. Official: w' = scale * w * s (per sample), demodulated by
    d = rsqrt(sum w'^2 + 1e-8) per output channel, grouped conv with groups=B. As the style
    scales input channels and d output channels, this equals conv(x * s, scale * w) * d: one
    shared conv for all B frames. With B = 1 and a weight smaller than the input (high
    resolutions) s and d are folded into the weight instead, which saves two passes over x.

    Upsampling layers compute the official transposed conv (stride 2) + blur; with ``subpixel`` set
    (Stage1.set_upsampling) the transposed conv runs as the equivalent regular 2x2 conv to 4 O channels
    and a pixel shuffle (``subpixel_kernel``): the same sums, a shape that CPUs with bf16 matrix units run
    faster (bench/upsample.py measures both on the machine at hand)."""

    def __init__(self, cin: int, cout: int, k: int, style_dim: int, demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, cout, cin, k, k))
        self.modulation = EqualLinear(style_dim, cin, bias_init=1.0)
        if upsample:  # transposed conv makes (2H+1)^2, the blur (kernel x4, pad 1) brings it to (2H)^2
            self.blur = Blur(pad=1, gain=4.0)
        self.scale, self.demodulate, self.upsample = 1 / math.sqrt(cin * k * k), demodulate, upsample
        self.subpixel = False
        self.fold_style = True    # False (Stage1.set_constant_kernels): style and demodulation always scale activations

    def _kernel(self, device: torch.device) -> Tensor:
        """(O, I, k, k), or (I, O, k, k) for conv_transpose2d, or (4 O, I, 2, 2) sub-pixel, channels_last
        like the activations. In eval a copy is kept (in autocast's dtype under autocast; none in fp32 if
        Stage1.to(memory_format=channels_last) already made the weight NHWC) instead of letting torch
        reorder up to 9 MB per conv and frame."""
        cl = torch.channels_last
        if self.subpixel:   # phase-major output channels (see _shuffle)
            return _weight(self, "_ws", self.weight, lambda p: _phase_major(subpixel_kernel(p[0])).contiguous(
                memory_format=cl), device)
        if self.upsample:
            return _weight(self, "_w", self.weight, lambda p: p[0].transpose(0, 1).contiguous(memory_format=cl), device)
        return _weight(self, "_w", self.weight, lambda p: p[0].contiguous(memory_format=cl), device)

    def _up(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        """The upsampling conv + blur of x with the (possibly modulated) kernel w of _kernel."""
        if not self.subpixel:
            return self.blur(F.conv_transpose2d(x, w, stride=2), bias)
        h, wd = x.shape[-2:]
        # the crop made dense here: compiled, the shuffle's copy writes the cropped layout at once; else
        # the blur's conv copied the cropped view again (1.9 ms for the 257 px one, bf16, 2 threads)
        y = _shuffle(F.conv2d(x, w, padding=1))[..., :2 * h + 1, :2 * wd + 1]
        return self.blur(y.contiguous(memory_format=torch.channels_last), bias)

    def forward(self, x: Tensor, style: Tensor, bias: Tensor | None = None, gain: float = 1.0,
                modulated: Tensor | None = None) -> Tensor:
        """x (B|1, I, H, W), style (B, S), bias (1, O, 1, 1) -> gain * modconv(x) + bias (B, O, H', W').
        modulated: self.modulation(style), when the caller computed it (Synthesis.styles)."""
        s = (self.modulation(style) if modulated is None else modulated) * self.scale  # (B, I)
        if self.weight.shape[-1] == 1:  # ToFlow, O = 3, no demodulation: per-sample weights, one bmm
            out = _pointwise(x, self.weight[0, :, :, 0, 0] * s[:, None, :] * gain)
            return out if bias is None else out + bias
        d = torch.full_like(s[:, :1], gain)
        if self.demodulate:
            wsq = _memo(self, "_wsq", self.weight, lambda p: p[0].float().square().sum((2, 3)).t())  # (I, O)
            d = torch.rsqrt(s.square() @ wsq.to(s.dtype) + 1e-8) * gain                          # (B, O)
        w, pad = self._kernel(x.device), self.weight.shape[-1] // 2
        if self.fold_style and s.shape[0] == 1 and x.shape[0] == 1 and w.numel() < x.numel():
            if self.upsample:
                sd = (s.view(-1, 1, 1, 1) * d.view(1, -1, 1, 1)) if not self.subpixel else \
                    (d.view(-1, 1, 1, 1).repeat(4, 1, 1, 1) * s.view(1, -1, 1, 1))
                return self._up(x, w * sd, bias)
            w = w * (d.view(-1, 1, 1, 1) * s.view(1, -1, 1, 1))
            return F.conv2d(x, w, None if bias is None else bias.reshape(-1), padding=pad)
        x = x * s[:, :, None, None]
        out = self._up(x, w) if self.upsample else F.conv2d(x, w, padding=pad)
        d = d[:, :, None, None]
        return out * d if bias is None else torch.addcmul(bias, out, d)


class NoiseInjection(nn.Module):
    """Present for the checkpoint; the official inference passes noise=None, which adds nothing."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        return x if noise is None else x + self.weight * noise


class StyledConv(nn.Module):
    def __init__(self, cin: int, cout: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(cin, cout, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(cout)

    def forward(self, x: Tensor, style: Tensor, noise: Tensor | None = None,
                modulated: Tensor | None = None) -> Tensor:
        if noise is not None:
            return self.activate(self.noise(self.conv(x, style, modulated=modulated), noise))
        # lrelu(conv + b) * sqrt2 == lrelu(sqrt2 * conv + sqrt2 * b) (leaky ReLU commutes with a
        # positive scale): the gain and bias ride along with the conv, one in-place pass remains.
        return F.leaky_relu_(self.conv(x, style, self.activate.bias * SQRT2, SQRT2, modulated), 0.2)


class ToRGB(nn.Module):
    """1x1 ConvLayer to RGB (with its FusedLeakyReLU, as in the official code) + bias + upsampled skip."""

    def __init__(self, cin: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ConvLayer(cin, 3, 1)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, skip: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x (B, C, H, W) -> (B, 3, H, W). With ``mask`` (B, 1, H, W) the input is x * mask; the
        1x1 conv commutes with a per-pixel scale, so the mask is applied to 3 channels, not C."""
        conv, act = self.conv
        w = _weight(conv, "_w1", conv.weight, lambda p: (p[:, :, 0, 0] * conv.scale)[None], x.device)
        out = _pointwise(x, w)
        out = act(out if mask is None else out * mask) + self.bias
        return out if skip is None else out + self.upsample(skip)


class ToFlow(nn.Module):
    """Predicts a flow field + mask and warps the encoder feature of the same scale."""

    def __init__(self, cin: int, style_dim: int):
        super().__init__()
        self.upsample = Upsample()
        self.conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, style: Tensor, feat: Tensor, skip: Tensor | None = None):
        """x (B, C, H, W), feat (1|B, C, H, W), skip (B, 3, H/2, W/2) raw flow of the previous scale
        -> warped (B, C, H, W), next x (B, C, H, W), raw flow (B, 3, H, W) (the official outputs)."""
        sampled, mask, nxt, raw = self.warp(x, style, feat, skip)
        return sampled * mask, nxt, raw

    def warp(self, x: Tensor, style: Tensor, feat: Tensor, skip: Tensor | None = None,
             modulated: Tensor | None = None):
        """Like forward, but returns the sampled feature and the mask (B, 1, H, W) instead of their
        product, so that the renderer can skip that full-size multiply (see ToRGB)."""
        raw = self.conv(x, style, self.bias, modulated=modulated)
        if skip is not None:
            raw = raw + self.upsample(skip)
        b, _, h, w = raw.shape
        mask = torch.sigmoid(raw[:, 2:3])
        # The warp runs in >= fp32: a bf16 grid is off by up to half a pixel at 256 px, and CPU
        # grid_sample returns garbage for bf16 (torch 2.13). A no-op for fp32 inputs.
        dt = torch.promote_types(raw.dtype, torch.float32)
        offset = torch.tanh(raw[:, :2]).permute(0, 2, 3, 1).to(dt)  # (B, H, W, 2), x then y
        grid = offset + _identity_grid(h, w, offset.device, dt)
        if feat.shape[0] != b:  # one portrait rendered with B motion codes
            feat = feat.expand(b, -1, -1, -1)
        sampled = F.grid_sample(feat.to(dt), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled.to(torch.promote_types(feat.dtype, x.dtype))
        # official: warped = sampled * m; next = warped + x * (1 - m) == x + m * (sampled - x).
        # lerp needs one dtype; under autocast use the promoted one, as the official ops do.
        dt = torch.promote_types(torch.promote_types(x.dtype, sampled.dtype), mask.dtype)
        return sampled, mask, torch.lerp(x.to(dt), sampled.to(dt), mask.to(dt)), raw


# ----------------------------------------------------------------------------------------------
# encoder (enc.*)


class WeightedSum(nn.Module):
    """HAL fusion: softmax-weighted sum of the pooled layer vectors."""

    def __init__(self, n: int):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(n))

    def forward(self, xs: list[Tensor]) -> Tensor:
        w = torch.softmax(self.weights, dim=0)
        return sum(wi * xi for wi, xi in zip(w, xs))


class AppearanceEncoder(nn.Module):
    """``enc.net_app``: StyleGAN2-discriminator-style encoder + HAL.
    (B, 3, H, W) -> wa (B, S), skip feats [(B, C, 8, 8), ..., (B, C, H, W)]."""

    def __init__(self, d: Stage1Dims):
        super().__init__()
        res = [2 ** i for i in range(d.log_size, 1, -1)]       # 256, 128, ..., 4
        self.convs = nn.ModuleList([ConvLayer(3, d.enc_channels(d.size), 1)])
        for r in res[:-1]:
            self.convs.append(ResBlock(d.enc_channels(r), d.enc_channels(r // 2)))
        self.convs.append(EqualConv2d(d.enc_channels(4), d.style_dim, 4, bias=False))
        # The first three layers are narrower than S and get a projection (official fc1/fc2/fc3).
        for i in range(3):
            setattr(self, f"fc{i + 1}", EqualLinear(d.enc_channels(res[i]), d.style_dim))
        self.ws = WeightedSum(len(self.convs))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = x.contiguous(memory_format=torch.channels_last)  # faster with oneDNN; feats come out NHWC
        outs, pooled = [], []
        for i, conv in enumerate(self.convs):
            x = conv(x)
            p = x.mean((-2, -1))
            pooled.append(getattr(self, f"fc{i + 1}")(p) if i < 3 else p)
            outs.append(x)
        return self.ws(pooled), outs[::-1][2:]


def _mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


class Decoupling(nn.Module):
    """``enc.net_decouping`` (sic): identity head, its CLUB density head (training only) and the
    identity-excluded head that feeds the motion code."""

    def __init__(self, dim: int):
        super().__init__()
        self.identity_net = _mlp(dim)
        self.identity_net_density = _mlp(dim)   # input: the identity embedding
        self.identity_excluded_net = _mlp(dim)

    def forward(self, wa: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """wa (B, S) -> identity (B, S), identity-excluded (B, S), density (B, S) (official order)."""
        ident = self.identity_net(wa)
        return ident, self.identity_excluded_net(wa), self.identity_net_density(ident)


class Encoder(nn.Module):
    def __init__(self, d: Stage1Dims):
        super().__init__()
        self.net_app = AppearanceEncoder(d)
        # Purely linear motion head: 4 x (S -> S), then S -> M, no activations (as in LIA).
        self.fc = nn.Sequential(*[EqualLinear(d.style_dim, d.style_dim) for _ in range(4)],
                                EqualLinear(d.style_dim, d.motion_dim))
        self.net_decouping = Decoupling(d.style_dim)

    def motion_code(self, wa: Tensor) -> Tensor:
        """HAL latent (B, S) -> motion code alpha (B, M)."""
        return self.fc(self.net_decouping.identity_excluded_net(wa))


# ----------------------------------------------------------------------------------------------
# decoder (dec.*)


class Direction(nn.Module):
    """LMD: an orthonormal basis Q (S, M) of the motion subspace from a reduced QR."""

    def __init__(self, style_dim: int, motion_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(style_dim, motion_dim))

    def basis(self) -> Tensor:
        return _memo(self, "_q", self.weight, self._qr)

    @staticmethod
    def _qr(w: Tensor) -> Tensor:
        # LAPACK has no bf16/fp16 QR: those weights are factorised in fp32.
        w32 = w.to(torch.promote_types(w.dtype, torch.float32))
        return torch.linalg.qr(w32 + 1e-8, mode="reduced")[0].to(w.dtype)

    def forward(self, alpha: Tensor) -> Tensor:
        """alpha (B, M) -> sum_k alpha_k Q[:, k] (B, S)."""
        return alpha @ self.basis().t()


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> Tensor:
        return self.input.expand(batch, -1, -1, -1)


class Synthesis(nn.Module):
    """``dec``: latent = wa + alpha Q^T styles every layer; at each scale 8..size two StyledConvs,
    a ToFlow that warps the encoder feature, and a ToRGB of the warped feature."""

    def __init__(self, d: Stage1Dims):
        super().__init__()
        s = d.style_dim
        self.direction = Direction(s, d.motion_dim)
        self.input = ConstantInput(d.dec_channels(4))
        self.conv1 = StyledConv(d.dec_channels(4), d.dec_channels(4), s)
        self.to_rgb1 = ToRGB(d.dec_channels(4), upsample=False)   # in the checkpoint, unused in forward
        self.convs, self.to_rgbs, self.to_flows = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        cin = d.dec_channels(4)
        for i in range(3, d.log_size + 1):
            cout = d.dec_channels(2 ** i)
            self.convs.append(StyledConv(cin, cout, s, upsample=True))
            self.convs.append(StyledConv(cout, cout, s))
            self.to_rgbs.append(ToRGB(cout))
            self.to_flows.append(ToFlow(cout, s))
            cin = cout

    def forward(self, wa: Tensor, alpha: Tensor | None, feats: list[Tensor]) -> Tensor:
        """wa (1|B, S), alpha (B, M) or None, feats [(1|B, C, 8, 8), ...] -> (B, 3, size, size)."""
        latent = wa if alpha is None else wa + self.direction(alpha)     # absolute, not relative
        # The decoder always runs channels_last: oneDNN's NHWC kernels made a CPU frame 1.4x faster
        # (transposed convs most), cuDNN prefers it too, and the values are the same. The layout
        # propagates from this first activation through every conv and elementwise op.
        x = self.input(latent.shape[0]).contiguous(memory_format=torch.channels_last)
        styles = iter(self.styles(latent))
        x = self.conv1(x, latent, modulated=next(styles))
        rgb = flow = None
        for i, feat in enumerate(feats):
            x = self.convs[2 * i](x, latent, modulated=next(styles))
            x = self.convs[2 * i + 1](x, latent, modulated=next(styles))
            sampled, mask, x, flow = self.to_flows[i].warp(x, latent, feat, flow, next(styles))
            rgb = self.to_rgbs[i](sampled, rgb, mask)        # ToRGB(warped = sampled * mask)
        return rgb

    def styles(self, latent: Tensor) -> list[Tensor | None]:
        """Every modulated conv's modulation of the latent, in the order forward uses them. Compiled,
        one matmul over all their weights concatenated (frozen, the concatenation is a constant): 19
        small matmuls took ~2 ms of a bf16 frame on 2 CPU cores. Eager, None each: every conv computes
        its own (a concatenation there would be a copy of all the weights per frame)."""
        mods = [self.conv1.conv.modulation]
        for i in range(len(self.to_flows)):
            mods += [self.convs[2 * i].conv.modulation, self.convs[2 * i + 1].conv.modulation,
                     self.to_flows[i].conv.modulation]
        if not torch.compiler.is_compiling():
            return [None] * len(mods)
        # one style_dim, one scale; as F.linear, the frozen graph runs it as a pre-packed oneDNN linear
        weight, bias = torch.cat([m.weight for m in mods]) * mods[0].scale, torch.cat([m.bias for m in mods])
        out = F.linear(latent, weight, bias)
        return list(out.split([m.weight.shape[0] for m in mods], dim=1))


# ----------------------------------------------------------------------------------------------


class Stage1(nn.Module):
    """AniTalker stage 1 (official ``LIA_Model``). state_dict keys: enc.net_app.*,
    enc.net_decouping.*, enc.fc.*, dec.* (174 parameters + 30 blur kernels at full size)."""

    def __init__(self, dims: Stage1Dims = Stage1Dims()):
        super().__init__()
        if dims.enc_channels(32) != dims.style_dim or dims.dec_channels(32) != dims.style_dim:
            raise ValueError(f"style_dim {dims.style_dim} must equal the channel count at 32x32 "
                             f"({dims.enc_channels(32)}); with channel_divisor n use style_dim 512/n")
        self.dims = dims
        self.enc = Encoder(dims)
        self.dec = Synthesis(dims)

    def to(self, *args, **kwargs):
        """nn.Module.to; ``memory_format`` also reaches the official 5-D modulated weights
        (1, O, I, k, k), which torch cannot convert itself (it raises): their [0] gets that
        layout. With channels_last the renderer needs no NHWC weight copies of its own. The
        computation is channels_last either way; the values do not change."""
        fmt = kwargs.pop("memory_format", None)
        super().to(*args, **kwargs)
        if fmt is not None:
            self._apply(lambda t: t.contiguous(memory_format=fmt) if t.dim() == 4 else
                        t[0].contiguous(memory_format=fmt)[None] if t.dim() == 5 else t)
        return self

    UPSAMPLING = ("transposed", "subpixel")

    def set_upsampling(self, mode: str, layers=None) -> None:
        """How the decoder's upsampling convs run: "transposed" (the official transposed conv, default) or
        "subpixel" (the same sums as a regular conv + pixel shuffle, see subpixel_kernel); ``layers``: the
        indices of the upsampling layers to set (default all, 0 = the 8x8 one)."""
        if mode not in self.UPSAMPLING:
            raise ValueError(f"upsampling must be one of {self.UPSAMPLING}, got {mode!r}")
        ups = self.upsampling_layers()
        for i in range(len(ups)) if layers is None else layers:
            ups[i].subpixel = mode == "subpixel"

    def set_constant_kernels(self, on: bool) -> None:
        """With ``on``, every modulated conv applies its style and demodulation to the activations (as it
        does for a batch of frames), never to a per-frame copy of its kernel, so the kernels stay constants.
        A frozen torch.compile (avatar.pipeline.compile_frozen) can then reorder them once into oneDNN's
        blocked layout and fuse the scalings into the neighbouring elementwise kernels; folded into the
        kernel at batch 1 (the default, faster uncompiled) they are reordered on every frame. The encoder's
        activated ConvLayers likewise fold their bias and gain into the conv (ConvLayer.forward). The same
        sums either way, up to float rounding (tests/test_stage1.py, tests/test_fast_render.py)."""
        for m in self.modules():
            if isinstance(m, ModulatedConv2d):
                m.fold_style = not on
            elif isinstance(m, ConvLayer):
                m.fold_activation = on

    def upsampling_layers(self) -> list[ModulatedConv2d]:
        """The decoder's upsampling modulated convs, coarse to fine."""
        return [c.conv for c in self.dec.convs if c.conv.upsample]

    def encode(self, img: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """One encoder pass. img (B, 3, H, W) in [-1, 1] -> wa (B, S), alpha0 (B, M),
        feats [(B, C, 8, 8), ..., (B, C, H, W)] (6 maps at 256, channels_last memory)."""
        wa, feats = self.enc.net_app(img)
        return wa, self.enc.motion_code(wa), feats

    def motion(self, img: Tensor) -> Tensor:
        """img (B, 3, H, W) -> alpha (B, M); the skip features are computed but not kept."""
        return self.enc.motion_code(self.enc.net_app(img)[0])

    def render(self, wa: Tensor, alpha: Tensor, feats: list[Tensor]) -> Tensor:
        """wa (1|B, S), alpha (B, M), feats of batch 1 or B (from ``encode``) -> frames
        (B, 3, H, W), not clamped, absolute: alpha = alpha0 reconstructs the portrait. The result
        may be channels_last-strided (``.contiguous()`` if NCHW memory matters)."""
        return self.dec(wa, alpha, feats)

    def basis(self) -> Tensor:
        """Q (S, M), orthonormal columns; cached in eval mode, differentiable in training mode."""
        return self.dec.direction.basis()

    def identity(self, wa: Tensor) -> Tensor:
        """Identity embedding (B, S) of a HAL latent (training only)."""
        return self.enc.net_decouping.identity_net(wa)

    def identity_density(self, ident: Tensor) -> Tensor:
        """CLUB head (B, S) on an identity embedding (training only)."""
        return self.enc.net_decouping.identity_net_density(ident)
