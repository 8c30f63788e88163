"""MAC and parameter counts taken from a built module.

Convention: one MAC is one multiply-accumulate of a convolution, a linear layer or an
attention matmul (QK^T and attention x V), per sample (batch 1). Normalisation, activations,
pooling and residual additions are not counted (the fvcore / thop convention).
"""

from __future__ import annotations

import torch
from torch import nn

from nestnas.supernet.attention import Attention


@torch.no_grad()
def count_module(module: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs per sample, parameters) of a static module, counted with forward hooks on one
    run of `example` (batch 1 or more; MACs are divided by the batch)."""
    macs = 0

    def conv_hook(m: nn.Conv2d, inputs, out):
        nonlocal macs
        kh, kw = m.kernel_size
        macs += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inputs, out):
        nonlocal macs
        macs += out.numel() * m.in_features

    def attention_hook(m: Attention, inputs, out):
        nonlocal macs
        b, t, _ = inputs[0].shape
        macs += 2 * b * m.num_heads * t * t * m.head_dim

    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, Attention):
            hooks.append(m.register_forward_hook(attention_hook))
    was_training = module.training
    module.eval()
    try:
        module(example)
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)
    params = sum(p.numel() for p in module.parameters())
    return macs // example.shape[0], params
