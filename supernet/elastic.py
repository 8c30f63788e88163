"""Elastic layers: one set of largest weights, and a smaller choice is always its leading slice.

Every layer takes the sub-layer it should run as explicit arguments (no active-subnet state)
and can emit the equivalent static `torch.nn` layer with the sliced weights copied.

Kernel size is elastic by centre crop, without Once-for-All's kernel transform matrices: those
matrices help when a large pretrained kernel is shrunk progressively, but here every kernel size
is trained together from the start (sandwich rule), and a plain crop keeps the extracted kernel
an exact slice of the shared one, so extraction needs no extra parameters and stays bit-exact.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def centre_crop(weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    full = weight.shape[-1]
    if kernel_size == full:
        return weight
    start = (full - kernel_size) // 2
    return weight[..., start : start + kernel_size, start : start + kernel_size]


class ElasticConv2d(nn.Module):
    """Conv2d whose output channels and kernel size are chosen per call; input channels follow
    the input. `depthwise=True` makes it a depthwise conv (groups == channels)."""

    def __init__(self, max_in: int, max_out: int, max_kernel: int = 1, stride: int = 1, depthwise: bool = False):
        super().__init__()
        if depthwise and max_in != max_out:
            raise ValueError("a depthwise conv has as many outputs as inputs")
        self.stride, self.depthwise, self.max_kernel = stride, depthwise, max_kernel
        self.weight = nn.Parameter(torch.empty(max_out, 1 if depthwise else max_in, max_kernel, max_kernel))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def sliced_weight(self, in_channels: int, out_channels: int, kernel_size: int) -> torch.Tensor:
        w = self.weight[:out_channels] if self.depthwise else self.weight[:out_channels, :in_channels]
        return centre_crop(w, kernel_size)

    def forward(self, x: torch.Tensor, out_channels: int, kernel_size: int | None = None) -> torch.Tensor:
        k = kernel_size or self.max_kernel
        c = x.shape[1]
        if self.depthwise:
            out_channels = c
        w = self.sliced_weight(c, out_channels, k)
        return F.conv2d(x, w, None, self.stride, k // 2, 1, c if self.depthwise else 1)

    def to_static(self, in_channels: int, out_channels: int, kernel_size: int | None = None) -> nn.Conv2d:
        k = kernel_size or self.max_kernel
        if self.depthwise:
            out_channels = in_channels
        conv = nn.Conv2d(in_channels, out_channels, k, self.stride, k // 2,
                         groups=in_channels if self.depthwise else 1, bias=False)
        conv.weight.data.copy_(self.sliced_weight(in_channels, out_channels, k))
        return conv


# Sums a tensor over the ranks of a distributed run (with autograd); set only by `batch_norm_across`.
_BN_ALL_REDUCE: contextvars.ContextVar[Callable[[torch.Tensor], torch.Tensor] | None] = contextvars.ContextVar(
    "nestnas_bn_all_reduce", default=None)


@contextlib.contextmanager
def batch_norm_across(all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within this context, elastic batch norm in training mode normalises with (and records) the
    statistics of the global batch that the ranks of a distributed run share: `all_reduce(t)`
    returns `t` summed over the ranks and must carry gradients (torch.distributed.nn.functional
    .all_reduce). Each rank then computes what one process computes on the whole batch."""
    token = _BN_ALL_REDUCE.set(all_reduce)
    try:
        yield
    finally:
        _BN_ALL_REDUCE.reset(token)


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the leading channels of the input. In training mode the running
    statistics of those channels are updated in place (slices are views); inside
    `batch_norm_across` they are the statistics of the global batch of all ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        all_reduce = _BN_ALL_REDUCE.get()
        if self.training and all_reduce is not None:
            return self._global_batch_norm(x, c, all_reduce)
        use_batch = self.training or not self.track_running_stats
        return F.batch_norm(
            x, self.running_mean[:c], self.running_var[:c], self.weight[:c], self.bias[:c],
            use_batch, self.momentum, self.eps,
        )

    def _global_batch_norm(self, x: torch.Tensor, c: int, all_reduce) -> torch.Tensor:
        # One collective: each rank's sum, its squares about its own mean and its mean's share
        # (Chan et al.'s parallel variance), about as precise as F.batch_norm's own variance.
        dims = [0, 2, 3]
        n_local = x.numel() // c
        local_sum = x.sum(dims)
        local_mean = local_sum / max(n_local, 1)  # an empty shard adds nothing
        d = x - local_mean.view(1, c, 1, 1)
        total = all_reduce(torch.cat([local_sum, (d * d).sum(dims), local_sum * local_mean,
                                      x.new_full((1,), float(n_local))]))
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] + total[2 * c:3 * c] - n * mean * mean).clamp_min(0) / n
        if self.track_running_stats:
            with torch.no_grad():  # as F.batch_norm: the unbiased variance goes into the running estimate
                m = self.momentum
                self.running_mean[:c].mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var[:c].mul_(1 - m).add_(var.detach() * n / max(n.item() - 1, 1), alpha=m)
        scale = torch.rsqrt(var + self.eps) * self.weight[:c]
        return (x - mean.view(1, c, 1, 1)) * scale.view(1, c, 1, 1) + self.bias[:c].view(1, c, 1, 1)

    def to_static(self, channels: int) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(channels, eps=self.eps, momentum=self.momentum)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).data.copy_(getattr(self, name)[:channels])
        bn.num_batches_tracked.copy_(self.num_batches_tracked)
        return bn


class ElasticLinear(nn.Module):
    """Linear layer whose output width is chosen per call; the input width follows the input."""

    def __init__(self, max_in: int, max_out: int, bias: bool = True):
        super().__init__()
        ref = nn.Linear(max_in, max_out, bias=bias)  # torch's default initialisation
        self.weight = nn.Parameter(ref.weight.data.clone())
        self.bias = nn.Parameter(ref.bias.data.clone()) if bias else None

    def forward(self, x: torch.Tensor, out_features: int) -> torch.Tensor:
        w = self.weight[:out_features, : x.shape[-1]]
        return F.linear(x, w, None if self.bias is None else self.bias[:out_features])

    def to_static(self, in_features: int, out_features: int) -> nn.Linear:
        lin = nn.Linear(in_features, out_features, bias=self.bias is not None)
        lin.weight.data.copy_(self.weight[:out_features, :in_features])
        if self.bias is not None:
            lin.bias.data.copy_(self.bias[:out_features])
        return lin


class ElasticLayerNorm(nn.LayerNorm):
    """LayerNorm over the leading features of the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        return F.layer_norm(x, (d,), self.weight[:d], self.bias[:d], self.eps)

    def to_static(self, features: int) -> nn.LayerNorm:
        ln = nn.LayerNorm(features, eps=self.eps)
        ln.weight.data.copy_(self.weight[:features])
        ln.bias.data.copy_(self.bias[:features])
        return ln
