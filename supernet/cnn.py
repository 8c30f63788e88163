"""The CNN family: a MobileNetV3-style supernet with elastic depth, width, kernel and expand
ratio, as one module: its config (`CNNConfig`), space (`CNNSpace`), elastic model and extraction
(`ElasticCNN`), analytic MAC/parameter counts and its parts for the latency lookup table."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nestnas.errors import ConfigError, DataError
from nestnas.supernet.base import Supernet, part_key, register_supernet
from nestnas.supernet.config import SubnetConfig, as_float, as_int, ints, nested_ints
from nestnas.supernet.elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticLinear
from nestnas.supernet.sorting import importance, order, permute_
from nestnas.supernet.space import SearchSpace, Variable, _check_choices, _tuplify, make_divisible
from nestnas.supernet.static import InvertedResidual, StaticCNN

#: Kernel of the stem convolution (fixed, not a search choice).
STEM_KERNEL = 3


@dataclass(frozen=True)
class CNNConfig(SubnetConfig):
    """A MobileNetV3-style subnet: input resolution, width multiplier, depth per stage, and
    kernel size and expand ratio per block slot (``kernel_sizes[stage][block]``)."""

    family: ClassVar[str] = "cnn"
    resolution: int
    width_mult: float
    depths: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    expand_ratios: tuple[tuple[int, ...], ...]

    _types: ClassVar[dict[str, Callable[..., Any]]] = {
        "resolution": as_int, "width_mult": as_float, "depths": ints, "kernel_sizes": nested_ints,
        "expand_ratios": nested_ints}
    summary_fields: ClassVar[tuple[str, ...]] = ("resolution", "width_mult", "depths")


@dataclass(frozen=True)
class StageSpec:
    """One stage of the CNN: base output channels (at width 1.0), stride of its first block,
    and the depths it may take."""

    channels: int
    stride: int
    depth_choices: tuple[int, ...]

    @property
    def max_depth(self) -> int:
        return self.depth_choices[-1]


def _default_stages() -> tuple[StageSpec, ...]:
    return (
        StageSpec(16, 1, (1, 2, 3)),
        StageSpec(24, 2, (1, 2, 3)),
        StageSpec(40, 2, (1, 2, 3)),
        StageSpec(64, 1, (1, 2, 3)),
    )


@dataclass(frozen=True)
class CNNSpace(SearchSpace):
    """MobileNetV3-style space: inverted-residual blocks with elastic depth per stage, kernel
    size and expand ratio per block, a global width multiplier and input resolution."""

    family: ClassVar[str] = "cnn"
    config_type: ClassVar[type[SubnetConfig]] = CNNConfig

    stages: tuple[StageSpec, ...] = dataclasses.field(default_factory=_default_stages)
    kernel_choices: tuple[int, ...] = (3, 5, 7)
    expand_choices: tuple[int, ...] = (3, 4, 6)
    width_choices: tuple[float, ...] = (0.5, 0.75, 1.0)
    resolution_choices: tuple[int, ...] = (16, 24, 32)
    stem_channels: int = 16
    stem_stride: int = 2
    head_channels: int = 128
    channel_divisor: int = 8

    def __post_init__(self):
        stages = tuple(s if isinstance(s, StageSpec) else StageSpec(*s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ConfigError("search space field 'stages': needs at least one stage")
        for i, st in enumerate(stages):
            _check_choices(f"stages[{i}].depth_choices", st.depth_choices)
            if st.stride not in (1, 2) or st.channels <= 0:
                raise ConfigError(f"search space field 'stages[{i}]': stride must be 1 or 2 and channels positive")
        _check_choices("kernel_choices", self.kernel_choices)
        if any(k % 2 == 0 for k in self.kernel_choices):
            raise ConfigError("search space field 'kernel_choices': kernel sizes must be odd, "
                              f"got {list(self.kernel_choices)}")
        _check_choices("expand_choices", self.expand_choices)
        _check_choices("width_choices", self.width_choices)
        _check_choices("resolution_choices", self.resolution_choices)

    @classmethod
    def _from_fields(cls, fields):
        fields = {k: _tuplify(v) for k, v in fields.items()}
        fields["stages"] = tuple(StageSpec(s["channels"], s["stride"], tuple(s["depth_choices"]))
                                 if isinstance(s, dict) else StageSpec(*s) for s in fields.get("stages", ()))
        return cls(**fields)

    # --- derived architecture ---------------------------------------------------------------
    def channels(self, width_mult: float) -> tuple[int, tuple[int, ...], int]:
        """(stem, per-stage, head) channel counts at a width multiplier."""
        d = self.channel_divisor
        return (
            make_divisible(self.stem_channels * width_mult, d),
            tuple(make_divisible(s.channels * width_mult, d) for s in self.stages),
            make_divisible(self.head_channels * width_mult, d),
        )

    def hidden_channels(self, in_channels: int, expand_ratio: int) -> int:
        return make_divisible(in_channels * expand_ratio, self.channel_divisor)

    def block_input_sizes(self, resolution: int) -> list[list[int]]:
        """Spatial size of the feature map entering each block slot (``[stage][block]``)."""
        size = (resolution - 1) // self.stem_stride + 1
        out = []
        for st in self.stages:
            sizes = [size]
            size = (size - 1) // st.stride + 1
            sizes += [size] * (st.max_depth - 1)
            out.append(sizes)
        return out

    def effective_kernel(self, kernel: int, feature_size: int) -> int:
        """Smallest kernel choice that computes the same function as `kernel` on a
        `feature_size` map: with zero padding, taps farther than ``size - 1`` from the centre
        only ever see padding, and centre-cropped (nested) kernels share their inner taps."""
        reach = 2 * feature_size - 1
        if kernel <= reach:
            return kernel
        return min(k for k in self.kernel_choices if k >= reach)

    # --- hooks ----------------------------------------------------------------------------
    @functools.lru_cache(maxsize=64)  # noqa: B019 (spaces are frozen, few and long-lived)
    def variables(self):
        out = [Variable("resolution", self.resolution_choices), Variable("width_mult", self.width_choices)]
        out += [Variable(f"depths[{i}]", st.depth_choices, stage=i, depth=True) for i, st in enumerate(self.stages)]
        for i, st in enumerate(self.stages):
            for b in range(st.max_depth):
                out.append(Variable(f"kernel_sizes[{i}][{b}]", self.kernel_choices, stage=i, slot=b))
                out.append(Variable(f"expand_ratios[{i}][{b}]", self.expand_choices, stage=i, slot=b))
        return tuple(out)

    def _check_shape(self, config):
        n = len(self.stages)
        if len(config.depths) != n:
            raise ConfigError(f"config field 'depths': expected {n} stages, got {len(config.depths)}")
        for field in ("kernel_sizes", "expand_ratios"):
            per_stage = getattr(config, field)
            if len(per_stage) != n:
                raise ConfigError(f"config field {field!r}: expected {n} stages, got {len(per_stage)}")
            for i, st in enumerate(self.stages):
                if len(per_stage[i]) != st.max_depth:
                    raise ConfigError(
                        f"config field '{field}[{i}]': expected {st.max_depth} block slots, got {len(per_stage[i])}"
                    )

    def _flatten(self, config):
        out = [config.resolution, config.width_mult, *config.depths]
        for i in range(len(self.stages)):
            for k, e in zip(config.kernel_sizes[i], config.expand_ratios[i]):
                out += [k, e]
        return out

    def _build(self, values):
        n = len(self.stages)
        resolution, width, depths, rest = values[0], values[1], values[2 : 2 + n], values[2 + n :]
        kernels, expands, pos = [], [], 0
        for st in self.stages:
            chunk = rest[pos : pos + 2 * st.max_depth]
            pos += 2 * st.max_depth
            kernels.append(tuple(chunk[0::2]))
            expands.append(tuple(chunk[1::2]))
        return CNNConfig(resolution, float(width), tuple(depths), tuple(kernels), tuple(expands))

    def canonical(self, config):
        self.validate(config)
        sizes = self.block_input_sizes(config.resolution)
        kernels, expands = [], []
        for i in range(len(self.stages)):
            d = config.depths[i]
            kernels.append(tuple(
                self.effective_kernel(k, sizes[i][b]) if b < d else self.kernel_choices[0]
                for b, k in enumerate(config.kernel_sizes[i])
            ))
            expands.append(tuple(e if b < d else self.expand_choices[0] for b, e in enumerate(config.expand_ratios[i])))
        return dataclasses.replace(config, kernel_sizes=tuple(kernels), expand_ratios=tuple(expands))

    def size(self):
        total = 0
        n_expand = len(self.expand_choices)
        for res in self.resolution_choices:
            sizes = self.block_input_sizes(res)
            per_res = len(self.width_choices)
            for i, st in enumerate(self.stages):
                per_block = [len({self.effective_kernel(k, s) for k in self.kernel_choices}) * n_expand
                             for s in sizes[i]]
                per_res *= sum(math.prod(per_block[:d]) for d in st.depth_choices)
            total += per_res
        return total

    def option_values(self, X):
        """Option values, kernels as their effective size at their slot (see `canonical`)."""
        values = super().option_values(X)
        col = 2 + len(self.stages)  # after resolution, width and the depths: (kernel, expand) per slot
        for i, st in enumerate(self.stages):
            for b in range(st.max_depth):
                table = np.array([[self.effective_kernel(k, self.block_input_sizes(r)[i][b])
                                   for k in self.kernel_choices] for r in self.resolution_choices], dtype=np.float64)
                values[:, col] = table[X[:, 0], X[:, col]]
                col += 2
        return values


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

    space_type = CNNSpace
    default_epochs = 8  # reaches the accuracy targets on digits within about two minutes on 2 cores

    def __init__(self, space: CNNSpace | None = None, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.space = space if space is not None else CNNSpace()
        self.num_classes, self.in_channels = num_classes, in_channels
        sp = self.space
        stem, stage_channels, head = sp.channels(sp.width_choices[-1])
        k_max, e_max = sp.kernel_choices[-1], sp.expand_choices[-1]
        self.stem_conv = ElasticConv2d(in_channels, stem, STEM_KERNEL, sp.stem_stride)
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

    @classmethod
    def spec_for_data(cls, space, sample_shape, num_classes):
        """Images (C, H, W): C input channels; any H, W (inputs are resized per resolution)."""
        shape = tuple(sample_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"the cnn family takes image samples shaped (channels, height, width), got {shape}")
        return {"num_classes": int(num_classes), "in_channels": int(shape[0])}

    @classmethod
    def image_size(cls, space):
        return max(space.resolution_choices)

    def sample_shape(self):
        r = max(self.space.resolution_choices)
        return (self.in_channels, r, r)

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
        x = F.hardswish(self.stem_bn(self.stem_conv(x, p.stem, STEM_KERNEL)))
        for bp in p.blocks:
            x = self.stages[bp.stage][bp.index](x, bp)
        x = F.hardswish(self.head_bn(self.head_conv(x, p.head)))
        return self.classifier(x.mean(dim=(2, 3)), self.num_classes)

    def extract(self, config: CNNConfig | None = None) -> StaticCNN:
        """The subnet as a static module (eval mode). Uses the canonical config, so kernel taps
        that only ever see padding are dropped from the extracted layers."""
        config = self.space.canonical(self.resolve(config))
        p = plan(self.space, config)
        stem = nn.Sequential(self.stem_conv.to_static(self.in_channels, p.stem, STEM_KERNEL),
                             self.stem_bn.to_static(p.stem), nn.Hardswish())
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

    # --- analytic cost and measurable parts ----------------------------------------------------
    @classmethod
    def count_macs(cls, space, config, spec):
        return _cnn_scalar(space, config, spec["num_classes"], spec["in_channels"])

    @classmethod
    def count_macs_encoded(cls, space, X, spec):
        return _cnn_encoded(space, X, spec["num_classes"], spec["in_channels"])

    @classmethod
    def parts(cls, space, config, spec):
        """Stem, every block, head. A block's key holds its channels, hidden width, effective
        kernel, stride and input size; never its slot."""
        config = space.canonical(config)
        p = plan(space, config)
        r = config.resolution
        sizes = space.block_input_sizes(r)
        out = [(part_key("stem", spec["in_channels"], p.stem, r, space.stem_stride), ("stem", r, p.stem))]
        h = r
        for bp in p.blocks:
            h = sizes[bp.stage][bp.index]
            stride = space.stages[bp.stage].stride if bp.index == 0 else 1
            out.append((part_key("block", bp.in_channels, bp.hidden, bp.out_channels, bp.kernel, stride, h),
                        ("block", bp, h)))
            h = (h - 1) // stride + 1
        c_last = p.blocks[-1].out_channels
        out.append((part_key("head", c_last, p.head, h, spec["num_classes"]), ("head", c_last, p.head, h)))
        return out

    def all_parts(self):
        space, found, net = self.space, {}, self
        for r in space.resolution_choices:
            sizes = space.block_input_sizes(r)
            for w in space.width_choices:
                stem, stages, head = space.channels(w)
                found.setdefault(part_key("stem", net.in_channels, stem, r, space.stem_stride), ("stem", r, stem))
                c_prev, h = stem, r
                for s, st in enumerate(space.stages):
                    for b in range(min(st.max_depth, 2)):  # slots past the first share one shape
                        c_in, stride, hb = (c_prev, st.stride, sizes[s][0]) if b == 0 else (stages[s], 1, sizes[s][1])
                        for e in space.expand_choices:
                            for k in space.kernel_choices:
                                bp = BlockPlan(s, b, c_in, stages[s], space.hidden_channels(c_in, e),
                                               space.effective_kernel(k, hb))
                                found.setdefault(part_key("block", c_in, bp.hidden, stages[s], bp.kernel, stride, hb),
                                                 ("block", bp, hb))
                    h = (sizes[s][0] - 1) // st.stride + 1
                    c_prev = stages[s]
                found.setdefault(part_key("head", stages[-1], head, h, net.num_classes), ("head", stages[-1], head, h))
        return found

    def build_part(self, recipe, batch):
        net, kind = self, recipe[0]
        if kind == "stem":
            _, r, c = recipe
            module = nn.Sequential(net.stem_conv.to_static(net.in_channels, c, STEM_KERNEL), net.stem_bn.to_static(c),
                                   nn.Hardswish())
            return module.eval(), (batch, net.in_channels, r, r)
        if kind == "block":
            _, bp, h = recipe
            return net.stages[bp.stage][bp.index].to_static(bp).eval(), (batch, bp.in_channels, h, h)
        _, c_last, c_head, h = recipe
        head = nn.Sequential(net.head_conv.to_static(c_last, c_head), net.head_bn.to_static(c_head), nn.Hardswish())
        return _CNNHead(head, net.classifier.to_static(c_head, net.num_classes)).eval(), (batch, c_last, h, h)


class _CNNHead(nn.Module):
    def __init__(self, head: nn.Module, classifier: nn.Module):
        super().__init__()
        self.head, self.classifier = head, classifier

    def forward(self, x):
        return self.classifier(self.head(x).mean(dim=(2, 3)))


# --- analytic counts (the convention of `nestnas.predictors.macs`) ---------------------------------
def _out_size(size: int, stride: int) -> int:
    """Spatial size after an odd-kernel conv with padding k // 2."""
    return (size - 1) // stride + 1


