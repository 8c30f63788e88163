"""The transformer family: a ViT/BERT-style encoder supernet with elastic depth, embedding width,
heads and MLP ratio, as one module: its config (`TransformerConfig`), space (`TransformerSpace`),
elastic model and extraction (`ElasticTransformer`), analytic MAC/parameter counts and its parts
for the latency lookup table. Input: (B, num_tokens, token_dim) token features."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nestnas.errors import ConfigError, DataError
from nestnas.supernet.attention import ElasticAttention
from nestnas.supernet.base import Supernet, part_key, register_supernet
from nestnas.supernet.config import SubnetConfig, as_int, floats, ints
from nestnas.supernet.elastic import ElasticLayerNorm, ElasticLinear
from nestnas.supernet.sorting import importance, order, permute_
from nestnas.supernet.space import SearchSpace, Variable, _check_choices
from nestnas.supernet.static import EncoderBlock, StaticEncoder


@dataclass(frozen=True)
class TransformerConfig(SubnetConfig):
    """A ViT/BERT-style encoder subnet: number of layers, embedding width, and heads and MLP
    ratio per layer slot."""

    family: ClassVar[str] = "transformer"
    depth: int
    embed_dim: int
    num_heads: tuple[int, ...]
    mlp_ratios: tuple[float, ...]

    _types: ClassVar[dict[str, Callable[..., Any]]] = {
        "depth": as_int, "embed_dim": as_int, "num_heads": ints, "mlp_ratios": floats}


@dataclass(frozen=True)
class TransformerSpace(SearchSpace):
    """ViT/BERT-style encoder space: elastic depth, embedding width, and heads and MLP ratio
    per layer. Heads have a fixed width (`head_dim`), so fewer heads is a leading slice."""

    family: ClassVar[str] = "transformer"
    config_type: ClassVar[type[SubnetConfig]] = TransformerConfig

    depth_choices: tuple[int, ...] = (2, 3, 4)
    embed_choices: tuple[int, ...] = (32, 48, 64)
    head_choices: tuple[int, ...] = (2, 3, 4)
    mlp_ratio_choices: tuple[float, ...] = (2.0, 3.0, 4.0)
    head_dim: int = 16

    def __post_init__(self):
        _check_choices("depth_choices", self.depth_choices)
        _check_choices("embed_choices", self.embed_choices)
        _check_choices("head_choices", self.head_choices)
        _check_choices("mlp_ratio_choices", self.mlp_ratio_choices)
        object.__setattr__(self, "mlp_ratio_choices", tuple(float(r) for r in self.mlp_ratio_choices))
        if self.head_dim <= 0:
            raise ConfigError(f"search space field 'head_dim': must be positive, got {self.head_dim}")

    @property
    def max_depth(self) -> int:
        return self.depth_choices[-1]

    def mlp_hidden(self, embed_dim: int, ratio: float) -> int:
        return int(round(embed_dim * ratio))

    @functools.lru_cache(maxsize=64)  # noqa: B019 (spaces are frozen, few and long-lived)
    def variables(self):
        out = [Variable("depth", self.depth_choices, stage=0, depth=True), Variable("embed_dim", self.embed_choices)]
        for i in range(self.max_depth):
            out.append(Variable(f"num_heads[{i}]", self.head_choices, stage=0, slot=i))
            out.append(Variable(f"mlp_ratios[{i}]", self.mlp_ratio_choices, stage=0, slot=i))
        return tuple(out)

    def _check_shape(self, config):
        for field in ("num_heads", "mlp_ratios"):
            if len(getattr(config, field)) != self.max_depth:
                raise ConfigError(
                    f"config field {field!r}: expected {self.max_depth} layer slots, got {len(getattr(config, field))}"
                )

    def _flatten(self, config):
        out = [config.depth, config.embed_dim]
        for h, r in zip(config.num_heads, config.mlp_ratios):
            out += [h, r]
        return out

    def _build(self, values):
        return TransformerConfig(
            depth=values[0], embed_dim=values[1],
            num_heads=tuple(values[2::2]), mlp_ratios=tuple(float(r) for r in values[3::2]),
        )

    def canonical(self, config):
        self.validate(config)
        d = config.depth
        return dataclasses.replace(
            config,
            num_heads=tuple(h if i < d else self.head_choices[0] for i, h in enumerate(config.num_heads)),
            mlp_ratios=tuple(r if i < d else self.mlp_ratio_choices[0] for i, r in enumerate(config.mlp_ratios)),
        )

    def size(self):
        per_layer = len(self.head_choices) * len(self.mlp_ratio_choices)
        return len(self.embed_choices) * sum(per_layer**d for d in self.depth_choices)


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
    """Encoder supernet. Input: (B, num_tokens, token_dim) token features."""

    space_type = TransformerSpace
    default_epochs = 60  # reaches the accuracy targets on digits within about two minutes on 2 cores

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

    @classmethod
    def spec_for_data(cls, space, sample_shape, num_classes):
        """Tokens (T, D) as they are; images (C, H, W) as H tokens of C * W values (a row of
        every channel per token: digits (1, 8, 8) are 8 tokens of 8). Tables are refused."""
        shape = tuple(sample_shape)
        if len(shape) == 2 and min(shape) >= 1:
            tokens, dim = shape
        elif len(shape) == 3 and min(shape) >= 1:
            tokens, dim = shape[1], shape[0] * shape[2]
        else:
            raise DataError(f"the transformer family takes token samples shaped (tokens, features) or images shaped "
                            f"(channels, height, width), got {shape}")
        return {"num_classes": int(num_classes), "num_tokens": int(tokens), "token_dim": int(dim)}

    def sample_shape(self):
        return (self.num_tokens, self.token_dim)

    def prepare_input(self, x, config=None):
        if x.dim() == 4:  # (B, C, H, W) images: H tokens of C * W values
            b, c, h, w = x.shape
            return x.permute(0, 2, 1, 3).reshape(b, h, c * w)
        return x

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

    # --- analytic cost and measurable parts ----------------------------------------------------
    @classmethod
    def count_macs(cls, space, config, spec):
        return _tf_scalar(space, config, spec["num_classes"], spec["num_tokens"], spec["token_dim"])

    @classmethod
    def count_macs_encoded(cls, space, X, spec):
        return _tf_encoded(space, X, spec["num_classes"], spec["num_tokens"], spec["token_dim"])

    @classmethod
    def parts(cls, space, config, spec):
        """Token embedding, every layer, head."""
        config = space.canonical(config)
        t, e = spec["num_tokens"], config.embed_dim
        out = [(part_key("embed", t, spec["token_dim"], e), ("embed", e))]
        for i in range(config.depth):
            hidden = space.mlp_hidden(e, config.mlp_ratios[i])
            heads = config.num_heads[i]
            out.append((part_key("layer", t, e, heads, hidden), ("layer", i, e, heads, hidden)))
        out.append((part_key("head", t, e, spec["num_classes"]), ("head", e)))
        return out

    def all_parts(self):
        space, found, spec = self.space, {}, self.spec()
        for e in space.embed_choices:
            for config in (space.smallest(), space.largest()):
                for key, recipe in self.parts(space, dataclasses.replace(config, embed_dim=e), spec):
                    found.setdefault(key, recipe)
            for heads in space.head_choices:
                for ratio in space.mlp_ratio_choices:
                    hidden = space.mlp_hidden(e, ratio)
                    found.setdefault(part_key("layer", self.num_tokens, e, heads, hidden),
                                     ("layer", 0, e, heads, hidden))
        return found

    def build_part(self, recipe, batch):
        kind = recipe[0]
        if kind == "embed":
            e = recipe[1]
            module = _Embed(self.embed.to_static(self.token_dim, e), self.pos_embed[:, :, :e])
            return module.eval(), (batch, self.num_tokens, self.token_dim)
        if kind == "layer":
            _, i, e, heads, hidden = recipe
            return self.blocks[i].to_static(e, heads, hidden).eval(), (batch, self.num_tokens, e)
        e = recipe[1]
        return (_EncoderHead(self.norm.to_static(e), self.head.to_static(e, self.num_classes)).eval(),
                (batch, self.num_tokens, e))


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


# --- analytic counts (the convention of `nestnas.predictors.macs`) ---------------------------------
def _tf_fixed(embed: int, num_classes: int, num_tokens: int, token_dim: int) -> tuple[int, int]:
    """Token embedding (Linear with bias), positional embedding, final LayerNorm, head."""
    macs = num_tokens * token_dim * embed + embed * num_classes
    params = (token_dim * embed + embed) + num_tokens * embed + 2 * embed + (embed * num_classes + num_classes)
    return macs, params


def _tf_layer(embed: int, heads: int, head_dim: int, hidden: int, num_tokens: int) -> tuple[int, int]:
    """One pre-norm encoder layer: LayerNorm, fused qkv Linear, QK^T and AV, proj Linear,
    LayerNorm, Linear-GELU-Linear MLP."""
    inner = heads * head_dim
    t = num_tokens
    macs = (t * embed * 3 * inner        # qkv
            + 2 * heads * t * t * head_dim  # QK^T and AV
            + t * inner * embed          # proj
            + t * embed * hidden         # fc1
            + t * hidden * embed)        # fc2
    params = (2 * embed + embed * 3 * inner + 3 * inner + inner * embed + embed
              + 2 * embed + embed * hidden + hidden + hidden * embed + embed)
    return macs, params


def _tf_encoded(space: TransformerSpace, X: np.ndarray, num_classes: int, num_tokens: int,
                token_dim: int) -> tuple[np.ndarray, np.ndarray]:
    fixed, layer = _tf_tables(space, num_classes, num_tokens, token_dim)
    e = X[:, 1]
    macs, params = fixed[0][e].copy(), fixed[1][e].copy()
    depth = np.asarray(space.depth_choices, dtype=np.int64)[X[:, 0]]
    for i in range(space.max_depth):
        h, m = X[:, 2 + 2 * i], X[:, 3 + 2 * i]
        active = depth > i
        macs += np.where(active, layer[0][e, h, m], 0)
        params += np.where(active, layer[1][e, h, m], 0)
    return macs, params


def _tf_scalar(space: TransformerSpace, config, num_classes: int, num_tokens: int, token_dim: int) -> tuple[int, int]:
    e = config.embed_dim
    macs, params = _tf_fixed(e, num_classes, num_tokens, token_dim)
    for i in range(config.depth):
        hidden = space.mlp_hidden(e, config.mlp_ratios[i])
        m, q = _tf_layer(e, config.num_heads[i], space.head_dim, hidden, num_tokens)
        macs, params = macs + m, params + q
    return macs, params


@functools.lru_cache(maxsize=64)
def _tf_tables(space: TransformerSpace, num_classes: int, num_tokens: int, token_dim: int):
    """Fixed part by embed index; one layer by (embed, heads, mlp ratio) index (same for every
    layer slot, gated by depth). Loops run over options, not configs."""
    embeds, heads, ratios = space.embed_choices, space.head_choices, space.mlp_ratio_choices
    fixed = np.zeros((2, len(embeds)), dtype=np.int64)
    layer = np.zeros((2, len(embeds), len(heads), len(ratios)), dtype=np.int64)
    for a, e in enumerate(embeds):
        fixed[:, a] = _tf_fixed(e, num_classes, num_tokens, token_dim)
        for b, h in enumerate(heads):
            for c, r in enumerate(ratios):
                layer[:, a, b, c] = _tf_layer(e, h, space.head_dim, space.mlp_hidden(e, r), num_tokens)
    return (fixed[0], fixed[1]), (layer[0], layer[1])
