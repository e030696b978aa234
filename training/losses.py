"""Stage-1 training networks and losses: VGG19 perceptual features, the StyleGAN2 discriminator,
CLUB mutual information, AAM-softmax, and the identity augmentations."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoints import read_state_file
from models.errors import AnitalkerError
from models.stage1 import SQRT2, ConvLayer, EqualLinear, ResBlock, Stage1Dims

# ----------------------------------------------------------------------------------------------- VGG19

# torchvision's vgg19 "features" layout (so its ImageNet weights load by index); "M" = max pool.
_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]
_TAPS = (1, 6, 11, 20, 29)                 # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
_TAP_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)   # deeper layers count more (pix2pixHD's VGG loss)


class VGG19Features(nn.Module):
    """VGG19 conv stack up to relu5_1. ``channel_divisor`` > 1 only for tests (no weights fit)."""

    def __init__(self, channel_divisor: int = 1):
        super().__init__()
        layers, cin = [], 3
        for v in _VGG19:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v // channel_divisor, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v // channel_divisor
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def load_pretrained(self, path) -> "VGG19Features":
        """torchvision's ``vgg19-dcbb9e9d.pth`` (keys features.N.*) or a bare features state dict."""
        sd = read_state_file(path)
        sd = {(k if k.startswith("features.") else f"features.{k}"): v for k, v in sd.items()}
        own = self.state_dict()
        missing = [k for k in own if k not in sd]
        if missing:
            raise AnitalkerError(f"{path} is not a VGG19 ImageNet state dict (missing {missing[:3]})")
        self.load_state_dict({k: sd[k] for k in own})
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> the 5 tapped activations."""
        x = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)
                if i == _TAPS[-1]:
                    break
        return out


def perceptual_loss(vgg: VGG19Features, x: Tensor, y: Tensor) -> Tensor:
    """Weighted L1 between VGG19 activations of x and of the (fixed) target y."""
    feats = vgg(torch.cat([x, y]))
    return sum(w * F.l1_loss(f[: len(x)], f[len(x):].detach()) for w, f in zip(_TAP_WEIGHTS, feats))


# ----------------------------------------------------------------------------------------------- discriminator

class Discriminator(nn.Module):
    """StyleGAN2 discriminator (the official networks/discriminator.py, rosinality's blocks):
    1x1 ConvLayer, ResBlocks down to 4x4, minibatch stddev (group 4), 3x3 conv, two linears."""

    def __init__(self, dims: Stage1Dims, stddev_group: int = 4):
        super().__init__()
        res = [2 ** i for i in range(dims.log_size, 1, -1)]
        ch = dims.enc_channels
        self.convs = nn.Sequential(ConvLayer(3, ch(dims.size), 1),
                                   *[ResBlock(ch(r), ch(r // 2)) for r in res[:-1]])
        self.stddev_group = stddev_group
        self.final_conv = ConvLayer(ch(4) + 1, ch(4), 3)
        self.final_linear = nn.Sequential(EqualLinear(ch(4) * 16, ch(4)), nn.LeakyReLU(0.2), EqualLinear(ch(4), 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> logits (B, 1)."""
        out = self.convs(x)
        b, c, h, w = out.shape
        g = min(b, self.stddev_group)
        while b % g:
            g -= 1
        std = out.view(g, -1, 1, c, h, w).float().var(0, unbiased=False).add(1e-8).sqrt()
        std = std.mean([2, 3, 4], keepdim=True).squeeze(2).to(out.dtype).repeat(g, 1, h, w)
        out = self.final_conv(torch.cat([out, std], 1))
        # the official final EqualLinear carries a fused leaky ReLU (gain sqrt 2)
        return self.final_linear[2](self.final_linear[1](self.final_linear[0](out.flatten(1))) * SQRT2)


def g_nonsaturating(fake_logits: Tensor) -> Tensor:
    return F.softplus(-fake_logits).mean()


def d_nonsaturating(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


# ----------------------------------------------------------------------------------------------- identity / motion

def club(mu: Tensor, y: Tensor) -> Tensor:
    """CLUB upper bound of I(x; y) with q(y|x) = N(mu(x), I): E_pairs[log q(y_i|x_i)] -
    E_{i,j}[log q(y_j|x_i)], summed over the D dimensions. mu, y (N, D).

    This is the reference CLUBMean estimator (Cheng et al. 2020, github.com/Linear95/CLUB), whose mean
    network Linear-ReLU-Linear is exactly the official one-output ``identity_net_density``; like it,
    the bound is a sum over dimensions, so the paper's MI weight applies to the same quantity.
    In fp32: the bound is a small difference of two large means, too coarse in bf16/fp16."""
    mu, y = mu.float(), y.float()
    pos = -0.5 * (mu - y).square().sum(-1)                                   # (N,)
    neg = -0.5 * (mu[:, None, :] - y[None, :, :]).square().sum(-1)          # (N, N)
    return pos.mean() - neg.mean()


def club_likelihood_loss(mu: Tensor, y: Tensor) -> Tensor:
    """Negative log-likelihood (up to a constant) that trains the CLUB estimator (inputs detached by
    the caller); the same units as ``club``."""
    return 0.5 * (mu.float() - y.float()).square().sum(-1).mean()


class AAMSoftmax(nn.Module):
    """Additive angular margin softmax (ArcFace / ECAPA-TDNN's AAM-softmax), margin 0.2, scale 30."""

    def __init__(self, dim: int, classes: int, margin: float = 0.2, scale: float = 30.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * 0.01)
        self.m, self.s = margin, scale
        self.th, self.mm = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        cos = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float())).clamp(-1 + 1e-7, 1 - 1e-7)
        sin = (1.0 - cos.square()).sqrt()
        phi = cos * math.cos(self.m) - sin * math.sin(self.m)       # cos(theta + m)
        phi = torch.where(cos - self.th > 0, phi, cos - self.mm)   # keep it monotonic past pi - m
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return F.cross_entropy(self.s * (onehot * phi + (1 - onehot) * cos), labels)


def augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Appearance augmentations that keep identity: colour jitter (brightness, contrast,
    saturation +-20 %), random grayscale (p 0.1), horizontal flip (p 0.5), random scale/shift
    (0.85..1.15, +-4 % of the side). They deny the identity encoder low-level shortcuts (colour, framing).
    x (B, 3, H, W) in [-1, 1]."""
    B, dev = x.shape[0], x.device
    r = lambda *s: torch.rand(*s, generator=generator).to(dev)  # noqa: E731
    y = (x + 1) / 2
    y = y * (0.8 + 0.4 * r(B, 1, 1, 1))
    m = y.mean((1, 2, 3), keepdim=True)
    y = (y - m) * (0.8 + 0.4 * r(B, 1, 1, 1)) + m
    gray = y.mean(1, keepdim=True)
    y = (y - gray) * (0.8 + 0.4 * r(B, 1, 1, 1)) + gray
    y = torch.where(r(B, 1, 1, 1) < 0.1, gray.expand_as(y), y)
    y = torch.where(r(B, 1, 1, 1) < 0.5, y.flip(-1), y)
    s = 0.85 + 0.3 * r(B)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1] = 1 / s, 1 / s
    theta[:, :, 2] = (r(B, 2) - 0.5) * 0.16
    grid = F.affine_grid(theta, list(y.shape), align_corners=False)
    y = F.grid_sample(y, grid, padding_mode="border", align_corners=False)
    return (y.clamp(0, 1) * 2 - 1).to(x.dtype)
