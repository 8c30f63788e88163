"""Tiny randomly initialised `transformers` encoders for the tests (nothing is downloaded): every
supported architecture built from a small config, and a BERT model folder with a real tokenizer."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

HIDDEN, LAYERS, HEADS, FFN, VOCAB, POSITIONS = 32, 4, 4, 64, 100, 64
IMAGE, PATCH, CHANNELS = 16, 4, 3

# A WordPiece vocabulary: the special tokens BertTokenizerFast needs, then a few words.
WORDS = ["the", "a", "movie", "film", "was", "is", "good", "bad", "great", "awful", "very", "not", "i", "liked",
         "hated", "it", "plot", "acting", "fun", "boring", "##s", "##ing", "##ed", ".", ",", "!"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _text_kwargs(**extra):
    return {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "intermediate_size": FFN, "max_position_embeddings": POSITIONS, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, **extra}


def build(architecture: str, seed: int = 0, num_labels: int = 3, **overrides):
    """A tiny random model of `architecture` (a `transformers` class name), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    if architecture.startswith("Bert"):
        config = transformers.BertConfig(**_text_kwargs(type_vocab_size=2), num_labels=num_labels, **overrides)
    elif architecture.startswith("Roberta"):
        # RoBERTa's positions start after the padding index: 2 of the table's rows are never used
        config = transformers.RobertaConfig(**_text_kwargs(type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                                                           eos_token_id=2, max_position_embeddings=POSITIONS + 2),
                                            num_labels=num_labels, **overrides)
    elif architecture.startswith("DistilBert"):
        config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                                               hidden_dim=FFN, max_position_embeddings=POSITIONS, dropout=0.0,
                                               attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=num_labels,
                                               **overrides)
    elif architecture.startswith("ViT"):
        config = transformers.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        intermediate_size=FFN, image_size=IMAGE, patch_size=PATCH,
                                        num_channels=CHANNELS, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, num_labels=num_labels, **overrides)
    else:
        raise ValueError(architecture)
    model = getattr(transformers, architecture)(config)
    _randomise_norms(model)
    return model.eval()


def _randomise_norms(model) -> None:
    # fresh LayerNorms are weight 1, bias 0: random ones make permutation mistakes visible
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)


def text_inputs(batch: int = 4, length: int = 16, seed: int = 0, vocab: int = VOCAB, pad_id: int = 0,
                special: int = 5, type_vocab: int = 2) -> dict[str, torch.Tensor]:
    """Real-looking inputs: ids that avoid the padding id, a mask with padded tails of varied
    length (the first row unpadded), token types 0 then 1 (all 0 where `type_vocab` is 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(special, vocab, (batch, length), generator=g)
    lengths = [length] + [int(v) for v in torch.randint(2, length, (batch - 1,), generator=g)]
    mask = torch.zeros(batch, length, dtype=torch.long)
    types = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = pad_id
        types[i, n // 2 : n] = 1 if type_vocab > 1 else 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def image_inputs(batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, CHANNELS, IMAGE, IMAGE, generator=g)}


def write_bert_folder(folder: str | Path, architecture: str = "BertForSequenceClassification", seed: int = 0,
                      num_labels: int = 2) -> Path:
    """A local model folder as `save_pretrained` writes it, with a real WordPiece tokenizer."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + WORDS
    vocab += [f"[unused{i}]" for i in range(VOCAB - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 names the argument `vocab` (a path or a dict), 4.x `vocab_file`
    params = inspect.signature(BertTokenizerFast.__init__).parameters
    key = "vocab_file" if "vocab_file" in params else "vocab"
    BertTokenizerFast(**{key: str(folder / "vocab.txt")}, do_lower_case=True).save_pretrained(folder)
    build(architecture, seed=seed, num_labels=num_labels).save_pretrained(folder)
    return folder


def inputs_for(model, batch: int = 4, length: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs in `model`'s own keywords (padding id and token types as its config has them)."""
    config = model.config
    if config.model_type == "vit":
        return image_inputs(batch, seed)
    x = text_inputs(batch, length, seed, pad_id=config.pad_token_id, type_vocab=getattr(config, "type_vocab_size", 1))
    if config.model_type == "distilbert":
        del x["token_type_ids"]
    return x
