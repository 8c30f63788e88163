"""`ElasticCNN`: a MobileNetV3-style supernet with elastic depth, width, kernel and expand ratio."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nestnas.supernet.base import Supernet, register_supernet
from nestnas.supernet.config import CNNConfig
from nestnas.supernet.elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticLinear
from nestnas.supernet.sorting import importance, order, permute_
from nestnas.supernet.space import CNNSpace
from nestnas.supernet.static import InvertedResidual, StaticCNN


@dataclass(frozen=True)
class BlockPlan:
    stage: int
    index: int
    in_channels: int
    out_channels: int
    hidden: int
    kernel: int


@dataclass(frozen=True)
class CNNPlan:
    stem: int
    blocks: tuple[BlockPlan, ...]
    head: int


@functools.lru_cache(maxsize=4096)
def plan(space: CNNSpace, config: CNNConfig) -> CNNPlan:
    """Channel counts and kernel of every active layer of `config` (a validated config)."""
    stem, stage_channels, head = space.channels(config.width_mult)
    blocks, c_in = [], stem
    for i, c_out in enumerate(stage_channels):
        for b in range(config.depths[i]):
            hidden = space.hidden_channels(c_in, config.expand_ratios[i][b])
            blocks.append(BlockPlan(i, b, c_in, c_out, hidden, config.kernel_sizes[i][b]))
            c_in = c_out
    return CNNPlan(stem, tuple(blocks), head)


class ElasticInvertedResidual(nn.Module):
    def __init__(self, max_in: int, max_out: int, max_hidden: int, max_kernel: int, stride: int):
        super().__init__()
        self.stride = stride
        self.expand_conv = ElasticConv2d(max_in, max_hidden, 1)
        self.expand_bn = ElasticBatchNorm2d(max_hidden)
        self.dw_conv = ElasticConv2d(max_hidden, max_hidden, max_kernel, stride, depthwise=True)
        self.dw_bn = ElasticBatchNorm2d(max_hidden)
        self.project_conv = ElasticConv2d(max_hidden, max_out, 1)
        self.project_bn = ElasticBatchNorm2d(max_out)

    def forward(self, x: torch.Tensor, p: BlockPlan) -> torch.Tensor:
        h = F.hardswish(self.expand_bn(self.expand_conv(x, p.hidden)))
        h = F.hardswish(self.dw_bn(self.dw_conv(h, p.hidden, p.kernel)))
        h = self.project_bn(self.project_conv(h, p.out_channels))
        return x + h if self.stride == 1 and p.in_channels == p.out_channels else h

    def to_static(self, p: BlockPlan) -> InvertedResidual:
        return InvertedResidual(
            nn.Sequential(self.expand_conv.to_static(p.in_channels, p.hidden), self.expand_bn.to_static(p.hidden),
                          nn.Hardswish()),
            nn.Sequential(self.dw_conv.to_static(p.hidden, p.hidden, p.kernel), self.dw_bn.to_static(p.hidden),
                          nn.Hardswish()),
            nn.Sequential(self.project_conv.to_static(p.hidden, p.out_channels),
                          self.project_bn.to_static(p.out_channels)),
            residual=self.stride == 1 and p.in_channels == p.out_channels,
        )


@register_supernet("cnn")
class ElasticCNN(Supernet):
    """MobileNetV3-style supernet. Input: (B, in_channels, R, R) with R the config's resolution."""

    def __init__(self, space: CNNSpace | None = None, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.space = space if space is not None else CNNSpace()
        self.num_classes, self.in_channels = num_classes, in_channels
        sp = self.space
        stem, stage_channels, head = sp.channels(sp.width_choices[-1])
        k_max, e_max = sp.kernel_choices[-1], sp.expand_choices[-1]
        self.stem_conv = ElasticConv2d(in_channels, stem, 3, sp.stem_stride)
        self.stem_bn = ElasticBatchNorm2d(stem)
        self.stages = nn.ModuleList()
        c_in = stem
        for st, c_out in zip(sp.stages, stage_channels):
            blocks = nn.ModuleList()
            for b in range(st.max_depth):
                blocks.append(ElasticInvertedResidual(
                    c_in, c_out, sp.hidden_channels(c_in, e_max), k_max, st.stride if b == 0 else 1))
                c_in = c_out
            self.stages.append(blocks)
        self.head_conv = ElasticConv2d(c_in, head, 1)
        self.head_bn = ElasticBatchNorm2d(head)
        self.classifier = ElasticLinear(head, num_classes)

    def spec(self):
        return {"num_classes": self.num_classes, "in_channels": self.in_channels}

    def input_shape(self, config=None, batch=1):
        config = self.resolve(config)
        return (batch, self.in_channels, config.resolution, config.resolution)

    def prepare_input(self, x, config=None):
        r = self.resolve(config).resolution
        if x.shape[-1] == r and x.shape[-2] == r:
            return x
        return F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor, config: CNNConfig | None = None) -> torch.Tensor:
        config = self.resolve(config)
        self._check_input(x, config)
        p = plan(self.space, config)
        x = F.hardswish(self.stem_bn(self.stem_conv(x, p.stem, 3)))
        for bp in p.blocks:
            x = self.stages[bp.stage][bp.index](x, bp)
        x = F.hardswish(self.head_bn(self.head_conv(x, p.head)))
        return self.classifier(x.mean(dim=(2, 3)), self.num_classes)

    def extract(self, config: CNNConfig | None = None) -> StaticCNN:
        """The subnet as a static module (eval mode). Uses the canonical config, so kernel taps
        that only ever see padding are dropped from the extracted layers."""
        config = self.space.canonical(self.resolve(config))
        p = plan(self.space, config)
        stem = nn.Sequential(self.stem_conv.to_static(self.in_channels, p.stem, 3), self.stem_bn.to_static(p.stem),
                             nn.Hardswish())
        blocks = [self.stages[bp.stage][bp.index].to_static(bp) for bp in p.blocks]
        c_last = p.blocks[-1].out_channels
        head = nn.Sequential(self.head_conv.to_static(c_last, p.head), self.head_bn.to_static(p.head), nn.Hardswish())
        static = StaticCNN(stem, blocks, head, self.classifier.to_static(p.head, self.num_classes))
        return static.eval()

    @torch.no_grad()
    def sort_channels(self) -> ElasticCNN:
        """Sort each block's hidden channels, and each stage's (and the stem's and head's)
        channels, by the L1 norm of the weights that read them."""

        def bn_of(m):
            return [(m.weight, 0), (m.bias, 0), (m.running_mean, 0), (m.running_var, 0)]

        blocks = [blk for stage in self.stages for blk in stage]
        for blk in blocks:
            n = blk.expand_conv.weight.shape[0]
            perm = order(importance([(blk.project_conv.weight, 1)], n))
            permute_([(blk.expand_conv.weight, 0), *bn_of(blk.expand_bn), (blk.dw_conv.weight, 0), *bn_of(blk.dw_bn),
                      (blk.project_conv.weight, 1)], perm)

        # Channel groups shared along the residual stream: the stem, each stage (merged with
        # the one before when its first block adds a shortcut), and the head.
        groups, members, readers = [], [*bn_of(self.stem_bn), (self.stem_conv.weight, 0)], []
        for stage in self.stages:
            first = stage[0]
            members.append((first.expand_conv.weight, 1))
            readers.append((first.expand_conv.weight, 1))
            if not (first.stride == 1 and first.expand_conv.weight.shape[1] == first.project_conv.weight.shape[0]):
                groups.append((members, readers))
                members, readers = [], []
            for j, blk in enumerate(stage):
                members += [(blk.project_conv.weight, 0), *bn_of(blk.project_bn)]
                if j > 0:
                    members.append((blk.expand_conv.weight, 1))
                    readers.append((blk.expand_conv.weight, 1))
        members.append((self.head_conv.weight, 1))
        readers.append((self.head_conv.weight, 1))
        groups.append((members, readers))
        groups.append(([(self.head_conv.weight, 0), *bn_of(self.head_bn), (self.classifier.weight, 1)],
                       [(self.classifier.weight, 1)]))
        for members, readers in groups:
            n = members[0][0].shape[0]
            permute_(members, order(importance(readers, n)))
        return self
