"""Data: one place that turns a data spec (or torch datasets) into train/validation datasets and
loaders, with the per-sample shape, the number of classes and a fingerprint of the data.

Spec grammar: ``SOURCE[:OPTION=VALUE[,OPTION=VALUE...]]`` where SOURCE is

- ``digits``: scikit-learn's embedded digits (8x8 grey images, 10 classes; nothing downloaded);
- a folder with one sub-folder per class, each holding images (Pillow; grey or RGB detected,
  resized to the family's base resolution, pixels scaled to [-1, 1]);
- ``FILE.npz`` with ``x_train, y_train, x_val, y_val``, or ``x, y`` (split stratified);
- ``FILE.csv``: a table with a header row; the ``label`` column (option ``label=NAME``) holds the
  classes, every other column is a numeric feature;
- ``package.module:function``: a function that returns ``(train_dataset, val_dataset)``;
- text: ``FILE.csv:text=COLUMN[,text2=COLUMN],label=COLUMN`` or ``FILE.jsonl`` (one JSON object
  per line; columns default to ``text`` and ``label``), tokenised with a pretrained model's own
  tokenizer (``tokenizer=DIR``, a model folder; ``load_data(..., model=DIR)`` fills it in; nothing
  is downloaded). Each sample is one int64 tensor of shape (3, L): input ids, attention mask and
  token type ids (zeros where the tokenizer has none), padded or truncated to ``max_length=L``
  (default min(128, the model's position embeddings)). Labels are the sorted distinct values of
  the label column (numbers sorted as numbers), or the model's own ``label2id`` order when its
  label names are exactly the data's; `Data.classes` names them. ``encoding=NAME`` reads a file
  that is not UTF-8 (e.g. ``encoding=mac_roman``).

Options: ``val=F`` (validation share of a stratified split, default 0.2), ``label=NAME`` (CSV),
``shape=AxB...`` (reshape each sample of an ``.npz`` or CSV, e.g. ``shape=1x8x8`` for images).
Labels are integers 0..K-1. Samples keep a per-sample shape ((C, H, W) images, (F,) tables, (T, D)
tokens, (3, L) packed text); the supernet family adapts to it (`Supernet.spec_for_data`).
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from nestnas.errors import ConfigError, DataError

FAMILIES = ("cnn", "transformer")
DEFAULT_VAL = 0.2
KINDS = ("digits", "images", "npz", "csv", "entry", "text")
_TEXT_OPTIONS = ("val", "text", "text2", "label", "max_length", "tokenizer", "encoding")
_OPTIONS = {"digits": ("val",), "images": ("val",), "npz": ("val", "shape"), "csv": ("val", "shape", "label"),
            "entry": (), "text": _TEXT_OPTIONS}
_ENTRY = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_]\w*")
_OPTION_PART = re.compile(r"[a-z_][a-z0-9_]*=[^,=:]*(,[a-z_][a-z0-9_]*=[^,=:]*)*")
EXPECTED = ("digits, a folder of class sub-folders, FILE.npz, FILE.csv[:label=COLUMN], text as "
            "FILE.csv:text=COLUMN,label=COLUMN or FILE.jsonl, or package.module:function")
# Files of which a saved tokenizer has at least one (fast, WordPiece, BPE, SentencePiece).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json", "spiece.model",
                    "sentencepiece.bpe.model", "merges.txt")
#: The inputs a packed text sample (3, L) stacks along its first dimension, in order.
PACKED_TEXT = ("input_ids", "attention_mask", "token_type_ids")
#: Padded length of text samples when the spec gives no max_length (capped by the model's positions).
DEFAULT_MAX_LENGTH = 128
# Families whose position table holds pad_token_id + 1 slots before the first position.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "xlm-roberta-xl")


# --- the embedded default -------------------------------------------------------------------

def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    return x, digits.target.astype(np.int64)


def digits_datasets(family: str, seed: int = 0, val_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """Stratified train/validation split of digits, pixels scaled to [-1, 1], in the shape the
    built-in families took before data became family-blind ((1, 8, 8) images for the CNN, 8
    tokens of 8 pixels for the encoder). `load_data("digits")` gives the same split as images."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown supernet family {family!r}; allowed: {list(FAMILIES)}")
    from sklearn.model_selection import train_test_split

    x, y = _digits_arrays()
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val_fraction, stratify=y, random_state=seed)
    shape = (-1, 1, 8, 8) if family == "cnn" else (-1, 8, 8)
    return (TensorDataset(torch.from_numpy(x_tr).reshape(shape), torch.from_numpy(y_tr)),
            TensorDataset(torch.from_numpy(x_va).reshape(shape), torch.from_numpy(y_va)))


