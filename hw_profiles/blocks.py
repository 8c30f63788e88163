"""Subnets as sequences of parts (stem, blocks, head), for per-block latency lookup tables.

A part's key names everything its latency depends on (kind, channel counts, kernel, stride,
feature-map size), not where it sits in the network, so one measurement serves every slot and
every subnet that contains the same part (Once-for-All's latency table).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from nestnas.supernet.base import Supernet
from nestnas.supernet.cnn import BlockPlan, ElasticCNN, plan
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.space import CNNSpace, TransformerSpace
from nestnas.supernet.transformer import ElasticTransformer


def _key(*fields) -> str:
    return ":".join(str(f) for f in fields)


def cnn_parts(space: CNNSpace, config, in_channels: int, num_classes: int) -> list[tuple[str, tuple]]:
    """(key, how to build it) of each part of a CNN subnet, in network order."""
    config = space.canonical(config)
    p = plan(space, config)
    r = config.resolution
    sizes = space.block_input_sizes(r)
    out = [(_key("stem", in_channels, p.stem, r, space.stem_stride), ("stem", r, p.stem))]
    h = r
    for bp in p.blocks:
        h = sizes[bp.stage][bp.index]
        stride = space.stages[bp.stage].stride if bp.index == 0 else 1
        out.append((_key("block", bp.in_channels, bp.hidden, bp.out_channels, bp.kernel, stride, h), ("block", bp, h)))
        h = (h - 1) // stride + 1
    c_last = p.blocks[-1].out_channels
    out.append((_key("head", c_last, p.head, h, num_classes), ("head", c_last, p.head, h)))
    return out


def transformer_parts(space: TransformerSpace, config, num_tokens: int, token_dim: int,
                      num_classes: int) -> list[tuple[str, tuple]]:
    config = space.canonical(config)
    e = config.embed_dim
    out = [(_key("embed", num_tokens, token_dim, e), ("embed", e))]
    for i in range(config.depth):
        hidden = space.mlp_hidden(e, config.mlp_ratios[i])
        out.append((_key("layer", num_tokens, e, config.num_heads[i], hidden), ("layer", i, e, config.num_heads[i], hidden)))
    out.append((_key("head", num_tokens, e, num_classes), ("head", e)))
    return out


def parts(net: Supernet, config: SubnetConfig) -> list[tuple[str, tuple]]:
    if isinstance(net, ElasticCNN):
        return cnn_parts(net.space, config, net.in_channels, net.num_classes)
    if isinstance(net, ElasticTransformer):
        return transformer_parts(net.space, config, net.num_tokens, net.token_dim, net.num_classes)
    raise TypeError(f"no part decomposition for {type(net).__name__}")


class _CNNHead(nn.Module):
    def __init__(self, head: nn.Module, classifier: nn.Module):
        super().__init__()
        self.head, self.classifier = head, classifier

    def forward(self, x):
        return self.classifier(self.head(x).mean(dim=(2, 3)))


class _Embed(nn.Module):
    def __init__(self, embed: nn.Module, pos_embed: torch.Tensor):
        super().__init__()
        self.embed, self.pos_embed = embed, nn.Parameter(pos_embed.detach().clone())

    def forward(self, x):
        return self.embed(x) + self.pos_embed


class _EncoderHead(nn.Module):
    def __init__(self, norm: nn.Module, head: nn.Module):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, x):
        return self.head(self.norm(x).mean(dim=1))


def all_parts(net: Supernet) -> dict[str, tuple]:
    """Every distinct part of every subnet of `net`'s space (key -> recipe), enumerated per
    slot rather than per subnet, so the table covers configs never profiled whole."""
    space, found = net.space, {}
    if isinstance(net, ElasticTransformer):
        for e in space.embed_choices:
            for config in (space.smallest(), space.largest()):
                for key, recipe in transformer_parts(space, _with_embed(config, e), net.num_tokens, net.token_dim,
                                                     net.num_classes):
                    found.setdefault(key, recipe)
            for heads in space.head_choices:
                for ratio in space.mlp_ratio_choices:
                    hidden = space.mlp_hidden(e, ratio)
                    found.setdefault(_key("layer", net.num_tokens, e, heads, hidden), ("layer", 0, e, heads, hidden))
        return found
    for r in space.resolution_choices:
        sizes = space.block_input_sizes(r)
        for w in space.width_choices:
            stem, stages, head = space.channels(w)
            found.setdefault(_key("stem", net.in_channels, stem, r, space.stem_stride), ("stem", r, stem))
            c_prev, h = stem, r
            for s, st in enumerate(space.stages):
                for b in range(min(st.max_depth, 2)):  # slots past the first share one shape
                    c_in, stride, hb = (c_prev, st.stride, sizes[s][0]) if b == 0 else (stages[s], 1, sizes[s][1])
                    for e in space.expand_choices:
                        for k in space.kernel_choices:
                            bp = BlockPlan(s, b, c_in, stages[s], space.hidden_channels(c_in, e),
                                           space.effective_kernel(k, hb))
                            found.setdefault(_key("block", c_in, bp.hidden, stages[s], bp.kernel, stride, hb),
                                             ("block", bp, hb))
                h = (sizes[s][0] - 1) // st.stride + 1
                c_prev = stages[s]
            found.setdefault(_key("head", stages[-1], head, h, net.num_classes), ("head", stages[-1], head, h))
    return found


def _with_embed(config, e):
    return dataclasses.replace(config, embed_dim=e)


def build_part(net: Supernet, recipe: tuple, batch: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A static module for one part (a recipe from `parts` or `all_parts`) and its input shape."""
    kind = recipe[0]
    if isinstance(net, ElasticCNN):
        if kind == "stem":
            _, r, c = recipe
            module = nn.Sequential(net.stem_conv.to_static(net.in_channels, c, 3), net.stem_bn.to_static(c),
                                   nn.Hardswish())
            return module.eval(), (batch, net.in_channels, r, r)
        if kind == "block":
            _, bp, h = recipe
            return net.stages[bp.stage][bp.index].to_static(bp).eval(), (batch, bp.in_channels, h, h)
        _, c_last, c_head, h = recipe
        head = nn.Sequential(net.head_conv.to_static(c_last, c_head), net.head_bn.to_static(c_head), nn.Hardswish())
        return _CNNHead(head, net.classifier.to_static(c_head, net.num_classes)).eval(), (batch, c_last, h, h)
    if kind == "embed":
        e = recipe[1]
        module = _Embed(net.embed.to_static(net.token_dim, e), net.pos_embed[:, :, :e])
        return module.eval(), (batch, net.num_tokens, net.token_dim)
    if kind == "layer":
        _, i, e, heads, hidden = recipe
        return net.blocks[i].to_static(e, heads, hidden).eval(), (batch, net.num_tokens, e)
    e = recipe[1]
    return _EncoderHead(net.norm.to_static(e), net.head.to_static(e, net.num_classes)).eval(), (batch, net.num_tokens, e)


def config_part_keys(space, X, spec: dict) -> list[list[str]]:
    """Part keys of each encoded config (rows of `X`), from the space and the model spec
    alone (no module is built)."""
    out = []
    for row in X:
        config = space.decode(row)
        if isinstance(space, CNNSpace):
            keys = cnn_parts(space, config, spec["in_channels"], spec["num_classes"])
        else:
            keys = transformer_parts(space, config, spec["num_tokens"], spec["token_dim"], spec["num_classes"])
        out.append([k for k, _ in keys])
    return out
