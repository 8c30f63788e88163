"""Six dynamic networks written in plain PyTorch, as their authors would (no nestnas API inside
`forward`): the suite that `nestnas.rewrite` must compile without changes. Each has a
`calibrate(inputs)` that sets its thresholds to the median over the inputs, as one would tune
them on data, so that every branch is taken on a mixed set of inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nestnas.compile.switch import BudgetSwitch
from nestnas.supernet import ElasticCNN, SearchSpace


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def head(c: int, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def midpoint(values) -> float:
    """A threshold halfway between the two middle values: half the inputs on each side, and none
    within rounding of it (a tie would be decided differently by different runtimes)."""
    v = sorted(float(x) for x in values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2 if len(v) % 2 == 0 else (len(v) + 1) // 2]) / 2


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial batch-norm statistics, as after training; eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


class Gate(nn.Module):
    """The smallest dynamic network: a host argument picks one of two paths (fast tests)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, fast: float):
        if fast > 0.5:
            return self.a(x)
        return self.b(self.a(x))


class EarlyExit(nn.Module):
    """Exit after the first stage when the top softmax probability passes a threshold."""

    def __init__(self, c: int = 24):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.stage1 = nn.Sequential(conv_bn(c, c), conv_bn(c, c))
        self.exit1 = head(c)
        self.stage2 = nn.Sequential(conv_bn(c, 2 * c, 2), conv_bn(2 * c, 2 * c), conv_bn(2 * c, 2 * c))
        self.exit2 = head(2 * c)
        self.threshold = 0.5

    def forward(self, x):
        h = self.stage1(self.stem(x))
        logits = self.exit1(h)
        confidence = F.softmax(logits, dim=-1).max()
        if confidence > self.threshold:
            return logits
        h = self.stage2(h)
        return self.exit2(h)

    def calibrate(self, inputs):
        with torch.no_grad():
            scores = [F.softmax(self.exit1(self.stage1(self.stem(x))), -1).max().item() for x in inputs]
        self.threshold = midpoint(scores)


class SkipNet(nn.Module):
    """SkipNet-style: a learned gate per residual block decides whether to run it."""

    def __init__(self, c: int = 24, blocks: int = 4):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.blocks = nn.ModuleList(nn.Sequential(conv_bn(c, c), conv_bn(c, c)) for _ in range(blocks))
        self.gates = nn.ModuleList(nn.Linear(c, 1) for _ in range(blocks))
        self.head = head(c)

    def forward(self, x):
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            gate = torch.sigmoid(self.gates[i](h.mean(dim=(2, 3))))
            if gate.item() > 0.5:
                h = h + block(h)
        return self.head(h)

    def calibrate(self, inputs):
        with torch.no_grad():
            for i in range(len(self.blocks)):
                logits = []
                for x in inputs:  # gate i sees the blocks before it run
                    h = self.stem(x)
                    for j in range(i):
                        h = h + self.blocks[j](h)
                    logits.append(self.gates[i](h.mean(dim=(2, 3))).item())
                self.gates[i].bias -= midpoint(logits)


class AdaptiveDepth(nn.Module):
    """Adaptive computation time: blocks run until the accumulated halting score passes 1."""

    def __init__(self, c: int = 24, max_steps: int = 4):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.blocks = nn.ModuleList(conv_bn(c, c) for _ in range(max_steps))
        self.halt = nn.Linear(c, 1)
        self.head = head(c)
        self.max_steps = max_steps
        self.threshold = 1.0

    def forward(self, x):
        h = self.stem(x)
        halting = torch.zeros(1)
        step = 0
        while step < self.max_steps:
            h = self.blocks[step](h)
            halting = halting + torch.sigmoid(self.halt(h.mean(dim=(2, 3)))).reshape(1)
            step += 1
            if halting > self.threshold:
                break
        return self.head(h)

    def calibrate(self, inputs):
        """A threshold that a quarter of the inputs never reach (they run every block)."""
        with torch.no_grad():
            totals = []
            for x in inputs:
                h, total = self.stem(x), 0.0
                for block in self.blocks:
                    h = block(h)
                    total += torch.sigmoid(self.halt(h.mean(dim=(2, 3)))).item()
                totals.append(total)
        v = sorted(totals)
        k = (3 * len(v)) // 4
        self.threshold = (v[k - 1] + v[k]) / 2


class TopOneMoE(nn.Module):
    """A top-1 mixture of experts: a router picks one expert per input (batch size 1)."""

    def __init__(self, c: int = 24, experts: int = 4):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, c), conv_bn(c, c))
        self.router = nn.Linear(c, experts)
        self.experts = nn.ModuleList(nn.Sequential(conv_bn(c, c), conv_bn(c, c)) for _ in range(experts))
        self.head = head(c)

    def forward(self, x):
        h = self.stem(x)
        expert = self.router(h.mean(dim=(2, 3))).argmax(dim=-1).item()
        h = self.experts[expert](h)
        return self.head(h)

    def calibrate(self, inputs):
        """Centre the router's logits so that every expert gets a share of the inputs."""
        with torch.no_grad():
            logits = torch.cat([self.router(self.stem(x).mean(dim=(2, 3))) for x in inputs])
            self.router.bias -= logits.mean(0)


class ResolutionBranch(nn.Module):
    """Large inputs are downsampled by a strided stem first; small ones enter the body directly."""

    def __init__(self, c: int = 24):
        super().__init__()
        self.down = nn.Sequential(conv_bn(3, c, 2), conv_bn(c, 3))
        self.body = nn.Sequential(conv_bn(3, c), conv_bn(c, c), conv_bn(c, 2 * c, 2))
        self.head = head(2 * c)

    def forward(self, x):
        if x.shape[-1] > 24:
            x = self.down(x)
        h = self.body(x)
        return self.head(h)

    def calibrate(self, inputs):
        pass


def switched_supernet(k: int = 3, seed: int = 0) -> BudgetSwitch:
    """A CNN supernet switched at run time among K nested subnets by a latency budget."""
    torch.manual_seed(seed)
    net = trained_like(ElasticCNN(SearchSpace.mobilenet(), num_classes=10, in_channels=1), seed)
    configs = net.space.ladder(k)
    return BudgetSwitch(net, configs, [1.0 + i for i in range(k)])


def suite(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    nets = {"early_exit": EarlyExit(), "skipnet": SkipNet(), "adaptive_depth": AdaptiveDepth(),
            "moe_top1": TopOneMoE(), "resolution_branch": ResolutionBranch()}
    return {name: trained_like(net, seed + i) for i, (name, net) in enumerate(nets.items())} | \
        {"budget_switch": switched_supernet(seed=seed)}


def inputs_for(name: str, model: nn.Module, n: int = 100, seed: int = 0) -> list[tuple]:
    """n example calls that take every branch once `calibrate` has run on them."""
    g = torch.Generator().manual_seed(seed)
    if name == "budget_switch":
        budgets = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 10.0]
        shape = model.input_shape()
        return [(torch.randn(shape, generator=g), budgets[i % len(budgets)]) for i in range(n)]
    if name == "resolution_branch":
        return [(torch.randn(1, 3, 32 if i % 2 else 16, 32 if i % 2 else 16, generator=g),) for i in range(n)]
    return [(torch.randn(1, 3, 16, 16, generator=g),) for i in range(n)]