def digits_loaders(family: str, batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader and ordered validation loader over `digits_datasets`."""
    train, val = digits_datasets(family, seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True),
            DataLoader(val, batch_size=256, shuffle=False))


# --- specs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: its `kind` (one of KINDS), `source` (path, entry point or "digits")
    and `options`. `str(spec)` is the canonical text (file paths made absolute)."""

    kind: str
    source: str
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""  # as the user gave it, for messages

    def __str__(self) -> str:
        source = self.source if self.kind in ("digits", "entry") else str(Path(self.source).resolve())
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{source}:{opts}" if opts else source


def parse_spec(text: str | os.PathLike) -> DataSpec:
    """Parse a data spec (see the module doc); `DataError` names the spec and what is allowed."""
    given = os.fspath(text)
    if not isinstance(given, str) or not given.strip():
        raise DataError(f"data spec {given!r} is empty; expected {EXPECTED}")
    source, options = given, {}
    head, sep, tail = given.rpartition(":")
    if sep and _OPTION_PART.fullmatch(tail):
        source = head
        for item in tail.split(","):
            key, _, value = item.partition("=")
            if key in options:
                raise DataError(f"data spec {given!r}: option {key} given twice")
            options[key] = value
    if source == "digits":
        kind = "digits"
    elif source.lower().endswith(".npz"):
        kind = "npz"
    elif source.lower().endswith(".jsonl") or (source.lower().endswith(".csv") and "text" in options):
        kind = "text"
    elif source.lower().endswith(".csv"):
        kind = "csv"
    elif _ENTRY.fullmatch(source) and not _is(Path.exists, source):
        kind = "entry"
    elif _is(Path.is_dir, source):
        kind = "images"
    else:
        raise DataError(f"data spec {given!r} is not a known kind of data (no such folder, not .npz, .csv or "
                        f".jsonl, not module:function); expected {EXPECTED}")
    unknown = [k for k in options if k not in _OPTIONS[kind]]
    if kind == "csv" and unknown and all(k in _TEXT_OPTIONS for k in unknown):
        raise DataError(f"data spec {given!r}: option {unknown[0]!r} is for text data; name the text column with "
                        "text=COLUMN to read the CSV as text")
    if unknown:
        raise DataError(f"data spec {given!r}: unknown option {unknown[0]!r} for {kind} data; allowed: "
                        f"{list(_OPTIONS[kind]) or 'none'}")
    spec = DataSpec(kind, source, options, given)
    _val_fraction(spec)  # checked before any reading
    _shape_option(spec)
    _max_length_option(spec)
    return spec


def _is(test, source: str) -> bool:
    """`test(Path(source))`, False for names no file can have (NUL bytes, too long)."""
    try:
        return test(Path(source))
    except (OSError, ValueError):
        return False


def _val_fraction(spec: DataSpec) -> float:
    text = spec.options.get("val")
    if text is None:
        return DEFAULT_VAL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise DataError(f"data spec {spec.text!r}: val={text!r}; expected a share between 0 and 1 such as 0.2")
    return value


def _shape_option(spec: DataSpec) -> tuple[int, ...] | None:
    text = spec.options.get("shape")
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise DataError(f"data spec {spec.text!r}: shape={text!r}; expected positive sizes joined by x such as 1x8x8")
    return shape


def _max_length_option(spec: DataSpec) -> int | None:
    text = spec.options.get("max_length")
    if text is None:
        return None
    if not text.isdigit() or int(text) < 2:
        raise DataError(f"data spec {spec.text!r}: max_length={text!r}; expected a whole number of tokens of at "
                        "least 2 such as 128")
    return int(text)


# --- the loaded data ----------------------------------------------------------------------------

@dataclass(eq=False)
class Data:
    """Train and validation datasets of (sample, label) pairs with their facts: the per-sample
    `sample_shape`, `num_classes` (labels are 0..K-1), a sha256 `fingerprint` and the `spec`
    they came from (None for datasets given in Python). `loaders()` makes the loaders."""

    train: Dataset
    val: Dataset
    sample_shape: tuple[int, ...]
    num_classes: int
    fingerprint: str
    spec: str | None = None
    seed: int = 0
    classes: tuple[str, ...] | None = None
    given_loaders: tuple[DataLoader, DataLoader] | None = None  # loaders passed in, used as they are

    @property
    def name(self) -> str:
        return f"data {self.spec}" if self.spec else "the data given"

    def loaders(self, batch_size: int = 64, val_batch_size: int = 256) -> tuple[DataLoader, DataLoader]:
        """Shuffled training loader (incomplete last batch dropped when there is more than one
        batch) and ordered validation loader; loaders given to `load_data` come back as they are."""
        if self.given_loaders is not None:
            return self.given_loaders
        return (DataLoader(self.train, batch_size=batch_size, shuffle=True, drop_last=len(self.train) > batch_size),
                DataLoader(self.val, batch_size=val_batch_size, shuffle=False))

    def spec_for(self, space) -> dict[str, Any]:
        """Constructor arguments of `space`'s family for this data (`Supernet.spec_for_data`)."""
        from nestnas.supernet.base import SUPERNETS

        if space.family not in SUPERNETS:
            raise ConfigError(f"no supernet registered for family {space.family!r}; allowed: {sorted(SUPERNETS)}")
        try:
            return SUPERNETS[space.family].spec_for_data(space, self.sample_shape, self.num_classes)
        except DataError as exc:
            raise DataError(f"{self.name}: {exc}") from None

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data it was trained on."""
        return {"spec": self.spec, "seed": self.seed, "sample_shape": list(self.sample_shape),
                "num_classes": self.num_classes, "fingerprint": self.fingerprint,
                "classes": list(self.classes) if self.classes is not None else None}

    def check_fits(self, net, where: str = "the supernet", record: dict | None = None) -> None:
        """Refuse (`DataError`) data whose sample shape or class count does not fit `net`: the
        spec the family asks for this data must agree with `net.spec()` on every field it sets
        (a family whose model comes from elsewhere, like hf-encoder, sets only some)."""
        try:
            wanted = type(net).spec_for_data(net.space, self.sample_shape, self.num_classes)
        except DataError as exc:
            wanted = {"error": str(exc)}
        have = net.spec()
        if any(k not in have or have[k] != v for k, v in wanted.items()):
            trained = (f"{tuple(record['sample_shape'])} and {record['num_classes']} classes" if record
                       else f"{tuple(net.sample_shape())} and the classes of its spec {net.spec()}")
            raise DataError(f"{self.name} has samples of shape {self.sample_shape} and {self.num_classes} classes; "
                            f"{where} takes samples of shape {trained}")


def load_data(data: Any = "digits", space=None, *, seed: int = 0, val_fraction: float | None = None,
              model: str | os.PathLike | None = None, max_length: int | None = None) -> Data:
    """Data from a spec (str or path, see the module doc), a `(train, val)` pair of torch
    datasets or loaders, or one dataset (split stratified, `val_fraction` default 0.2). `space`
    gives the family's image size for image folders; `seed` the split. For text data, `model`
    is the pretrained model folder whose tokenizer (and position limit) is used and `max_length`
    the padded length, where the spec names neither."""
    if isinstance(data, (str, os.PathLike)):
        spec = parse_spec(data)
        if val_fraction is not None and "val" in _OPTIONS[spec.kind] and "val" not in spec.options:
            spec = DataSpec(spec.kind, spec.source, {**spec.options, "val": repr(val_fraction)}, spec.text)
        if spec.kind == "text":
            spec = _with_text_options(spec, model, max_length)
        return _LOADERS[spec.kind](spec, space, seed)
    if isinstance(data, DataLoader):
        raise DataError("a single DataLoader cannot be split; give a (train, validation) pair of loaders "
                        "or a Dataset")
    if isinstance(data, Dataset):
        x, y = _stack(data, "the dataset given")
        x_tr, y_tr, x_va, y_va = _split(x, y, DEFAULT_VAL if val_fraction is None else val_fraction, seed,
                                        "the dataset given")
        return _from_arrays(x_tr, y_tr, x_va, y_va, None, seed)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        if all(isinstance(d, DataLoader) for d in data):
            facts = _describe(data[0].dataset, data[1].dataset, "the loaders given")
            return Data(data[0].dataset, data[1].dataset, *facts, spec=None, seed=seed,
                        given_loaders=(data[0], data[1]))
        if all(isinstance(d, Dataset) for d in data):
            return Data(data[0], data[1], *_describe(data[0], data[1], "the datasets given"), spec=None, seed=seed)
    raise DataError(f"data {type(data).__name__}: expected a spec ({EXPECTED}), a torch Dataset, or a "
                    "(train, validation) pair of Datasets or DataLoaders")


# --- checks shared by every kind -------------------------------------------------------------------

def _check_labels(y_train: np.ndarray, y_val: np.ndarray, where: str) -> int:
    """K, when the training labels are exactly the integers 0..K-1 and validation's among them."""
    for y in (y_train, y_val):
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            raise DataError(f"{where}: labels must be integers 0..K-1, one per sample; got {y.dtype} of shape "
                            f"{y.shape}")
    if y_train.size == 0 or y_val.size == 0:
        raise DataError(f"{where}: expected samples in both the training and the validation split; got "
                        f"{y_train.size} and {y_val.size}")
    present = np.unique(y_train)
    k = int(present[-1]) + 1
    if len(present) == 1:
        raise DataError(f"{where}: every training sample has label {_short(present)}: a classifier needs at least "
                        "two classes (is the file sorted by label, and cut short?)")
    if present[0] < 0 or len(present) != k or len(present) < 2:
        raise DataError(f"{where}: labels must be the integers 0..K-1 (K >= 2), each present in training; got "
                        f"{_short(present)}")
    if y_val.min() < 0 or y_val.max() >= k:
        raise DataError(f"{where}: validation labels must be among the training classes 0..{k - 1}; got "
                        f"{_short(np.unique(y_val))}")
    return k


def _short(values: np.ndarray) -> str:
    items = [str(v) for v in values[:8]]
    return "[" + ", ".join(items) + (", ..." if len(values) > 8 else "") + "]"


def _hash_arrays(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _from_arrays(x_tr, y_tr, x_va, y_va, spec: DataSpec | None, seed: int, classes=None,
                 fingerprint: str | None = None) -> Data:
    where = f"data {spec.text!r}" if spec else "the data given"
    k = _check_labels(y_tr, y_va, where)
    if x_tr.shape[1:] != x_va.shape[1:] or len(x_tr) != len(y_tr) or len(x_va) != len(y_va):
        raise DataError(f"{where}: expected one label per sample and samples of one shape; got x_train "
                        f"{x_tr.shape}, y_train {y_tr.shape}, x_val {x_va.shape}, y_val {y_va.shape}")
    if not np.issubdtype(x_tr.dtype, np.number) or x_tr.ndim < 2:
        raise DataError(f"{where}: samples must be numeric arrays; got {x_tr.dtype} of shape {x_tr.shape}")
    x_tr, x_va = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (x_tr, x_va))
    y_tr, y_va = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in (y_tr, y_va))
    if not (torch.isfinite(x_tr).all() and torch.isfinite(x_va).all()):
        raise DataError(f"{where}: samples must be finite numbers (NaN or infinity found)")
    fingerprint = fingerprint or _hash_arrays(*(t.numpy() for t in (x_tr, y_tr, x_va, y_va)))
    return Data(TensorDataset(x_tr, y_tr), TensorDataset(x_va, y_va), tuple(x_tr.shape[1:]), k, fingerprint,
                spec=str(spec) if spec else None, seed=seed, classes=classes)