def _cnn_block(c_in: int, hidden: int, c_out: int, kernel: int, size_in: int, stride: int) -> tuple[int, int]:
    """(MACs, params) of one inverted residual block (1x1 expand, kxk depthwise, 1x1 project,
    each followed by a BatchNorm with weight and bias)."""
    size_out = _out_size(size_in, stride)
    macs = (size_in * size_in * hidden * c_in                # expand 1x1
            + size_out * size_out * hidden * kernel * kernel  # depthwise kxk
            + size_out * size_out * c_out * hidden)          # project 1x1
    params = hidden * c_in + 2 * hidden + hidden * kernel * kernel + 2 * hidden + c_out * hidden + 2 * c_out
    return macs, params


def _cnn_fixed(space: CNNSpace, resolution: int, width_mult: float, num_classes: int,
               in_channels: int) -> tuple[int, int]:
    """(MACs, params) of the stem, head conv and classifier (all choices but blocks)."""
    stem, stage_channels, head = space.channels(width_mult)
    size = _out_size(resolution, space.stem_stride)
    macs = size * size * stem * in_channels * STEM_KERNEL**2
    params = stem * in_channels * STEM_KERNEL**2 + 2 * stem
    for st in space.stages:
        size = _out_size(size, st.stride)
    c_last = stage_channels[-1]
    macs += size * size * head * c_last + head * num_classes
    params += head * c_last + 2 * head + head * num_classes + num_classes
    return macs, params


