"""Multi-head self-attention with a fixed head width, elastic in heads and embedding width.

Heads are a leading slice: `h` heads use rows ``[:h * head_dim]`` of the query, key and value
projections and columns ``[:h * head_dim]`` of the output projection (as in HAT/AutoFormer).
The static `Attention` fuses the three projections into one `nn.Linear`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nestnas.supernet.elastic import ElasticLinear


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Scaled dot-product attention over (B, T, heads*head_dim) inputs; written out with
    matmul and softmax so that every exporter and compiler sees the same plain ops."""
    b, t, _ = q.shape

    def split(z):
        return z.reshape(b, t, num_heads, head_dim).transpose(1, 2)

    scores = torch.matmul(split(q), split(k).transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
    out = torch.matmul(scores.softmax(dim=-1), split(v))
    return out.transpose(1, 2).reshape(b, t, num_heads * head_dim)


class ElasticAttention(nn.Module):
    def __init__(self, max_embed: int, max_heads: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        inner = max_heads * head_dim
        self.q = ElasticLinear(max_embed, inner)
        self.k = ElasticLinear(max_embed, inner)
        self.v = ElasticLinear(max_embed, inner)
        self.proj = ElasticLinear(inner, max_embed)

    def forward(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        inner = num_heads * self.head_dim
        out = attend(self.q(x, inner), self.k(x, inner), self.v(x, inner), num_heads, self.head_dim)
        return self.proj(out, x.shape[-1])

    def to_static(self, embed_dim: int, num_heads: int) -> Attention:
        inner = num_heads * self.head_dim
        static = Attention(embed_dim, num_heads, self.head_dim)
        parts = [lin.to_static(embed_dim, inner) for lin in (self.q, self.k, self.v)]
        static.qkv.weight.data.copy_(torch.cat([p.weight.data for p in parts]))
        static.qkv.bias.data.copy_(torch.cat([p.bias.data for p in parts]))
        static.proj = self.proj.to_static(inner, embed_dim)
        return static


class Attention(nn.Module):
    """Static multi-head self-attention with fused QKV projection."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.qkv = nn.Linear(embed_dim, 3 * inner)
        self.proj = nn.Linear(inner, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attend(q, k, v, self.num_heads, self.head_dim))
