"""The hf-encoder family: a pretrained `transformers` encoder (BERT, RoBERTa, DistilBERT, ViT; see
`SUPPORTED_ARCHITECTURES`) made into a supernet, as DynaBERT and InstaTune do.

`elasticize(model, data)` copies the model's weights into the family's own elastic modules,
ranks attention heads and FFN neurons by importance (gradient of the loss with respect to a mask
on each head's output and each neuron, DynaBERT's rule; weight magnitude without data) and
permutes them so that a subnet keeping ``h`` heads and ``f`` neurons keeps the most important
ones. The permutation does not change what the full model computes.

A subnet (`HFEncoderConfig`) keeps ``depth`` of the ``L`` layers (layer ``(j + 1) * L // depth - 1``
for ``j < depth``, so the last one is always kept), per kept layer a number of heads and an FFN
width, and, for text, runs at a sequence length ``seq_len`` (inputs are truncated or padded to
it; latency depends on it). The supernet takes the model's own keyword inputs as a dict, or for
text one packed int64 tensor ``(B, 3, L)`` = stack(input_ids, attention_mask, token_type_ids), or
for ViT a float ``(B, C, H, W)`` tensor; it returns logits. A bare encoder (``BertModel``…) gets a
fresh classifier of `num_labels` on its pooled output, as classification fine-tuning does.

`transformers` is imported only by the functions that need it (`load_pretrained`,
`to_transformers`), so the family loads without it; what a model holds is read through the
architecture adapters of `nestnas.supernet.hf_adapters`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nestnas.errors import ConfigError, DataError
from nestnas.supernet.base import Supernet, part_key, register_supernet
from nestnas.supernet.config import SubnetConfig, as_int, ints
from nestnas.supernet.elastic import ElasticLinear
from nestnas.supernet.hf_adapters import (
    ACTIVATIONS,
    BARE_CLASS,
    SUPPORTED_ARCHITECTURES,
    EncoderDims,
    check_architecture,
    config_updates,
    describe,
    hf_keys,
)
from nestnas.supernet.inputs import InputSpec
from nestnas.supernet.sorting import importance as weight_importance
from nestnas.supernet.sorting import order, permute_
from nestnas.supernet.space import SearchSpace, Variable, _check_choices

__all__ = ["SUPPORTED_ARCHITECTURES", "ElasticHFEncoder", "HFEncoderConfig", "HFEncoderSpace", "elasticize",
           "importance", "kept_layers", "load_pretrained", "rank_"]

FAMILY = "hf-encoder"
HF_EXTRA = "install the hf extra: pip install -e '.[hf]'"
#: Fractions of the full model that the default choices of depth, heads and FFN width take.
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def kept_layers(num_layers: int, depth: int) -> list[int]:
    """Indices of the layers a subnet of `depth` keeps out of `num_layers`: spread evenly, the
    last always kept (DynaBERT keeps layers the same way)."""
    return [(j + 1) * num_layers // depth - 1 for j in range(depth)]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"the hf-encoder family needs transformers, which is not installed: {HF_EXTRA}") from None
    return transformers


@dataclass(frozen=True)
class HFEncoderConfig(SubnetConfig):
    """A subnet of a pretrained encoder: how many layers it keeps, the sequence length it runs
    at, and heads and FFN width per kept layer (slot ``j`` is the ``j``-th kept layer)."""

    family: ClassVar[str] = FAMILY
    depth: int
    seq_len: int
    num_heads: tuple[int, ...]
    ffn: tuple[int, ...]

    _types: ClassVar[dict[str, Callable[..., Any]]] = {
        "depth": as_int, "seq_len": as_int, "num_heads": ints, "ffn": ints}


@dataclass(frozen=True)
class HFEncoderSpace(SearchSpace):
    """Subnets of one pretrained encoder: its sizes (`num_layers`, `hidden`, `head_dim`,
    `max_heads`, `max_ffn`, `max_seq_len`: the longest input its position table serves) and the
    choices. Text models search `seq_len_choices`; a ViT's sequence is its patches and the class
    token (`image_size` set, one choice)."""

    family: ClassVar[str] = FAMILY
    config_type: ClassVar[type[SubnetConfig]] = HFEncoderConfig

    num_layers: int = 4
    hidden: int = 32
    head_dim: int = 8
    max_heads: int = 4
    max_ffn: int = 64
    max_seq_len: int = 64
    depth_choices: tuple[int, ...] = (1, 2, 3, 4)
    head_choices: tuple[int, ...] = (1, 2, 3, 4)
    ffn_choices: tuple[int, ...] = (16, 32, 48, 64)
    seq_len_choices: tuple[int, ...] = (16, 32, 64)
    image_size: int | None = None

    def __post_init__(self):
        for name in ("num_layers", "hidden", "head_dim", "max_heads", "max_ffn", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"search space field {name!r}: must be a positive integer, got {value!r}")
        for name, top in (("depth_choices", self.num_layers), ("head_choices", self.max_heads),
                          ("ffn_choices", self.max_ffn), ("seq_len_choices", self.max_seq_len)):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            _check_choices(name, values)
            if values[-1] > top:
                what = "the model's position embeddings" if name == "seq_len_choices" else "the model"
                raise ConfigError(f"search space field {name!r}: {values[-1]} is beyond {what} (max {top})")
        if self.image_size is not None and self.seq_len_choices != (self.max_seq_len,):
            raise ConfigError(f"search space field 'seq_len_choices': an image model's sequence is its patches and "
                              f"the class token, so the only choice is ({self.max_seq_len},)")

    @property
    def max_depth(self) -> int:
        return self.depth_choices[-1]

    def kept_layers(self, depth: int) -> list[int]:
        return kept_layers(self.num_layers, depth)

    @functools.lru_cache(maxsize=64)  # noqa: B019 (spaces are frozen, few and long-lived)
    def variables(self):
        out = [Variable("depth", self.depth_choices, stage=0, depth=True), Variable("seq_len", self.seq_len_choices)]
        for i in range(self.max_depth):
            out.append(Variable(f"num_heads[{i}]", self.head_choices, stage=0, slot=i))
            out.append(Variable(f"ffn[{i}]", self.ffn_choices, stage=0, slot=i))
        return tuple(out)

    def _check_shape(self, config):
        for field in ("num_heads", "ffn"):
            if len(getattr(config, field)) != self.max_depth:
                raise ConfigError(
                    f"config field {field!r}: expected {self.max_depth} layer slots, got {len(getattr(config, field))}")

    def _flatten(self, config):
        out = [config.depth, config.seq_len]
        for h, f in zip(config.num_heads, config.ffn):
            out += [h, f]
        return out

    def _build(self, values):
        return HFEncoderConfig(depth=values[0], seq_len=values[1], num_heads=tuple(values[2::2]),
                               ffn=tuple(values[3::2]))

    def canonical(self, config):
        self.validate(config)
        d = config.depth
        return dataclasses.replace(
            config, num_heads=tuple(h if i < d else self.head_choices[0] for i, h in enumerate(config.num_heads)),
            ffn=tuple(f if i < d else self.ffn_choices[0] for i, f in enumerate(config.ffn)))

    def size(self):
        per_layer = len(self.head_choices) * len(self.ffn_choices)
        return len(self.seq_len_choices) * sum(per_layer**d for d in self.depth_choices)


# --- the computation, shared by the elastic and the static modules ---------------------------------
def mask_bias(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) mask of ones (attend) and zeros (padding) -> additive (B, 1, 1, L) scores bias."""
    return (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, num_heads: int,
           head_dim: int, head_mask: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention of (B, T, heads * head_dim) projections, written with matmul
    and softmax so every exporter sees plain ops; `head_mask` scales each head's output (only
    importance ranking passes one); `dropout` drops attention probabilities (training only)."""
    b, t, _ = q.shape

    def split(z):
        return z.reshape(b, t, num_heads, head_dim).transpose(1, 2)

    scores = torch.matmul(split(q), split(k).transpose(-2, -1)) * head_dim**-0.5
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    if dropout:
        probs = F.dropout(probs, dropout, True)
    context = torch.matmul(probs, split(v))
    if head_mask is not None:
        context = context * head_mask[:, None, None]
    return context.transpose(1, 2).reshape(b, t, num_heads * head_dim)


def activation(name: str) -> nn.Module:
    cls_name, kwargs = ACTIVATIONS[name]
    return getattr(nn, cls_name)(**kwargs)


def _linear(source: nn.Module, rows: int | None = None, cols: int | None = None) -> nn.Linear:
    """A plain nn.Linear copy of (the leading `rows` x `cols` of) an nn.Linear or ElasticLinear."""
    w = source.weight[:rows, :cols]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=source.bias is not None)
    lin.weight.data.copy_(w)
    if source.bias is not None:
        lin.bias.data.copy_(source.bias[:rows])
    return lin


def _norm(source: nn.LayerNorm) -> nn.LayerNorm:
    norm = nn.LayerNorm(source.normalized_shape, eps=source.eps)
    norm.load_state_dict(source.state_dict())
    return norm


class TextEmbeddings(nn.Module):
    """Word + token-type + position embeddings, LayerNorm. RoBERTa (`position_offset` > 0)
    numbers the positions of non-padding tokens from ``padding_idx + 1``; the others take 0..L-1."""

    def __init__(self, word: nn.Embedding, position: nn.Embedding, token_type: nn.Embedding | None,
                 norm: nn.LayerNorm, position_offset: int, pad_token_id: int, dropout: float = 0.0):
        super().__init__()
        self.word, self.position, self.token_type, self.norm = word, position, token_type, norm
        self.position_offset, self.pad_token_id = position_offset, pad_token_id
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.word(input_ids)
        if self.token_type is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type(types)
        if self.position_offset:
            keep = (input_ids != self.pad_token_id).to(torch.int64)
            x = x + self.position(torch.cumsum(keep, dim=1) * keep + self.pad_token_id)
        else:
            x = x + self.position.weight[: input_ids.shape[1]]
        return self.dropout(self.norm(x))

    def to_static(self, seq_len: int) -> TextEmbeddings:
        rows = seq_len + self.position_offset  # the rows a subnet at seq_len can read
        position = nn.Embedding(rows, self.position.embedding_dim)
        position.weight.data.copy_(self.position.weight[:rows])
        return TextEmbeddings(copy.deepcopy(self.word), position, copy.deepcopy(self.token_type), _norm(self.norm),
                              self.position_offset, self.pad_token_id)


class PatchEmbeddings(nn.Module):
    """ViT: patches projected by a strided conv, the class token prepended, positions added."""

    def __init__(self, patch: nn.Conv2d, cls_token: torch.Tensor, position: torch.Tensor, dropout: float = 0.0):
        super().__init__()
        self.patch = patch
        self.cls_token = nn.Parameter(cls_token.detach().clone())
        self.position = nn.Parameter(position.detach().clone())
        self.dropout = nn.Dropout(dropout)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.position)

    def to_static(self, seq_len: int | None = None) -> PatchEmbeddings:
        return PatchEmbeddings(copy.deepcopy(self.patch), self.cls_token, self.position)


class EncoderLayer(nn.Module):
    """One static encoder layer: attention (separate q, k, v, o projections) and a two-layer FFN,
    each with a residual and LayerNorm, after (BERT) or before (`pre_norm`, ViT) the sublayer."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, norm1: nn.LayerNorm,
                 ffn_in: nn.Linear, act: nn.Module, ffn_out: nn.Linear, norm2: nn.LayerNorm, num_heads: int,
                 head_dim: int, pre_norm: bool):
        super().__init__()
        self.q, self.k, self.v, self.o, self.norm1 = q, k, v, o, norm1
        self.ffn_in, self.act, self.ffn_out, self.norm2 = ffn_in, act, ffn_out, norm2
        self.num_heads, self.head_dim, self.pre_norm = num_heads, head_dim, pre_norm

    def _attention(self, x, bias):
        return self.o(attend(self.q(x), self.k(x), self.v(x), bias, self.num_heads, self.head_dim))

    def _ffn(self, x):
        return self.ffn_out(self.act(self.ffn_in(x)))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self._attention(self.norm1(x), bias)
            return x + self._ffn(self.norm2(x))
        x = self.norm1(x + self._attention(x, bias))
        return self.norm2(x + self._ffn(x))