def _cnn_encoded(space: CNNSpace, X: np.ndarray, num_classes: int, in_channels: int) -> tuple[np.ndarray, np.ndarray]:
    fixed, slots = _cnn_tables(space, num_classes, in_channels)
    r, w = X[:, 0], X[:, 1]
    macs = fixed[0][r, w].copy()
    params = fixed[1][r, w].copy()
    n_stages = len(space.stages)
    col = 2 + n_stages
    for i, st in enumerate(space.stages):
        depth = np.asarray(st.depth_choices, dtype=np.int64)[X[:, 2 + i]]
        for b in range(st.max_depth):
            k, e = X[:, col], X[:, col + 1]
            col += 2
            active = depth > b
            t_macs, t_params = slots[i][b]
            macs += np.where(active, t_macs[r, w, k, e], 0)
            params += np.where(active, t_params[r, w, k, e], 0)
    return macs, params


def _cnn_scalar(space: CNNSpace, config, num_classes: int, in_channels: int) -> tuple[int, int]:
    p = plan(space, config)
    sizes = space.block_input_sizes(config.resolution)
    macs, params = _cnn_fixed(space, config.resolution, config.width_mult, num_classes, in_channels)
    for bp in p.blocks:
        stride = space.stages[bp.stage].stride if bp.index == 0 else 1
        m, q = _cnn_block(bp.in_channels, bp.hidden, bp.out_channels, bp.kernel, sizes[bp.stage][bp.index], stride)
        macs, params = macs + m, params + q
    return macs, params


