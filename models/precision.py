"""Weights prepared once in a lower precision, so that autocast finds them already cast.

torch.autocast casts a float32 weight to bf16 on every call (and keeps the copy only inside one autocast
region), so a model run in bf16 one hop at a time re-reads and re-writes all its weights each hop:
HuBERT-large alone is 1.2 GB of float32 per hop. ``prepare_bf16`` casts the weights of the matmul layers in
place, once; everything that autocast runs in float32 (norms, softmax, the sampler) keeps float32
parameters. The prepared module must then be run under ``torch.autocast`` (its inputs stay float32).

``pack_linears`` goes one step further on a CPU: oneDNN reorders a bf16 weight into its blocked layout on
every matmul call, so a layer that multiplies few rows (streamed HuBERT: ~30 a hop) reads its weight twice
and writes it once. Reordered once at load, as inductor's freezing does for compiled graphs, the products
are bitwise the same.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

_MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def prepare_bf16(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Cast, in place, the weight and bias of every Linear / Conv1d / Conv2d of ``module`` to ``dtype``;
    weight-normalised (parametrized) layers, norms, LSTMs and loose parameters stay as they are."""
    for m in module.modules():
        if isinstance(m, _MATMUL_LAYERS) and not parametrize.is_parametrized(m):
            m.to(dtype)
    return module


class PackedLinear(nn.Module):
    """A bf16 ``nn.Linear`` whose weight oneDNN has reordered once into its blocked layout (replaces the
    plain weight: no extra memory). Takes inputs of any float dtype, as autocast would cast them, and
    returns bf16, bitwise what ``F.linear`` under bf16 autocast gives (tests)."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        # rows: a hint for the layout; any number of rows is correct
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.dtype)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed bf16"


def can_pack(device: torch.device) -> bool:
    """oneDNN's bf16 matmul runs natively here (AVX-512 BF16 / AMX): packing pays and is exact."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linears(module: nn.Module, rows: int = 30) -> int:
    """Replace, in place, every bf16 ``nn.Linear`` inside ``module`` with a ``PackedLinear``; returns how
    many. Call after ``prepare_bf16`` and only where ``can_pack``."""
    targets = [(parent, name, child) for parent in module.modules()
               for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, rows))
    return len(targets)
