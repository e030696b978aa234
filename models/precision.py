"""Weights prepared once in a lower precision, so that autocast finds them already cast.

torch.autocast casts a float32 weight to bf16 on every call (and keeps the copy only inside one autocast
region), so a model run in bf16 one hop at a time re-reads and re-writes all its weights each hop:
HuBERT-large alone is 1.2 GB of float32 per hop. ``prepare_bf16`` casts the weights of the matmul layers in
place, once; everything that autocast runs in float32 (norms, softmax, the sampler) keeps float32
parameters. The prepared module must then be run under ``torch.autocast`` (its inputs stay float32).
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