@functools.lru_cache(maxsize=64)
def _cnn_tables(space: CNNSpace, num_classes: int, in_channels: int):
    """Lookup tables indexed by encoded choices: the fixed part by (resolution, width), and
    each block slot by (resolution, width, kernel, expand) with the effective (canonical)
    kernel at that slot's input size already applied. Loops run over options, not configs."""
    res, widths = space.resolution_choices, space.width_choices
    kernels, expands = space.kernel_choices, space.expand_choices
    fixed = np.zeros((2, len(res), len(widths)), dtype=np.int64)
    for a, r in enumerate(res):
        for c, wm in enumerate(widths):
            fixed[:, a, c] = _cnn_fixed(space, r, wm, num_classes, in_channels)
    sizes = [space.block_input_sizes(r) for r in res]
    channels = [space.channels(wm) for wm in widths]
    slots = []
    for i, st in enumerate(space.stages):
        per_stage = []
        for b in range(st.max_depth):
            shape = (len(res), len(widths), len(kernels), len(expands))
            t_macs, t_params = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
            stride = st.stride if b == 0 else 1
            for a in range(len(res)):
                size = sizes[a][i][b]
                for c, (stem, stage_ch, _) in enumerate(channels):
                    c_in = (stem if i == 0 else stage_ch[i - 1]) if b == 0 else stage_ch[i]
                    for f, k in enumerate(kernels):
                        k_eff = space.effective_kernel(k, size)
                        for g, e in enumerate(expands):
                            hidden = space.hidden_channels(c_in, e)
                            t_macs[a, c, f, g], t_params[a, c, f, g] = _cnn_block(
                                c_in, hidden, stage_ch[i], k_eff, size, stride)
            per_stage.append((t_macs, t_params))
        slots.append(per_stage)
    return (fixed[0], fixed[1]), slots