def _split(x: np.ndarray, y: np.ndarray, val: float, seed: int, where: str):
    from sklearn.model_selection import train_test_split

    try:
        x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val, stratify=y, random_state=seed)
    except ValueError as exc:
        raise DataError(f"{where}: cannot split {len(y)} samples stratified with val={val}: "
                        f"{str(exc).splitlines()[0]}") from None
    return x_tr, y_tr, x_va, y_va


def _reshape(x: np.ndarray, spec: DataSpec) -> np.ndarray:
    shape = _shape_option(spec)
    if shape is None:
        return x
    if math.prod(shape) != math.prod(x.shape[1:]):
        raise DataError(f"data {spec.text!r}: shape={spec.options['shape']} holds {math.prod(shape)} values; "
                        f"each sample has {math.prod(x.shape[1:])} (shape {x.shape[1:]})")
    return x.reshape((len(x), *shape))


# --- the kinds ----------------------------------------------------------------------------------------

def _load_digits(spec: DataSpec, space, seed: int) -> Data:
    x, y = _digits_arrays()
    x_tr, y_tr, x_va, y_va = _split(x, y, _val_fraction(spec), seed, "data 'digits'")
    return _from_arrays(x_tr.reshape(-1, 1, 8, 8), y_tr, x_va.reshape(-1, 1, 8, 8), y_va, spec, seed)