class ClassifierHead(nn.Module):
    """(Final norm,) first token, optional dense + activation (the pooler), classifier."""

    def __init__(self, norm: nn.LayerNorm | None, dense: nn.Linear | None, act: nn.Module | None, out: nn.Linear):
        super().__init__()
        self.norm, self.dense, self.act, self.out = norm, dense, act, out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states[:, 0]
        if self.norm is not None:  # per-token, so norm(x)[:, 0] == norm(x[:, 0])
            x = self.norm(x)
        if self.dense is not None:
            x = self.act(self.dense(x))
        return self.out(x)


class StaticTextEncoder(nn.Module):
    """An extracted text subnet: forward(input_ids, attention_mask[, token_type_ids]) -> logits."""

    def __init__(self, embeddings: TextEmbeddings, layers: list[EncoderLayer], head: ClassifierHead):
        super().__init__()
        self.embeddings, self.layers, self.head = embeddings, nn.ModuleList(layers), head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)
        bias = mask_bias(attention_mask)
        for layer in self.layers:
            x = layer(x, bias)
        return self.head(x)


class StaticImageEncoder(nn.Module):
    """An extracted ViT subnet: forward(pixel_values) -> logits."""

    def __init__(self, embeddings: PatchEmbeddings, layers: list[EncoderLayer], head: ClassifierHead):
        super().__init__()
        self.embeddings, self.layers, self.head = embeddings, nn.ModuleList(layers), head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class LayerPart(nn.Module):
    """A text layer measured on its own: forward(hidden_states, attention_mask)."""

    def __init__(self, layer: EncoderLayer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden_states, mask_bias(attention_mask))


