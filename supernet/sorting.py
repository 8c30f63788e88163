"""Channel permutations that leave a network's function unchanged (for `sort_channels`)."""

from __future__ import annotations

import torch


@torch.no_grad()
def importance(consumers: list[tuple[torch.Tensor, int]], size: int, group: int = 1) -> torch.Tensor:
    """L1 norm of the weights that read each channel (summed over all consumers); with
    `group` > 1, channels are scored in contiguous groups (attention heads)."""
    score = torch.zeros(size)
    for tensor, dim in consumers:
        t = tensor.detach().abs().movedim(dim, 0)[:size]
        score += t.reshape(size, -1).sum(dim=1)
    return score.reshape(-1, group).sum(dim=1)


def order(score: torch.Tensor, group: int = 1) -> torch.Tensor:
    """Permutation putting the highest score first (stable for ties), expanded to channels."""
    groups = torch.argsort(-score, stable=True)
    if group == 1:
        return groups
    return (groups[:, None] * group + torch.arange(group)[None, :]).reshape(-1)


@torch.no_grad()
def permute_(tensors: list[tuple[torch.Tensor, int]], perm: torch.Tensor) -> None:
    """Reorder the leading `len(perm)` entries of each tensor along its dim, in place."""
    n = len(perm)
    for tensor, dim in tensors:
        view = tensor.data.narrow(dim, 0, n)
        view.copy_(view.index_select(dim, perm))