def _load_npz(spec: DataSpec, space, seed: int) -> Data:
    where = f"data {spec.text!r}"
    path = Path(spec.source)
    if not _is(Path.is_file, spec.source):
        raise DataError(f"{where}: no such file {path}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            names = set(arrays.files)
            if {"x_train", "y_train", "x_val", "y_val"} <= names:
                x_tr, y_tr, x_va, y_va = (arrays[n] for n in ("x_train", "y_train", "x_val", "y_val"))
                if "val" in spec.options:
                    raise DataError(f"{where}: val= applies to x, y arrays; this file has its own validation split")
            elif {"x", "y"} <= names:
                x, y = arrays["x"], arrays["y"]
                if len(x) != len(y):
                    raise DataError(f"{where}: expected one label per sample; x has {len(x)} rows, y {len(y)}")
                x_tr, y_tr, x_va, y_va = _split(x, y, _val_fraction(spec), seed, where)
            else:
                raise DataError(f"{where}: expected arrays x_train, y_train, x_val, y_val (or x, y); the file has "
                                f"{sorted(names) or 'none'}")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 -- zip, pickle and format errors of a foreign or damaged file
        raise DataError(f"{where}: not a readable .npz of plain arrays ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return _from_arrays(_reshape(x_tr, spec), y_tr, _reshape(x_va, spec), y_va, spec, seed)


def _load_csv(spec: DataSpec, space, seed: int) -> Data:
    where = f"data {spec.text!r}"
    path = Path(spec.source)
    label = spec.options.get("label", "label")
    if not _is(Path.is_file, spec.source):
        raise DataError(f"{where}: no such file {path}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{where}: not a UTF-8 CSV table ({type(exc).__name__})") from None
    if not rows:
        raise DataError(f"{where}: the file is empty; expected a header row naming the columns")
    header = [h.strip() for h in rows[0]]
    if label not in header:
        raise DataError(f"{where}: no label column {label!r} (give label=COLUMN); the columns are {header[:12]}")
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    col = header.index(label)
    labels, features = [], []
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{where}: line {line} has {len(row)} fields; the header has {len(header)}")
        try:
            labels.append(int(row[col]))
        except ValueError:
            raise DataError(f"{where}: line {line}: label {row[col]!r} in column {label!r}; labels must be integers "
                            "0..K-1") from None
        try:
            features.append([float(v) for i, v in enumerate(row) if i != col])
        except ValueError:
            raise DataError(f"{where}: line {line}: every column but {label!r} must be a number") from None
    if len(header) < 2 or not body:
        raise DataError(f"{where}: expected feature columns besides {label!r} and at least one data row")
    x, y = np.asarray(features, dtype=np.float32), np.asarray(labels, dtype=np.int64)
    x_tr, y_tr, x_va, y_va = _split(x, y, _val_fraction(spec), seed, where)
    return _from_arrays(_reshape(x_tr, spec), y_tr, _reshape(x_va, spec), y_va, spec, seed)


def _load_images(spec: DataSpec, space, seed: int) -> Data:
    from PIL import Image, UnidentifiedImageError

    where = f"data {spec.text!r}"
    root = Path(spec.source)
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if not class_dirs:
        raise DataError(f"{where}: expected one sub-folder per class holding its images; {root} has none")
    files: list[tuple[Path, int]] = []
    for k, d in enumerate(class_dirs):
        found = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
        if not found:
            raise DataError(f"{where}: class folder {d.name!r} holds no images")
        files += [(p, k) for p in found]
    size = None
    if space is not None:
        from nestnas.supernet.base import SUPERNETS

        if space.family in SUPERNETS:
            size = SUPERNETS[space.family].image_size(space)
    images, rgb = [], False
    for path, _ in files:
        try:
            with Image.open(path) as img:
                img.load()
                img = img.convert("L" if _is_grey(img) else "RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{where}: {path.relative_to(root)} is not a readable image "
                            f"({type(exc).__name__})") from None
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        rgb |= img.mode == "RGB"
        images.append(img)
    if size is None and len({img.size for img in images}) > 1:
        raise DataError(f"{where}: images of several sizes {sorted({img.size for img in images})[:4]} and no "
                        "family image size to resize them to; give images of one size")
    x = np.stack([_pixels(img, rgb) for img in images])
    y = np.asarray([k for _, k in files], dtype=np.int64)
    digest = hashlib.sha256()
    for path, _ in files:  # the file list and sizes (the pixels' resize depends on the family)
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\n".encode())
    x_tr, y_tr, x_va, y_va = _split(x, y, _val_fraction(spec), seed, where)
    return _from_arrays(x_tr, y_tr, x_va, y_va, spec, seed, classes=tuple(d.name for d in class_dirs),
                        fingerprint=digest.hexdigest())


def _is_grey(img) -> bool:
    """Grey modes, and palette images whose colours are all grey."""
    if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    if img.mode != "P":
        return False
    r, g, b = img.convert("RGB").split()
    return r.tobytes() == g.tobytes() == b.tobytes()


def _pixels(img, rgb: bool) -> np.ndarray:
    """(C, H, W) float32 in [-1, 1]; grey images join an RGB set as three equal channels."""
    a = np.asarray(img.convert("RGB") if rgb else img, dtype=np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return (a - 0.5) / 0.5


def _load_entry(spec: DataSpec, space, seed: int) -> Data:
    where = f"data {spec.text!r}"
    module_name, _, attr = spec.source.partition(":")
    here = os.getcwd()
    sys.path.insert(0, here)  # a module beside the user's files, as `python -m` finds it
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 -- the user's module may fail in any way while importing
        raise DataError(f"{where}: cannot import {module_name} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    finally:
        sys.path.remove(here)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DataError(f"{where}: {module_name} has no function {attr}")
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 -- the user's function may fail in any way
        raise DataError(f"{where}: {spec.source}() raised {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(d, Dataset) for d in result)):
        raise DataError(f"{where}: {spec.source}() must return (train_dataset, val_dataset), two torch Datasets; "
                        f"it returned {type(result).__name__}")
    return Data(result[0], result[1], *_describe(result[0], result[1], where), spec=str(spec), seed=seed)


# --- text ----------------------------------------------------------------------------------------------

def _with_text_options(spec: DataSpec, model, max_length: int | None) -> DataSpec:
    """`spec` with the model folder (absolute, so the recorded spec reads the same tokenizer
    again) and max_length filled in where it names none."""
    options = dict(spec.options)
    if model is not None:
        folder = str(Path(model).resolve())
        if "tokenizer" in options and Path(options["tokenizer"]).resolve() != Path(folder):
            raise DataError(f"data spec {spec.text!r} names tokenizer={options['tokenizer']}, but the model is "
                            f"{model}; give one of them")
        if re.search(r"[,=:]", folder):
            raise DataError(f"model folder {folder}: a data spec cannot name a path holding ',', '=' or ':'; "
                            "move the model to a plainer path")
        options["tokenizer"] = folder
    elif "tokenizer" in options:
        options["tokenizer"] = str(Path(options["tokenizer"]).resolve())
    if max_length is not None:
        if "max_length" in options and int(options["max_length"]) != max_length:
            raise DataError(f"data spec {spec.text!r} gives max_length={options['max_length']}, and max_length "
                            f"{max_length} was asked; give one of them")
        options["max_length"] = str(int(max_length))
    out = DataSpec(spec.kind, spec.source, options, spec.text)
    _max_length_option(out)
    return out


def _read_text_file(spec: DataSpec, where: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of a CSV with a header row or of a JSON-lines file."""
    path = Path(spec.source)
    if not _is(Path.is_file, spec.source):
        raise DataError(f"{where}: no such file {path}")
    encoding = spec.options.get("encoding", "utf-8")
    data = path.read_bytes()
    try:
        raw = data.decode(encoding)
    except LookupError:
        raise DataError(f"{where}: unknown encoding={encoding!r}; give a Python codec name such as utf-8, "
                        "latin-1 or mac_roman") from None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{where}: line {line} is not {encoding} (byte 0x{data[exc.start]:02x}); give the "
                        "file's encoding, e.g. encoding=latin-1 or encoding=mac_roman") from None
    if not raw.strip():
        raise DataError(f"{where}: the file is empty; expected "
                        + ("a header row naming the columns and one row per sample" if spec.source.lower().endswith(
                            ".csv") else "one JSON object per line"))
    if spec.source.lower().endswith(".csv"):
        try:
            table = list(csv.reader(io.StringIO(raw, newline="")))
        except csv.Error as exc:
            raise DataError(f"{where}: not a CSV table ({exc})") from None
        columns = [h.strip() for h in table[0]]
        rows = []
        for line, row in enumerate(table[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(columns):
                raise DataError(f"{where}: line {line} has {len(row)} fields; the header has {len(columns)}")
            rows.append(dict(zip(columns, row)))
        return columns, rows
    columns, rows = [], []
    for line, text in enumerate(raw.splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: line {line} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: line {line} is a JSON {type(row).__name__}; expected one object per line")
        columns += [k for k in row if k not in columns]
        rows.append(row)
    return columns, rows


def _load_tokenizer(folder: str, where: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(f"{where}: text data is tokenised with transformers, which is not installed; install the "
                          "hf extra: pip install 'nestnas[hf]'") from None
    if not _is(Path.is_dir, folder):
        raise DataError(f"{where}: tokenizer folder {folder} does not exist")
    hint = "save the model's tokenizer there with tokenizer.save_pretrained(folder)"
    # transformers 5 builds a tokenizer of special tokens alone from a folder without one: look first
    if not any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES):
        raise DataError(f"{where}: no usable tokenizer in {folder} (none of {', '.join(_TOKENIZER_FILES[:3])}...); "
                        f"{hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 -- transformers raises OSError, ValueError, KeyError... for a bad folder
        first = (str(exc).splitlines() or [""])[0][:160]
        raise DataError(f"{where}: no usable tokenizer in {folder} ({type(exc).__name__}: {first}); {hint}") from None
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise DataError(f"{where}: no usable tokenizer in {folder} (its vocabulary holds special tokens only); {hint}")
    return tokenizer


def _model_facts(folder: str) -> tuple[int | None, int | None, dict[str, int] | None]:
    """(positions the model can embed, labels of its classification head, its label2id) from
    the folder's config.json; None where the folder does not say."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None, None
    if not isinstance(config, dict):
        return None, None, None
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and config.get("model_type") in _OFFSET_POSITIONS:
        positions -= int(config.get("pad_token_id") or 0) + 1
    positions = positions if isinstance(positions, int) and positions > 0 else None
    heads = [a for a in config.get("architectures") or [] if isinstance(a, str) and a.endswith(
        "ForSequenceClassification")]
    label2id = config.get("label2id") if isinstance(config.get("label2id"), dict) else None
    num_labels = None
    if heads:
        id2label = config.get("id2label")
        num_labels = len(id2label) if isinstance(id2label, dict) and id2label else int(config.get("num_labels", 2))
    return positions, num_labels, label2id


def _text_classes(values: list[str], label2id: dict[str, int] | None) -> tuple[str, ...]:
    """Class names in label order: the model's own label2id order when its names are exactly
    the data's, else sorted (as numbers when every label is an integer)."""
    present = set(values)
    if label2id and set(label2id) == present and sorted(label2id.values()) == list(range(len(present))):
        return tuple(sorted(present, key=lambda name: label2id[name]))
    try:
        return tuple(sorted(present, key=lambda v: (int(v), v)))
    except ValueError:
        return tuple(sorted(present))


def _label_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, str)):
        return str(value).strip()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


def _text_columns(spec: DataSpec, columns: list[str], where: str) -> tuple[str, str | None, str]:
    text, text2 = spec.options.get("text", "text"), spec.options.get("text2")
    label = spec.options.get("label", "label")
    missing = [f"{column!r} ({option}={column})" for option, column in (("text", text), ("text2", text2),
                                                                        ("label", label))
               if column is not None and column not in columns]
    if missing:
        raise DataError(f"{where}: no column {', '.join(missing)}; the columns are {columns[:12]} (name them "
                        "with text=, text2= and label=)")
    return text, text2, label


def _load_text(spec: DataSpec, space, seed: int) -> Data:
    where = f"data {spec.text!r}"
    folder = spec.options.get("tokenizer")
    if folder is None:
        raise DataError(f"{where}: text data is tokenised with the model's own tokenizer; give the model folder "
                        "(--model DIR, load_data(..., model=DIR) or tokenizer=DIR)")
    columns, rows = _read_text_file(spec, where)
    text_col, text2_col, label_col = _text_columns(spec, columns, where)
    if not rows:
        raise DataError(f"{where}: the file has no data rows, only its header")
    texts, pairs, labels = [], [], []
    for i, row in enumerate(rows):
        line = i + 2 if spec.source.lower().endswith(".csv") else i + 1
        for col, out in ((text_col, texts), (text2_col, pairs)):
            if col is None:
                continue
            value = row.get(col)
            if not isinstance(value, str):
                raise DataError(f"{where}: row {line}: column {col!r} holds {type(value).__name__} {value!r}; "
                                "expected text")
            out.append(value)
        label = _label_text(row.get(label_col))
        if not label:
            raise DataError(f"{where}: row {line}: label {row.get(label_col)!r} in column {label_col!r}; expected "
                            "a class name or integer")
        labels.append(label)
    positions, head_labels, label2id = _model_facts(folder)
    max_length = _max_length_option(spec)
    if positions is not None and max_length is not None and max_length > positions:
        raise DataError(f"{where}: max_length={max_length} is beyond the model's {positions} position embeddings "
                        f"({folder}/config.json); give max_length={positions} or less")
    max_length = max_length or min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    classes = _text_classes(labels, label2id)
    if head_labels is not None and head_labels != len(classes):
        raise DataError(f"{where}: {len(classes)} classes {_short(np.asarray(classes))} in column {label_col!r}, but "
                        f"the model's classification head has {head_labels} labels (num_labels in {folder}/"
                        "config.json); give data with that many classes or a model without the head")
    tokenizer = _load_tokenizer(folder, where)
    x = tokenize_texts(tokenizer, texts, pairs or None, max_length)
    index = {name: k for k, name in enumerate(classes)}
    y = np.asarray([index[v] for v in labels], dtype=np.int64)
    x_tr, y_tr, x_va, y_va = _split(x, y, _val_fraction(spec), seed, where)
    k = _check_labels(y_tr, y_va, where)
    fingerprint = _hash_arrays(x_tr, y_tr, x_va, y_va, np.frombuffer("\0".join(classes).encode(), np.uint8))
    return Data(TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
                TensorDataset(torch.from_numpy(x_va), torch.from_numpy(y_va)), tuple(x.shape[1:]), k, fingerprint,
                spec=str(spec), seed=seed, classes=classes)


def tokenize_texts(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int) -> np.ndarray:
    """Texts (and second texts of sentence pairs) as one int64 array (N, 3, max_length): input
    ids, attention mask, token type ids (zeros where the tokenizer makes none), padded and
    truncated to `max_length` by `tokenizer` itself."""
    encoded = tokenizer(texts, pairs, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="np")
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    mask = np.asarray(encoded.get("attention_mask", np.ones_like(ids)), dtype=np.int64)
    types = np.asarray(encoded.get("token_type_ids", np.zeros_like(ids)), dtype=np.int64)
    return np.ascontiguousarray(np.stack([ids, mask, types], axis=1))


_LOADERS = {"digits": _load_digits, "npz": _load_npz, "csv": _load_csv, "images": _load_images,
            "entry": _load_entry, "text": _load_text}


# --- datasets given as objects -------------------------------------------------------------------------

def _stack(dataset: Dataset, where: str) -> tuple[np.ndarray, np.ndarray]:
    """All samples and labels of a dataset of (sample, label) pairs, as arrays."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[0].numpy(), dataset.tensors[1].numpy()
    xs, ys = [], []
    try:
        for i in range(len(dataset)):
            item = dataset[i]
            xs.append(np.asarray(item[0]))
            ys.append(np.asarray(item[1]))
    except (TypeError, IndexError, ValueError) as exc:
        raise DataError(f"{where}: items must be (sample, label) pairs of tensors or numbers "
                        f"({type(exc).__name__})") from None
    if not xs:
        raise DataError(f"{where}: the dataset is empty")
    if len({x.shape for x in xs}) > 1:
        raise DataError(f"{where}: samples of several shapes {sorted({x.shape for x in xs})[:3]}; expected one")
    return np.stack(xs), np.stack(ys)


def _describe(train: Dataset, val: Dataset, where: str) -> tuple[tuple[int, ...], int, str]:
    """(sample shape, K, fingerprint) of two datasets, labels checked."""
    x_tr, y_tr = _stack(train, where)
    x_va, y_va = _stack(val, where)
    k = _check_labels(y_tr, y_va, where)
    if x_tr.shape[1:] != x_va.shape[1:]:
        raise DataError(f"{where}: training samples have shape {x_tr.shape[1:]}, validation samples "
                        f"{x_va.shape[1:]}; expected one shape")
    return tuple(x_tr.shape[1:]), k, _hash_arrays(x_tr, y_tr, x_va, y_va)


# --- data of a checkpoint ------------------------------------------------------------------------------

def data_for_checkpoint(net, checkpoint: str | os.PathLike, data: Any = None, *, seed: int = 0) -> Data:
    """The data to evaluate checkpoint `checkpoint`'s supernet `net` on: `data` if given, else
    the data it was trained on (digits for checkpoints older than the record), with that run's
    split. Refused (`DataError`) if it does not fit the supernet or has changed since."""
    from nestnas.supernet.checkpoint import checkpoint_data

    record = checkpoint_data(checkpoint)
    where = f"checkpoint {checkpoint}"
    if data is not None:
        loaded = load_data(data, net.space, seed=record["seed"] if record else seed,
                           model=_recorded_model(data, record))
    elif record is None:
        loaded = load_data("digits", net.space, seed=seed)
    elif record["spec"] is None:
        raise DataError(f"{where} was trained on data given in Python (no spec recorded); give the data")
    else:
        loaded = load_data(record["spec"], net.space, seed=record["seed"])
        if loaded.fingerprint != record["fingerprint"]:
            raise DataError(f"{loaded.name} has changed since {where} was trained on it (fingerprint "
                            f"{loaded.fingerprint[:12]}, recorded {record['fingerprint'][:12]}); give the data")
    loaded.check_fits(net, where, record)
    return loaded


def _recorded_model(data: Any, record: dict | None) -> str | None:
    """The tokenizer folder of the checkpoint's own text data, for text data given without one."""
    if not (record and record.get("spec") and isinstance(data, (str, os.PathLike))):
        return None
    try:
        given, recorded = parse_spec(data), parse_spec(record["spec"])
    except DataError:
        return None
    if given.kind != "text" or "tokenizer" in given.options or recorded.kind != "text":
        return None
    return recorded.options.get("tokenizer")