# --- the elastic modules ------------------------------------------------------------------------
class ElasticEncoderLayer(nn.Module):
    """One pretrained layer; heads are a leading slice of q/k/v rows and o columns, FFN neurons a
    leading slice of ffn_in rows and ffn_out columns."""

    def __init__(self, d: EncoderDims):
        super().__init__()
        inner = d.num_heads * d.head_dim
        self.q, self.k, self.v = (ElasticLinear(d.hidden, inner, bias=d.qkv_bias) for _ in range(3))
        self.o = ElasticLinear(inner, d.hidden)
        self.norm1 = nn.LayerNorm(d.hidden, eps=d.eps)
        self.ffn_in, self.ffn_out = ElasticLinear(d.hidden, d.ffn), ElasticLinear(d.ffn, d.hidden)
        self.norm2 = nn.LayerNorm(d.hidden, eps=d.eps)
        self.act = activation(d.act)
        self.head_dim, self.pre_norm = d.head_dim, d.pre_norm
        self.attention_dropout = d.attention_dropout
        self.dropout = nn.Dropout(d.hidden_dropout)

    def _attention(self, x, bias, heads, head_mask):
        inner = heads * self.head_dim
        q, k, v = self.q(x, inner), self.k(x, inner), self.v(x, inner)
        p = self.attention_dropout if self.training else 0.0
        return self.o(attend(q, k, v, bias, heads, self.head_dim, head_mask, p), x.shape[-1])

    def _ffn(self, x, ffn, neuron_mask):
        h = self.act(self.ffn_in(x, ffn))
        if neuron_mask is not None:
            h = h * neuron_mask
        return self.ffn_out(h, x.shape[-1])

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, heads: int, ffn: int,
                head_mask: torch.Tensor | None = None, neuron_mask: torch.Tensor | None = None) -> torch.Tensor:
        drop = self.dropout
        if self.pre_norm:
            x = x + drop(self._attention(self.norm1(x), bias, heads, head_mask))
            return x + drop(self._ffn(self.norm2(x), ffn, neuron_mask))
        x = self.norm1(x + drop(self._attention(x, bias, heads, head_mask)))
        return self.norm2(x + drop(self._ffn(x, ffn, neuron_mask)))

    def to_static(self, heads: int, ffn: int) -> EncoderLayer:
        inner, hidden = heads * self.head_dim, self.norm1.normalized_shape[0]
        return EncoderLayer(_linear(self.q, inner), _linear(self.k, inner), _linear(self.v, inner),
                            _linear(self.o, hidden, inner), _norm(self.norm1), _linear(self.ffn_in, ffn),
                            copy.deepcopy(self.act), _linear(self.ffn_out, hidden, ffn), _norm(self.norm2), heads,
                            self.head_dim, self.pre_norm)


class ElasticHead(nn.Module):
    def __init__(self, d: EncoderDims, num_labels: int):
        super().__init__()
        self.dense = nn.Linear(d.hidden, d.hidden) if d.head_dense else None
        self.act = activation(d.head_act) if d.head_dense else None
        self.out = nn.Linear(d.hidden, num_labels)
        nn.init.normal_(self.out.weight, std=d.initializer_range)  # a fresh head, as transformers initialises one
        nn.init.zeros_(self.out.bias)
        self.dropout = nn.Dropout(d.classifier_dropout)

    def pool(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states[:, 0]
        return x if self.dense is None else self.act(self.dense(x))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.pool(hidden_states)))

    def to_static(self, norm: nn.LayerNorm | None) -> ClassifierHead:
        dense = None if self.dense is None else _linear(self.dense)
        return ClassifierHead(None if norm is None else _norm(norm), dense, copy.deepcopy(self.act), _linear(self.out))


