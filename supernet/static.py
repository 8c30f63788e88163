"""Static networks that `extract(config)` returns: plain `torch.nn` layers, no elastic code.

State-dict keys are stable and flat (``blocks.3.depthwise.0.weight``), so an extracted
subnet saves, loads and exports like any hand-written model.
"""

from __future__ import annotations

import torch
from torch import nn

from nestnas.supernet.attention import Attention


class InvertedResidual(nn.Module):
    """MobileNet block: 1x1 expand, depthwise kxk, 1x1 project, identity shortcut when shapes allow."""

    def __init__(self, expand: nn.Sequential, depthwise: nn.Sequential, project: nn.Sequential, residual: bool):
        super().__init__()
        self.expand, self.depthwise, self.project = expand, depthwise, project
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class StaticCNN(nn.Module):
    def __init__(self, stem: nn.Sequential, blocks: list[nn.Module], head: nn.Sequential, classifier: nn.Linear):
        super().__init__()
        self.stem, self.blocks, self.head, self.classifier = stem, nn.Sequential(*blocks), head, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean(dim=(2, 3)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder layer."""

    def __init__(self, ln1: nn.LayerNorm, attn: Attention, ln2: nn.LayerNorm, mlp: nn.Sequential):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = ln1, attn, ln2, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class StaticEncoder(nn.Module):
    """Token embedding + learned positions, encoder layers, final norm, mean pool, classifier."""

    def __init__(self, embed: nn.Linear, pos_embed: torch.Tensor, blocks: list[EncoderBlock], norm: nn.LayerNorm,
                 head: nn.Linear):
        super().__init__()
        self.embed = embed
        self.pos_embed = nn.Parameter(pos_embed.detach().clone())
        self.blocks, self.norm, self.head = nn.Sequential(*blocks), norm, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(x) + self.pos_embed)
        return self.head(self.norm(x).mean(dim=1))
