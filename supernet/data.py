"""The embedded default data set: scikit-learn's `load_digits` (8x8 grey digits, 10 classes),
shipped inside scikit-learn, so nothing is downloaded."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from nestnas.errors import ConfigError

FAMILIES = ("cnn", "transformer")


def digits_datasets(family: str, seed: int = 0, val_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """Stratified train/validation split of digits, pixels scaled to [-1, 1].

    The CNN sees (1, 8, 8) images (its supernet upsamples to each subnet's resolution); the
    encoder sees 8 tokens of 8 pixels (one token per image row)."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown supernet family {family!r}; allowed: {list(FAMILIES)}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    y = digits.target.astype(np.int64)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val_fraction, stratify=y, random_state=seed)
    shape = (-1, 1, 8, 8) if family == "cnn" else (-1, 8, 8)
    return (TensorDataset(torch.from_numpy(x_tr).reshape(shape), torch.from_numpy(y_tr)),
            TensorDataset(torch.from_numpy(x_va).reshape(shape), torch.from_numpy(y_va)))


def digits_loaders(family: str, batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader and ordered validation loader over `digits_datasets`."""
    train, val = digits_datasets(family, seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True),
            DataLoader(val, batch_size=256, shuffle=False))