def default_hf_config(space: HFEncoderSpace) -> dict[str, Any]:
    """A model config of `space`'s sizes (BERT for text, ViT for images), for a supernet built
    without a pretrained model (the family's defaults, tests)."""
    common = {"hidden_size": space.hidden, "num_hidden_layers": space.num_layers,
              "num_attention_heads": space.max_heads, "intermediate_size": space.max_ffn, "hidden_act": "gelu",
              "layer_norm_eps": 1e-12,
              "initializer_range": 0.02, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    if space.image_size is not None:
        side = math.isqrt(space.max_seq_len - 1)
        return {"model_type": "vit", **common, "head_dim": space.head_dim, "image_size": space.image_size,
                "patch_size": space.image_size // max(side, 1), "num_channels": 3, "qkv_bias": True}
    if space.hidden != space.max_heads * space.head_dim:
        raise ConfigError("a text space without a model config needs hidden == max_heads * head_dim")
    return {"model_type": "bert", **common, "vocab_size": 1000, "max_position_embeddings": space.max_seq_len,
            "type_vocab_size": 2, "pad_token_id": 0}


def _check_space(space: HFEncoderSpace, d: EncoderDims) -> None:
    want = {"num_layers": d.num_layers, "hidden": d.hidden, "head_dim": d.head_dim, "max_heads": d.num_heads,
            "max_ffn": d.ffn, "image_size": d.image_size if d.kind == "image" else None}
    for name, value in want.items():
        if getattr(space, name) != value:
            raise ConfigError(f"search space field {name!r}: {getattr(space, name)!r} does not match the model "
                              f"({d.architecture}: {value!r})")
    if space.max_seq_len > d.max_seq_len or (d.kind == "image" and space.max_seq_len != d.max_seq_len):
        raise ConfigError(f"search space field 'max_seq_len': {space.max_seq_len} is beyond the model's position "
                          f"embeddings (max {d.max_seq_len})")


@functools.lru_cache(maxsize=64)
def _dims_cached(space: HFEncoderSpace, spec_json: str) -> tuple[EncoderDims, int]:
    spec = {**ElasticHFEncoder.default_spec(), **json.loads(spec_json)}
    hf_config = spec["hf_config"] if spec["hf_config"] is not None else default_hf_config(space)
    architecture = spec["architecture"] or _default_architecture(space)
    d = describe(hf_config, architecture, bool(spec["pooler"]))
    _check_space(space, d)
    return d, int(spec["num_labels"])


def _dims(space: HFEncoderSpace, spec: dict[str, Any]) -> tuple[EncoderDims, int]:
    return _dims_cached(space, json.dumps(spec, sort_keys=True))


def _default_architecture(space: HFEncoderSpace) -> str:
    return "ViTForImageClassification" if space.image_size is not None else "BertForSequenceClassification"


@register_supernet(FAMILY)
class ElasticHFEncoder(Supernet):
    """A pretrained encoder as a supernet (build it with `elasticize`). The spec (`spec()`) is
    plain JSON: the model's config dict, its class name, where it came from, whether a bare
    encoder has its pooler, and the number of labels."""

    space_type = HFEncoderSpace
    default_epochs = 3  # fine-tuning: a few epochs

    def __init__(self, space: HFEncoderSpace | None = None, hf_config: dict | None = None,
                 architecture: str | None = None, source: str = "", pooler: bool = True, num_labels: int = 2):
        super().__init__()
        self.space = space if space is not None else HFEncoderSpace()
        architecture = architecture or _default_architecture(self.space)
        hf_config = default_hf_config(self.space) if hf_config is None else hf_config
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigError(f"num_labels must be a positive integer, got {num_labels!r}")
        self.hf_config = json.loads(json.dumps(hf_config))  # plain JSON: the checkpoint stores it
        self.architecture, self.source, self.pooler = architecture, str(source), bool(pooler)
        self.num_labels = num_labels
        self.dims = d = describe(self.hf_config, architecture, self.pooler)
        _check_space(self.space, d)
        if d.kind == "text":
            self.embeddings = TextEmbeddings(
                nn.Embedding(d.vocab_size, d.hidden), nn.Embedding(d.positions, d.hidden),
                nn.Embedding(d.type_vocab_size, d.hidden) if d.type_vocab_size else None,
                nn.LayerNorm(d.hidden, eps=d.embed_eps), d.position_offset, d.pad_token_id, d.hidden_dropout)
        else:
            self.embeddings = PatchEmbeddings(
                nn.Conv2d(d.num_channels, d.hidden, d.patch_size, d.patch_size), torch.zeros(1, 1, d.hidden),
                torch.zeros(d.num_patches + 1, d.hidden), d.hidden_dropout)
        self.layers = nn.ModuleList(ElasticEncoderLayer(d) for _ in range(d.num_layers))
        self.final_norm = nn.LayerNorm(d.hidden, eps=d.eps) if d.final_norm else None
        self.head = ElasticHead(d, num_labels)

    # --- spec and data ----------------------------------------------------------------------
    def spec(self):
        return {"hf_config": self.hf_config, "architecture": self.architecture, "source": self.source,
                "pooler": self.pooler, "num_labels": self.num_labels}

    @classmethod
    def spec_for_data(cls, space, sample_shape, num_classes):
        """Text samples are packed (3, L) int rows; images (C, H, W). The model itself comes from
        `elasticize`: this only sets the number of labels."""
        shape = tuple(sample_shape)
        if space.image_size is None and (len(shape) != 2 or shape[0] != 3):
            raise DataError(f"the {FAMILY} family takes text samples packed as (3, length) = (input_ids, "
                            f"attention_mask, token_type_ids), got {shape}")
        if space.image_size is not None and len(shape) != 3:
            raise DataError(f"the {FAMILY} family's image model takes samples shaped (channels, height, width), "
                            f"got {shape}")
        return {"num_labels": int(num_classes)}

    @classmethod
    def image_size(cls, space):
        return space.image_size

    def sample_shape(self):
        d = self.dims
        if d.kind == "image":
            return (d.num_channels, d.image_size, d.image_size)
        return (3, self.space.seq_len_choices[-1])

    def input_shape(self, config=None, batch=1):
        config = self.resolve(config)
        d = self.dims
        if d.kind == "image":
            return (batch, d.num_channels, d.image_size, d.image_size)
        return (batch, 3, config.seq_len)

    def input_specs(self, config=None, batch=1):
        """Text: int64 ``input_ids`` (below the vocabulary size), ``attention_mask`` (ones) and,
        where the model has token types, ``token_type_ids`` (below the type vocabulary), each (batch, seq_len); ViT:
        float32 ``pixel_values``."""
        config = self.resolve(config)
        d = self.dims
        if d.kind == "image":
            return (InputSpec("pixel_values", self.input_shape(config, batch)),)
        shape = (batch, config.seq_len)
        specs = [InputSpec("input_ids", shape, "int64", 0, d.vocab_size),
                 InputSpec("attention_mask", shape, "int64", 1, 2)]
        if d.type_vocab_size:
            specs.append(InputSpec("token_type_ids", shape, "int64", 0, d.type_vocab_size))
        return tuple(specs)

    def prepare_input(self, x, config=None):
        """Text: the packed (B, 3, seq_len) tensor of `config`'s sequence length (truncated or
        padded); images as they are."""
        config = self.resolve(config)
        if self.dims.kind == "image":
            return self._pixels(x)
        return torch.stack(self._text(x, config.seq_len), dim=1)

    def _text(self, inputs, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(inputs, dict):
            if "input_ids" not in inputs:
                raise ConfigError(f"text inputs need 'input_ids'; got {sorted(inputs)}")
            ids, mask, types = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("token_type_ids")
        elif isinstance(inputs, torch.Tensor) and inputs.dim() == 3 and inputs.shape[1] == 3:
            ids, mask, types = inputs.unbind(1)
        elif isinstance(inputs, torch.Tensor) and inputs.dim() == 2:
            ids, mask, types = inputs, None, None
        else:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ConfigError(f"text inputs must be a dict of input_ids, attention_mask, token_type_ids or one packed "
                              f"(B, 3, L) int tensor, got {shape}")
        if ids.is_floating_point():
            raise ConfigError(f"input_ids must be integers, got {ids.dtype}")
        ids = ids.long()
        mask = torch.ones_like(ids) if mask is None else mask.long()
        types = torch.zeros_like(ids) if types is None else types.long()
        length = ids.shape[1]
        if length > seq_len:
            return ids[:, :seq_len], mask[:, :seq_len], types[:, :seq_len]
        if length < seq_len:
            pad = (0, seq_len - length)
            return F.pad(ids, pad, value=self.dims.pad_token_id), F.pad(mask, pad), F.pad(types, pad)
        return ids, mask, types

    def _pixels(self, inputs) -> torch.Tensor:
        if isinstance(inputs, dict) and "pixel_values" not in inputs:
            raise ConfigError(f"image inputs need 'pixel_values'; got {sorted(inputs)}")
        x = inputs["pixel_values"] if isinstance(inputs, dict) else inputs
        d = self.dims
        want = (d.num_channels, d.image_size, d.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"pixel_values must be (B, {', '.join(map(str, want))}), got {shape}")
        return x.float()

    # --- the model ---------------------------------------------------------------------------
    def sequence_output(self, inputs, config: HFEncoderConfig | None = None, head_mask: torch.Tensor | None = None,
                        neuron_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's hidden states (B, seq_len, hidden) (after ViT's final norm), as the
        model's ``last_hidden_state``. The masks (num_layers, max_heads / max_ffn) scale heads
        and neurons (importance ranking)."""
        config = self.resolve(config)
        if self.dims.kind == "image":
            x, bias = self.embeddings(self._pixels(inputs)), None
        else:
            ids, mask, types = self._text(inputs, config.seq_len)
            x, bias = self.embeddings(ids, types), mask_bias(mask)
        for j, i in enumerate(self.space.kept_layers(config.depth)):
            heads, ffn = config.num_heads[j], config.ffn[j]
            x = self.layers[i](x, bias, heads, ffn, None if head_mask is None else head_mask[i, :heads],
                               None if neuron_mask is None else neuron_mask[i, :ffn])
        return x if self.final_norm is None else self.final_norm(x)

    def pooled_output(self, inputs, config: HFEncoderConfig | None = None) -> torch.Tensor:
        """What the classifier reads: the pooler's output, or the first token's hidden state."""
        return self.head.pool(self.sequence_output(inputs, config))

    def forward(self, inputs, config: HFEncoderConfig | None = None) -> torch.Tensor:
        return self.head(self.sequence_output(inputs, config))

    def extract(self, config: HFEncoderConfig | None = None) -> nn.Module:
        """The subnet as a static module: forward(input_ids, attention_mask[, token_type_ids])
        (the order of `input_specs`) at `seq_len`, or forward(pixel_values)."""
        config = self.space.canonical(self.resolve(config))
        kept = self.space.kept_layers(config.depth)
        layers = [self.layers[i].to_static(config.num_heads[j], config.ffn[j]) for j, i in enumerate(kept)]
        head = self.head.to_static(self.final_norm)
        cls = StaticImageEncoder if self.dims.kind == "image" else StaticTextEncoder
        return cls(self.embeddings.to_static(config.seq_len), layers, head).eval()

    @torch.no_grad()
    def sort_channels(self) -> ElasticHFEncoder:
        """Rank heads and neurons by weight magnitude (`elasticize` ranks by gradients when given data)."""
        rank_(self, *importance(self))
        return self

    def to_transformers(self, config: HFEncoderConfig | None = None):
        """The subnet as a model of the original `transformers` class (save it with
        `save_pretrained`, reload it with plain `transformers`), where it fits that class's own
        config: every kept layer with all heads (transformers 5 has no `pruned_heads`) and one FFN
        width. Positions keep the full table; run it on inputs of the subnet's `seq_len`. A bare
        encoder's fresh classifier is not part of its class and is left out."""
        config = self.space.canonical(self.resolve(config))
        d, depth = self.dims, config.depth
        heads, ffn = config.num_heads[:depth], config.ffn[:depth]
        if any(h != d.num_heads for h in heads):
            raise ConfigError(f"subnet heads {list(heads)} do not fit {self.architecture}'s own config: transformers "
                              f"has no pruned_heads, so every kept layer needs all {d.num_heads} heads")
        if len(set(ffn)) != 1:
            raise ConfigError(f"subnet FFN widths {list(ffn)} do not fit {self.architecture}'s own config: it has one "
                              "intermediate size for every layer")
        transformers = _transformers()
        fields = {**self.hf_config, **config_updates(d, depth, ffn[0]), "architectures": [self.architecture]}
        if d.trained_head or self.architecture != BARE_CLASS[d.model_type]:
            fields.pop("id2label", None)
            fields.pop("label2id", None)
            fields["num_labels"] = self.num_labels
        hf_config = transformers.AutoConfig.for_model(**fields)
        cls = getattr(transformers, self.architecture)
        bare_with_pooler_option = self.architecture in ("BertModel", "RobertaModel", "ViTModel")
        model = cls(hf_config, **({"add_pooling_layer": self.pooler} if bare_with_pooler_option else {})).eval()
        state, mine = model.state_dict(), self.state_dict()
        kept = self.space.kept_layers(depth)
        with torch.no_grad():
            for my_key, hf_key in hf_keys(dataclasses.replace(d, num_layers=depth), state).items():
                state[hf_key].copy_(_sliced(mine, my_key, kept, ffn[0]).reshape(state[hf_key].shape))
        return model

    def load_hf_state(self, state: dict[str, torch.Tensor], keys: dict[str, str]) -> None:
        """Copy a model's tensors (its `state_dict`) into this supernet through `hf_keys`."""
        mine = self.state_dict()
        missing = sorted(set(mine) - set(keys) - {"head.out.weight", "head.out.bias"})
        if missing:
            raise ConfigError(f"{self.architecture}: no weights for {missing[:3]} in the model")
        with torch.no_grad():
            for my_key, hf_key in keys.items():
                if hf_key not in state:
                    raise ConfigError(f"{self.architecture}: the model has no tensor {hf_key!r}")
                mine[my_key].copy_(state[hf_key].reshape(mine[my_key].shape))

    # --- analytic cost and measurable parts ----------------------------------------------------
    @classmethod
    def count_macs(cls, space, config, spec):
        d, labels = _dims(space, spec)
        macs, params = _fixed_counts(d, config.seq_len, labels)
        for j in range(config.depth):
            m, p = _layer_counts(d, config.seq_len, config.num_heads[j], config.ffn[j])
            macs, params = macs + m, params + p
        return macs, params

    @classmethod
    def count_macs_encoded(cls, space, X, spec):
        d, labels = _dims(space, spec)
        fixed, layer = _tables(space, d, labels)
        t = X[:, 1]
        macs, params = fixed[0][t].copy(), fixed[1][t].copy()
        depth = np.asarray(space.depth_choices, dtype=np.int64)[X[:, 0]]
        for i in range(space.max_depth):
            h, f = X[:, 2 + 2 * i], X[:, 3 + 2 * i]
            active = depth > i
            macs += np.where(active, layer[0][t, h, f], 0)
            params += np.where(active, layer[1][t, h, f], 0)
        return macs, params

    @classmethod
    def parts(cls, space, config, spec):
        """Embeddings at seq_len, each kept layer at (seq_len, heads, FFN width), the head."""
        config = space.canonical(config)
        d, labels = _dims(space, spec)
        t = config.seq_len
        out = [(_embed_key(d, t), ("embed", t))]
        for j, i in enumerate(space.kept_layers(config.depth)):
            h, f = config.num_heads[j], config.ffn[j]
            out.append((part_key("layer", t, d.hidden, h, d.head_dim, f), ("layer", i, t, h, f)))
        out.append((part_key("head", t, d.hidden, int(d.head_dense), labels), ("head", t)))
        return out

    def all_parts(self):
        space, d, found = self.space, self.dims, {}
        last = space.num_layers - 1
        for t in space.seq_len_choices:
            found.setdefault(_embed_key(d, t), ("embed", t))
            for h in space.head_choices:
                for f in space.ffn_choices:
                    found.setdefault(part_key("layer", t, d.hidden, h, d.head_dim, f), ("layer", last, t, h, f))
            found.setdefault(part_key("head", t, d.hidden, int(d.head_dense), self.num_labels), ("head", t))
        return found

    def build_part(self, recipe, batch):
        """The part and its input: a shape where it takes one float tensor, else its `InputSpec`s
        (the text embeddings take int ids; a text layer takes hidden states and the mask)."""
        kind, d = recipe[0], self.dims
        if kind == "embed":
            t = recipe[1]
            module = self.embeddings.to_static(t).eval()
            if d.kind == "image":
                return module, (batch, d.num_channels, d.image_size, d.image_size)
            specs = [InputSpec("input_ids", (batch, t), "int64", 0, d.vocab_size)]
            if d.type_vocab_size:
                specs.append(InputSpec("token_type_ids", (batch, t), "int64", 0, d.type_vocab_size))
            return module, tuple(specs)
        if kind == "layer":
            _, i, t, h, f = recipe
            layer = self.layers[i].to_static(h, f)
            if d.kind == "image":
                return layer.eval(), (batch, t, d.hidden)
            return LayerPart(layer).eval(), (InputSpec("hidden_states", (batch, t, d.hidden)),
                                             InputSpec("attention_mask", (batch, t), "int64", 1, 2))
        return self.head.to_static(self.final_norm).eval(), (batch, recipe[1], d.hidden)


def _sliced(mine: dict[str, torch.Tensor], key: str, kept: list[int], ffn: int) -> torch.Tensor:
    # a tensor of the subnet's j-th layer from the supernet's kept[j]-th, FFN cut to `ffn`
    if not key.startswith("layers."):
        return mine[key]
    _, j, rest = key.split(".", 2)
    t = mine[f"layers.{kept[int(j)]}.{rest}"]
    if rest.startswith("ffn_in."):
        return t[:ffn]
    return t[:, :ffn] if rest == "ffn_out.weight" else t


def _embed_key(d: EncoderDims, t: int) -> str:
    if d.kind == "image":
        return part_key("patch", d.image_size, d.patch_size, d.num_channels, d.hidden)
    return part_key("embed", t, d.hidden)


# --- analytic counts (the convention of `nestnas.predictors.macs`) ---------------------------------
def _layer_counts(d: EncoderDims, t: int, heads: int, ffn: int) -> tuple[int, int]:
    """q, k, v and o projections, QK^T and AV, the FFN; LayerNorms hold parameters only."""
    h, inner = d.hidden, heads * d.head_dim
    macs = t * h * 3 * inner + 2 * heads * t * t * d.head_dim + t * inner * h + 2 * t * h * ffn
    params = 3 * (h * inner + (inner if d.qkv_bias else 0)) + inner * h + h + h * ffn + ffn + ffn * h + h + 4 * h
    return macs, params


def _fixed_counts(d: EncoderDims, t: int, num_labels: int) -> tuple[int, int]:
    """Embeddings (lookups cost no MACs; ViT's patch conv does), final norm, head on the first token."""
    h = d.hidden
    if d.kind == "text":
        macs = 0
        params = (d.vocab_size + d.position_rows(t) + d.type_vocab_size) * h + 2 * h
    else:
        k = d.num_channels * d.patch_size**2
        macs = d.num_patches * h * k
        params = h * k + h + h + (d.num_patches + 1) * h + 2 * h
    if d.head_dense:
        macs, params = macs + h * h, params + h * h + h
    return macs + h * num_labels, params + h * num_labels + num_labels


@functools.lru_cache(maxsize=64)
def _tables(space: HFEncoderSpace, d: EncoderDims, num_labels: int):
    """Fixed part by seq_len index; one layer by (seq_len, heads, ffn) index (the same in every slot)."""
    seqs, heads, ffns = space.seq_len_choices, space.head_choices, space.ffn_choices
    fixed = np.zeros((2, len(seqs)), dtype=np.int64)
    layer = np.zeros((2, len(seqs), len(heads), len(ffns)), dtype=np.int64)
    for a, t in enumerate(seqs):
        fixed[:, a] = _fixed_counts(d, t, num_labels)
        for b, h in enumerate(heads):
            for c, f in enumerate(ffns):
                layer[:, a, b, c] = _layer_counts(d, t, h, f)
    return (fixed[0], fixed[1]), (layer[0], layer[1])


# --- importance ranking (DynaBERT) --------------------------------------------------------------
def _batches(data: Iterable, n_batches: int):
    for i, item in enumerate(data):
        if i >= n_batches:
            return
        if isinstance(item, (tuple, list)) and len(item) == 2:
            yield item[0], item[1]
        else:
            yield item, None


def importance(net: ElasticHFEncoder, data: Iterable | None = None, n_batches: int = 4,
               use_labels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_layers, max_heads) head and (num_layers, max_ffn) neuron importance of the largest
    subnet. With `data` (an iterable of (inputs, labels) or of inputs): |dL/d mask| summed over
    `n_batches` batches (Michel et al., DynaBERT), L the cross entropy of the logits where the
    model's classifier is trained and labels are given (`use_labels`), else half the squared norm
    of the pooled output (a bare encoder's fresh head carries no signal). Without data: the L1
    norm of the weights that read each head's output (o) and each neuron (ffn_out) and of those
    that make it (v, ffn_in)."""
    d = net.dims
    if data is None:
        hd = d.head_dim
        heads = torch.stack([weight_importance([(lay.o.weight, 1), (lay.v.weight, 0)], d.num_heads * hd, group=hd)
                             for lay in net.layers])
        neurons = torch.stack([weight_importance([(lay.ffn_out.weight, 1), (lay.ffn_in.weight, 0)], d.ffn)
                               for lay in net.layers])
        return heads, neurons
    head_mask = torch.ones(d.num_layers, d.num_heads, requires_grad=True)
    neuron_mask = torch.ones(d.num_layers, d.ffn, requires_grad=True)
    heads, neurons = torch.zeros(d.num_layers, d.num_heads), torch.zeros(d.num_layers, d.ffn)
    largest, was_training, seen = net.space.largest(), net.training, 0
    net.eval()  # no dropout: the same batches give the same ranking
    try:
        for x, y in _batches(data, n_batches):
            seq = net.sequence_output(x, largest, head_mask, neuron_mask)
            if use_labels and y is not None:
                y = torch.as_tensor(y).long()
                if y.numel() and (int(y.min()) < 0 or int(y.max()) >= net.num_labels):
                    raise DataError(f"labels must lie in 0..{net.num_labels - 1} (num_labels), got {int(y.min())}.."
                                    f"{int(y.max())}")
                loss = F.cross_entropy(net.head(seq), y)
            else:
                loss = 0.5 * net.head.pool(seq).pow(2).sum(dim=-1).mean()
            gh, gn = torch.autograd.grad(loss, (head_mask, neuron_mask))
            heads += gh.abs()
            neurons += gn.abs()
            seen += 1
    finally:
        net.train(was_training)
    if not seen:
        raise DataError("importance ranking: the data gave no batches")
    return heads, neurons


@torch.no_grad()
def rank_(net: ElasticHFEncoder, head_scores: torch.Tensor, neuron_scores: torch.Tensor) -> list[list[int]]:
    """Permute every layer's heads (q/k/v rows per head, o columns) and FFN neurons (ffn_in rows,
    ffn_out columns) so that the highest scores come first, in place; the function of the full
    model is unchanged. Returns each layer's head order (original head indices, best first)."""
    hd, orders = net.dims.head_dim, []
    for lay, hs, ns in zip(net.layers, head_scores, neuron_scores):
        perm = order(hs, group=hd)
        rows = [(lin.weight, 0) for lin in (lay.q, lay.k, lay.v)]
        rows += [(lin.bias, 0) for lin in (lay.q, lay.k, lay.v) if lin.bias is not None]
        permute_([*rows, (lay.o.weight, 1)], perm)
        permute_([(lay.ffn_in.weight, 0), (lay.ffn_in.bias, 0), (lay.ffn_out.weight, 1)], order(ns))
        orders.append(torch.argsort(-hs, stable=True).tolist())
    return orders


def _fractions(top: int, fractions: Iterable[float] = DEFAULT_FRACTIONS) -> tuple[int, ...]:
    return tuple(sorted({max(1, int(round(top * f))) for f in fractions}))


def default_space(d: EncoderDims, depth_choices=None, head_choices=None, ffn_choices=None,
                  seq_len_choices=None) -> HFEncoderSpace:
    """The space `elasticize` makes: depth, heads and FFN width at a quarter, half, three quarters
    and all of the model's; text sequence lengths of a quarter, half and all of its positions."""
    top = d.max_seq_len
    if d.kind == "image":
        if seq_len_choices is not None and tuple(seq_len_choices) != (top,):
            raise ConfigError(f"seq_len_choices: a ViT's sequence is its {top - 1} patches and the class token; "
                              f"allowed: [{top}]")
        seqs = (top,)
    else:
        seqs = tuple(seq_len_choices) if seq_len_choices is not None else _fractions(top, (0.25, 0.5, 1.0))
        beyond = [s for s in seqs if not isinstance(s, bool) and isinstance(s, int) and s > top]
        if beyond:
            raise ConfigError(f"seq_len {beyond[0]} is beyond the model's position embeddings (max {top})")
    return HFEncoderSpace(
        num_layers=d.num_layers, hidden=d.hidden, head_dim=d.head_dim, max_heads=d.num_heads, max_ffn=d.ffn,
        max_seq_len=top, depth_choices=tuple(depth_choices or _fractions(d.num_layers)),
        head_choices=tuple(head_choices or _fractions(d.num_heads)),
        ffn_choices=tuple(ffn_choices or _fractions(d.ffn)),
        seq_len_choices=seqs, image_size=d.image_size if d.kind == "image" else None)


def _facts(model) -> tuple[str, dict[str, Any], bool, EncoderDims]:
    """(architecture, plain-JSON config, whether a pooler is kept, dimensions) of `model`."""
    architecture = check_architecture(type(model).__name__)
    hf_config = json.loads(model.config.to_json_string(use_diff=False))
    bare = architecture == BARE_CLASS.get(hf_config.get("model_type"))
    pooler = getattr(model, "pooler", None) is not None if bare else True
    return architecture, hf_config, pooler, describe(hf_config, architecture, pooler)


def pretrained_space(model) -> HFEncoderSpace:
    """The default space `elasticize(model)` makes, without copying any weight."""
    return default_space(_facts(model)[3])


def elasticize(model, data: Iterable | None = None, *, n_batches: int = 4, num_labels: int | None = None,
               depth_choices=None, head_choices=None, ffn_choices=None, seq_len_choices=None, source: str = "",
               rank: bool = True) -> ElasticHFEncoder:
    """A supernet of the `transformers` encoder `model` (one of `SUPPORTED_ARCHITECTURES`), its
    heads and FFN neurons ranked by importance on `n_batches` batches of `data` (see
    `importance`; weight magnitude without data; `rank=False` keeps the pretrained order, for
    comparison). `model` is not modified. A bare encoder, or a classifier asked for another
    `num_labels`, gets a fresh classifier of `num_labels` (default: the model's, else 2).
    Choices left None take `default_space`'s."""
    architecture, hf_config, pooler, d = _facts(model)
    own = int(model.config.num_labels) if d.trained_head else None
    num_labels = int(num_labels or own or 2)
    space = default_space(d, depth_choices, head_choices, ffn_choices, seq_len_choices)
    net = ElasticHFEncoder(space, hf_config, architecture, source, pooler, num_labels)
    state = model.state_dict()
    keys = hf_keys(d, state)
    trained = own == num_labels
    if not trained:
        keys = {k: v for k, v in keys.items() if not k.startswith("head.out.")}
    net.load_hf_state(state, keys)
    if rank:
        rank_(net, *importance(net, data, n_batches, use_labels=trained))
    return net.train(model.training)


def load_pretrained(folder: str | Path):
    """The model saved in the local folder `folder` (`save_pretrained`'s layout), of the class
    its config.json names (`architectures`, else the bare class of its `model_type`). Nothing is
    downloaded."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"model folder {str(path)!r} does not exist" if not path.exists()
                          else f"model folder {str(path)!r} is not a folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model folder {str(path)!r} has no config.json (write it with save_pretrained)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config_file}: not a readable JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_file}: not a model config (a JSON object)")
    archs, model_type = config.get("architectures"), config.get("model_type")
    architecture = archs[0] if isinstance(archs, list) and archs else BARE_CLASS.get(model_type, model_type)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"model folder {str(path)!r}: architecture {architecture!r} is not supported; supported: "
                          f"{list(SUPPORTED_ARCHITECTURES)}")
    transformers = _transformers()
    try:
        with _quiet(transformers):
            model = getattr(transformers, architecture).from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model folder {str(path)!r}: cannot load the {architecture} weights: {first}") from None
    return model.eval()


@contextlib.contextmanager
def _quiet(transformers) -> Iterator[None]:
    """No weight-loading progress bars or info lines from transformers; its settings are restored."""
    log = transformers.utils.logging
    bars, verbosity = log.is_progress_bar_enabled(), log.get_verbosity()
    log.disable_progress_bar()
    log.set_verbosity_error()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()
