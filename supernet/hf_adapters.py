"""What nestnas knows about each supported `transformers` architecture, as plain data: the sizes
an encoder's config gives (`EncoderDims`, read from ``config.to_dict()`` alone, so a checkpoint
rebuilds the supernet without the original model), and where each of the supernet's tensors sits
in that architecture's state dict (`hf_keys`). Nothing here imports `transformers`.

Every adapter describes the same shape of network: token (or patch) embeddings, L encoder layers
of multi-head attention and a two-layer FFN with LayerNorms (post-norm for BERT, RoBERTa and
DistilBERT, pre-norm with a final norm for ViT), then an optional dense layer with an activation
on the first token (BERT's pooler, RoBERTa's and DistilBERT's classification heads) and a
classifier. Adding an architecture of this shape is one entry in `ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from nestnas.errors import ConfigError

#: Every class `load_pretrained` and `elasticize` take, by `transformers` class name.
SUPPORTED_ARCHITECTURES = (
    "BertModel", "BertForSequenceClassification", "RobertaModel", "RobertaForSequenceClassification",
    "DistilBertModel", "DistilBertForSequenceClassification", "ViTModel", "ViTForImageClassification",
)
#: The bare encoder class of each model type (a config.json without `architectures`).
BARE_CLASS = {"bert": "BertModel", "roberta": "RobertaModel", "distilbert": "DistilBertModel", "vit": "ViTModel"}

# activation names of the configs -> (torch module name, kwargs); only those a static graph exports plainly
ACTIVATIONS = {"gelu": ("GELU", {}), "gelu_new": ("GELU", {"approximate": "tanh"}),
               "gelu_pytorch_tanh": ("GELU", {"approximate": "tanh"}), "relu": ("ReLU", {}), "tanh": ("Tanh", {}),
               "silu": ("SiLU", {}), "swish": ("SiLU", {})}


@dataclass(frozen=True)
class EncoderDims:
    """The sizes and wiring of one pretrained encoder (everything the supernet's modules need)."""

    model_type: str
    architecture: str
    hidden: int
    num_layers: int
    num_heads: int
    head_dim: int
    ffn: int
    act: str
    eps: float  # the layers' LayerNorm eps
    pre_norm: bool
    qkv_bias: bool = True
    # text
    vocab_size: int = 0
    positions: int = 0  # rows of the position table
    position_offset: int = 0  # RoBERTa: positions count from padding_idx + 1, padding keeps padding_idx
    type_vocab_size: int = 0  # 0: the model takes no token_type_ids
    pad_token_id: int = 0
    embed_eps: float = 1e-12
    # image
    image_size: int = 0
    patch_size: int = 0
    num_channels: int = 0
    final_norm: bool = False
    # head: an optional dense + activation on the first token, then the classifier
    head_dense: bool = False
    head_act: str = "tanh"
    trained_head: bool = False  # the classifier comes from the model (not a fresh one)
    initializer_range: float = 0.02
    # dropout while training (the static subnets run in eval mode and have none)
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float = 0.0

    @property
    def kind(self) -> str:
        return "image" if self.model_type == "vit" else "text"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2 if self.patch_size else 0

    @property
    def max_seq_len(self) -> int:
        """Longest input the position table serves (ViT: its patches and the class token)."""
        if self.kind == "image":
            return self.num_patches + 1
        return self.positions - self.position_offset

    def position_rows(self, seq_len: int) -> int:
        """Rows of the position table a subnet at `seq_len` can read."""
        return seq_len + self.position_offset


def _get(config: dict, key: str, default: Any = None, *, required: bool = True):
    if key in config and config[key] is not None:
        return config[key]
    if default is None and required:
        raise ConfigError(f"model config: field {key!r} is missing (model type {config.get('model_type')!r})")
    return default


def _p(config: dict, key: str, default: float = 0.0) -> float:
    value = config.get(key)
    return float(default if value is None else value)


def _check_act(name: Any, where: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(f"model config: {where} {name!r} is not supported; allowed: {sorted(ACTIVATIONS)}")
    return name


def _bert_like(config: dict, architecture: str, pooler: bool) -> EncoderDims:
    if _get(config, "position_embedding_type", "absolute", required=False) != "absolute":
        raise ConfigError(f"model config: position_embedding_type {config['position_embedding_type']!r} is not "
                          "supported; allowed: ['absolute']")
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise ConfigError("model config: a decoder (is_decoder / add_cross_attention) is not an encoder nestnas takes")
    hidden, heads = int(_get(config, "hidden_size")), int(_get(config, "num_attention_heads"))
    roberta = config.get("model_type") == "roberta"
    pad = int(_get(config, "pad_token_id", 1 if roberta else 0, required=False))
    classifier = architecture.endswith("ForSequenceClassification")
    return EncoderDims(
        model_type=config["model_type"], architecture=architecture, hidden=hidden,
        num_layers=int(_get(config, "num_hidden_layers")), num_heads=heads, head_dim=hidden // heads,
        ffn=int(_get(config, "intermediate_size")), act=_check_act(_get(config, "hidden_act"), "hidden_act"),
        eps=float(_get(config, "layer_norm_eps", 1e-12, required=False)), pre_norm=False,
        vocab_size=int(_get(config, "vocab_size")), positions=int(_get(config, "max_position_embeddings")),
        position_offset=pad + 1 if roberta else 0, type_vocab_size=int(_get(config, "type_vocab_size", 2,
                                                                                required=False)),
        pad_token_id=pad, embed_eps=float(_get(config, "layer_norm_eps", 1e-12, required=False)),
        head_dense=classifier or pooler, head_act="tanh", trained_head=classifier,
        initializer_range=float(_get(config, "initializer_range", 0.02, required=False)),
        hidden_dropout=_p(config, "hidden_dropout_prob"), attention_dropout=_p(config, "attention_probs_dropout_prob"),
        classifier_dropout=_p(config, "classifier_dropout", _p(config, "hidden_dropout_prob")),
    )


def _distilbert(config: dict, architecture: str, pooler: bool) -> EncoderDims:
    hidden, heads = int(_get(config, "dim")), int(_get(config, "n_heads"))
    classifier = architecture.endswith("ForSequenceClassification")
    return EncoderDims(
        model_type="distilbert", architecture=architecture, hidden=hidden, num_layers=int(_get(config, "n_layers")),
        num_heads=heads, head_dim=hidden // heads, ffn=int(_get(config, "hidden_dim")),
        act=_check_act(_get(config, "activation"), "activation"), eps=1e-12, pre_norm=False,
        vocab_size=int(_get(config, "vocab_size")), positions=int(_get(config, "max_position_embeddings")),
        type_vocab_size=0, pad_token_id=int(_get(config, "pad_token_id", 0, required=False)), embed_eps=1e-12,
        head_dense=classifier, head_act="relu", trained_head=classifier,
        initializer_range=float(_get(config, "initializer_range", 0.02, required=False)),
        hidden_dropout=_p(config, "dropout"), attention_dropout=_p(config, "attention_dropout"),
        classifier_dropout=_p(config, "seq_classif_dropout"),
    )


def _vit(config: dict, architecture: str, pooler: bool) -> EncoderDims:
    hidden, heads = int(_get(config, "hidden_size")), int(_get(config, "num_attention_heads"))
    image, patch = _get(config, "image_size"), _get(config, "patch_size")
    if isinstance(image, (list, tuple)) or isinstance(patch, (list, tuple)):
        if len(set(image if isinstance(image, (list, tuple)) else [image])) != 1 or \
                len(set(patch if isinstance(patch, (list, tuple)) else [patch])) != 1:
            raise ConfigError("model config: only square ViT images and patches are supported")
        image = image[0] if isinstance(image, (list, tuple)) else image
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    classifier = architecture.endswith("ForImageClassification")
    pooled = pooler and not classifier
    if pooled and int(_get(config, "pooler_output_size", hidden, required=False)) != hidden:
        raise ConfigError("model config: a ViT pooler_output_size other than hidden_size is not supported")
    return EncoderDims(
        model_type="vit", architecture=architecture, hidden=hidden, num_layers=int(_get(config, "num_hidden_layers")),
        num_heads=heads, head_dim=int(_get(config, "head_dim", hidden // heads, required=False)),
        ffn=int(_get(config, "intermediate_size")), act=_check_act(_get(config, "hidden_act"), "hidden_act"),
        eps=float(_get(config, "layer_norm_eps", 1e-12, required=False)), pre_norm=True,
        qkv_bias=bool(_get(config, "qkv_bias", True, required=False)), image_size=int(image), patch_size=int(patch),
        num_channels=int(_get(config, "num_channels", 3, required=False)), final_norm=True, head_dense=pooled,
        head_act=_check_act(_get(config, "pooler_act", "tanh", required=False), "pooler_act"),
        trained_head=classifier, initializer_range=float(_get(config, "initializer_range", 0.02, required=False)),
        hidden_dropout=_p(config, "hidden_dropout_prob"), attention_dropout=_p(config, "attention_probs_dropout_prob"),
    )


ADAPTERS: dict[str, Callable[[dict, str, bool], EncoderDims]] = {
    "bert": _bert_like, "roberta": _bert_like, "distilbert": _distilbert, "vit": _vit}


def check_architecture(architecture: Any) -> str:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"architecture {architecture!r} is not supported; supported: {list(SUPPORTED_ARCHITECTURES)}")
    return architecture


def describe(hf_config: dict, architecture: str, pooler: bool = True) -> EncoderDims:
    """The `EncoderDims` of a model of class `architecture` whose config is `hf_config`
    (``model.config.to_dict()``); `pooler`: whether a bare encoder has its pooling layer."""
    check_architecture(architecture)
    if not isinstance(hf_config, dict):
        raise ConfigError(f"model config must be a dict (config.to_dict()), got {type(hf_config).__name__}")
    model_type = hf_config.get("model_type")
    if model_type not in ADAPTERS or not architecture.startswith(BARE_CLASS[model_type][: -len("Model")]):
        raise ConfigError(f"model type {model_type!r} does not match architecture {architecture!r}")
    return ADAPTERS[model_type](hf_config, architecture, pooler)


def config_updates(dims: EncoderDims, depth: int, ffn: int) -> dict[str, int]:
    """Fields of the model's own config for a subnet of `depth` layers, all of FFN width `ffn`."""
    if dims.model_type == "distilbert":
        return {"n_layers": depth, "hidden_dim": ffn}
    return {"num_hidden_layers": depth, "intermediate_size": ffn}


def hf_keys(dims: EncoderDims, hf_state: set[str] | dict) -> dict[str, str]:
    """Supernet tensor name -> the model's state-dict key, layer by layer (``layers.{i}.``), for
    every tensor the model holds (a fresh classifier of a bare encoder has none). `hf_state` (the
    model's keys) picks the layout where `transformers` versions differ (ViT's layers)."""
    keys = set(hf_state)
    arch, t = dims.architecture, dims.model_type
    bare = arch == BARE_CLASS[t]
    p = "" if bare else {"bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert.", "vit": "vit."}[t]
    out: dict[str, str] = {}

    def linear(mine: str, theirs: str, bias: bool = True):
        out[f"{mine}.weight"] = f"{theirs}.weight"
        if bias:
            out[f"{mine}.bias"] = f"{theirs}.bias"

    if t == "vit":
        e = f"{p}embeddings."
        linear("embeddings.patch", f"{e}patch_embeddings.projection")
        out["embeddings.cls_token"], out["embeddings.position"] = f"{e}cls_token", f"{e}position_embeddings"
        new = f"{p}layers.0.attention.q_proj.weight" in keys  # transformers 5 names; 4.x: encoder.layer.N
        for i in range(dims.num_layers):
            if new:
                lay = f"{p}layers.{i}."
                names = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1",
                         "mlp.fc2")
            else:
                lay = f"{p}encoder.layer.{i}."
                names = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                         "attention.output.dense", "intermediate.dense", "output.dense")
            for mine, theirs in zip(("q", "k", "v", "o", "ffn_in", "ffn_out"), names):
                linear(f"layers.{i}.{mine}", f"{lay}{theirs}", bias=dims.qkv_bias or mine not in ("q", "k", "v"))
            linear(f"layers.{i}.norm1", f"{lay}layernorm_before")
            linear(f"layers.{i}.norm2", f"{lay}layernorm_after")
        linear("final_norm", f"{p}layernorm")
        if bare and dims.head_dense:
            linear("head.dense", "pooler.dense")
        if not bare:
            linear("head.out", "classifier")
        return out

    if t == "distilbert":
        e = f"{p}embeddings."
        out["embeddings.word.weight"] = f"{e}word_embeddings.weight"
        out["embeddings.position.weight"] = f"{e}position_embeddings.weight"
        linear("embeddings.norm", f"{e}LayerNorm")
        for i in range(dims.num_layers):
            lay = f"{p}transformer.layer.{i}."
            for mine, theirs in (("q", "q_lin"), ("k", "k_lin"), ("v", "v_lin"), ("o", "out_lin")):
                linear(f"layers.{i}.{mine}", f"{lay}attention.{theirs}")
            linear(f"layers.{i}.norm1", f"{lay}sa_layer_norm")
            linear(f"layers.{i}.ffn_in", f"{lay}ffn.lin1")
            linear(f"layers.{i}.ffn_out", f"{lay}ffn.lin2")
            linear(f"layers.{i}.norm2", f"{lay}output_layer_norm")
        if not bare:
            linear("head.dense", "pre_classifier")
            linear("head.out", "classifier")
        return out

    e = f"{p}embeddings."  # BERT and RoBERTa
    out["embeddings.word.weight"] = f"{e}word_embeddings.weight"
    out["embeddings.position.weight"] = f"{e}position_embeddings.weight"
    out["embeddings.token_type.weight"] = f"{e}token_type_embeddings.weight"
    linear("embeddings.norm", f"{e}LayerNorm")
    for i in range(dims.num_layers):
        lay = f"{p}encoder.layer.{i}."
        for mine, theirs in (("q", "attention.self.query"), ("k", "attention.self.key"),
                             ("v", "attention.self.value"), ("o", "attention.output.dense"),
                             ("norm1", "attention.output.LayerNorm"), ("ffn_in", "intermediate.dense"),
                             ("ffn_out", "output.dense"), ("norm2", "output.LayerNorm")):
            linear(f"layers.{i}.{mine}", f"{lay}{theirs}")
    if bare and dims.head_dense:
        linear("head.dense", "pooler.dense")
    elif arch == "BertForSequenceClassification":
        linear("head.dense", "bert.pooler.dense")
        linear("head.out", "classifier")
    elif arch == "RobertaForSequenceClassification":
        linear("head.dense", "classifier.dense")
        linear("head.out", "classifier.out_proj")
    return out
