"""`ElasticTransformer`: a ViT/BERT-style encoder supernet with elastic depth, embedding
width, heads and MLP ratio. Input: (B, num_tokens, token_dim) token features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nestnas.supernet.attention import ElasticAttention
from nestnas.supernet.base import Supernet, register_supernet
from nestnas.supernet.config import TransformerConfig
from nestnas.supernet.elastic import ElasticLayerNorm, ElasticLinear
from nestnas.supernet.sorting import importance, order, permute_
from nestnas.supernet.space import TransformerSpace
from nestnas.supernet.static import EncoderBlock, StaticEncoder


class ElasticEncoderBlock(nn.Module):
    def __init__(self, max_embed: int, max_heads: int, head_dim: int, max_hidden: int):
        super().__init__()
        self.ln1 = ElasticLayerNorm(max_embed)
        self.attn = ElasticAttention(max_embed, max_heads, head_dim)
        self.ln2 = ElasticLayerNorm(max_embed)
        self.fc1 = ElasticLinear(max_embed, max_hidden)
        self.fc2 = ElasticLinear(max_hidden, max_embed)

    def forward(self, x: torch.Tensor, num_heads: int, hidden: int) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), num_heads)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x), hidden)), x.shape[-1])

    def to_static(self, embed: int, num_heads: int, hidden: int) -> EncoderBlock:
        return EncoderBlock(
            self.ln1.to_static(embed), self.attn.to_static(embed, num_heads), self.ln2.to_static(embed),
            nn.Sequential(self.fc1.to_static(embed, hidden), nn.GELU(), self.fc2.to_static(hidden, embed)),
        )


@register_supernet("transformer")
class ElasticTransformer(Supernet):
    def __init__(self, space: TransformerSpace | None = None, num_classes: int = 10, num_tokens: int = 8,
                 token_dim: int = 8):
        super().__init__()
        self.space = space if space is not None else TransformerSpace()
        self.num_classes, self.num_tokens, self.token_dim = num_classes, num_tokens, token_dim
        sp = self.space
        e_max = sp.embed_choices[-1]
        self.embed = ElasticLinear(token_dim, e_max)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, e_max))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        hidden_max = sp.mlp_hidden(e_max, sp.mlp_ratio_choices[-1])
        self.blocks = nn.ModuleList(
            ElasticEncoderBlock(e_max, sp.head_choices[-1], sp.head_dim, hidden_max) for _ in range(sp.max_depth)
        )
        self.norm = ElasticLayerNorm(e_max)
        self.head = ElasticLinear(e_max, num_classes)

    def spec(self):
        return {"num_classes": self.num_classes, "num_tokens": self.num_tokens, "token_dim": self.token_dim}

    def input_shape(self, config=None, batch=1):
        return (batch, self.num_tokens, self.token_dim)

    def _layers(self, config: TransformerConfig):
        sp = self.space
        for i in range(config.depth):
            yield i, config.num_heads[i], sp.mlp_hidden(config.embed_dim, config.mlp_ratios[i])

    def forward(self, x: torch.Tensor, config: TransformerConfig | None = None) -> torch.Tensor:
        config = self.resolve(config)
        self._check_input(x, config)
        e = config.embed_dim
        x = self.embed(x, e) + self.pos_embed[:, :, :e]
        for i, heads, hidden in self._layers(config):
            x = self.blocks[i](x, heads, hidden)
        return self.head(self.norm(x).mean(dim=1), self.num_classes)

    def extract(self, config: TransformerConfig | None = None) -> StaticEncoder:
        """The subnet as a static module (eval mode)."""
        config = self.space.canonical(self.resolve(config))
        e = config.embed_dim
        blocks = [self.blocks[i].to_static(e, heads, hidden) for i, heads, hidden in self._layers(config)]
        static = StaticEncoder(self.embed.to_static(self.token_dim, e), self.pos_embed[:, :, :e], blocks,
                               self.norm.to_static(e), self.head.to_static(e, self.num_classes))
        return static.eval()

    @torch.no_grad()
    def sort_channels(self) -> ElasticTransformer:
        """Sort heads (by their output-projection weights), MLP hidden units (by `fc2`) and
        embedding features (by every weight that reads the residual stream)."""
        hd = self.space.head_dim
        for blk in self.blocks:
            a = blk.attn
            n = a.q.weight.shape[0]
            perm = order(importance([(a.proj.weight, 1)], n, group=hd), group=hd)
            permute_([(a.q.weight, 0), (a.q.bias, 0), (a.k.weight, 0), (a.k.bias, 0), (a.v.weight, 0),
                      (a.v.bias, 0), (a.proj.weight, 1)], perm)
            n = blk.fc1.weight.shape[0]
            perm = order(importance([(blk.fc2.weight, 1)], n))
            permute_([(blk.fc1.weight, 0), (blk.fc1.bias, 0), (blk.fc2.weight, 1)], perm)

        readers = [(self.head.weight, 1)]
        members = [(self.embed.weight, 0), (self.embed.bias, 0), (self.pos_embed, 2), (self.norm.weight, 0),
                   (self.norm.bias, 0), (self.head.weight, 1)]
        for blk in self.blocks:
            a = blk.attn
            readers += [(a.q.weight, 1), (a.k.weight, 1), (a.v.weight, 1), (blk.fc1.weight, 1)]
            members += [(blk.ln1.weight, 0), (blk.ln1.bias, 0), (blk.ln2.weight, 0), (blk.ln2.bias, 0),
                        (a.q.weight, 1), (a.k.weight, 1), (a.v.weight, 1), (a.proj.weight, 0), (a.proj.bias, 0),
                        (blk.fc1.weight, 1), (blk.fc2.weight, 0), (blk.fc2.bias, 0)]
        permute_(members, order(importance(readers, self.embed.weight.shape[0])))
        return self
