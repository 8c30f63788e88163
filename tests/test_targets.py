"""Accuracy targets of default training on digits (slow: about 4 minutes on 2 cores)."""

import pytest
import torch

from nestnas.supernet import SearchSpace, build_supernet
from nestnas.supernet.data import digits_loaders
from nestnas.supernet.evaluate import subnet_accuracy
from nestnas.supernet.train import DEFAULT_EPOCHS, train_supernet

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family, largest_min, smallest_min", [("cnn", 0.95, 0.90), ("transformer", 0.90, 0.85)])
def test_default_training_reaches_the_targets(family, largest_min, smallest_min):
    torch.manual_seed(0)
    space = SearchSpace.for_family(family)
    net = build_supernet(space, num_classes=10)
    train, val = digits_loaders(family, seed=0)
    train_supernet(net, train, DEFAULT_EPOCHS[family], seed=0, progress=False)
    largest = subnet_accuracy(net, space.largest(), val, train)
    smallest = subnet_accuracy(net, space.smallest(), val, train)
    print(f"{family}: largest {largest:.4f}, smallest {smallest:.4f}")
    assert largest >= largest_min and smallest >= smallest_min
