"""Supernet training with the sandwich rule and in-place distillation.

Each optimisation step trains the largest subnet on the labels, then the smallest and `sandwich`
more subnets (random, or rungs of a sorted ladder of nested subnets as in SortedNet) on the
largest subnet's soft predictions. Randomness is reseeded from (seed, epoch) at every epoch, so
a run resumed from its end-of-epoch checkpoint is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import typing
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Callable, Iterable, Mapping

import numpy as np
import pydantic
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader

from nestnas.errors import CheckpointError, ConfigError
from nestnas.fileio import validate
from nestnas.progress import StageBar
from nestnas.supernet.base import Supernet
from nestnas.supernet.checkpoint import read_checkpoint, save_checkpoint
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.evaluate import subnet_accuracy
from nestnas.supernet.families import family_names, supernet_class

Callback = Callable[[int, dict[str, Any]], None]



class _DefaultEpochs(Mapping):
    """family -> its default training epochs (`Supernet.default_epochs`), read from the registry."""

    def __getitem__(self, family: str) -> int:
        return supernet_class(family).default_epochs

    def __iter__(self):
        return iter(family_names())

    def __len__(self) -> int:
        return len(family_names())


DEFAULT_EPOCHS: Mapping[str, int] = _DefaultEpochs()


@dataclass(frozen=True)
class TrainOptions:
    """Everything that shapes a training run (stored in the checkpoint; a resume must match)."""

    epochs: int
    sandwich: int = 2
    distill: bool = True
    sorted_ladder: bool = False
    ladder_rungs: int = 8
    grad_accum: int = 1
    lr: float = 4e-3
    weight_decay: float = 0.02
    warmup_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training option {name!r} must be at least 1, got {getattr(self, name)}")
        if self.sandwich < 0:
            raise ConfigError(f"training option 'sandwich' must be 0 or more, got {self.sandwich}")
        if self.sorted_ladder and self.ladder_rungs < max(3, self.sandwich + 2):
            raise ConfigError("training option 'ladder_rungs' must be at least max(3, sandwich + 2), "
                              f"got {self.ladder_rungs}")
        if self.lr <= 0:
            raise ConfigError(f"training option 'lr' must be positive, got {self.lr}")


# --- the training state a checkpoint holds (checked before a resume uses it) ---------------
OptionsSchema = pydantic.create_model(  # TrainOptions' own fields and types; it checks the ranges itself
    "OptionsSchema", __config__=ConfigDict(strict=True, extra="forbid"),
    **{f.name: (typing.get_type_hints(TrainOptions)[f.name], ... if f.default is dataclasses.MISSING else f.default)
       for f in dataclasses.fields(TrainOptions)},
)


class OptimizerStateSchema(BaseModel):
    model_config = ConfigDict(strict=True)
    state: dict[int, dict[str, Any]]
    param_groups: list[dict[str, Any]]


class TrainStateSchema(BaseModel):
    model_config = ConfigDict(strict=True)
    epoch: Annotated[int, Field(ge=1)]
    options: OptionsSchema
    history: list[dict[str, Any]]
    optimizer: OptimizerStateSchema
    scheduler: dict[str, Any]


@dataclass
class TrainResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_epoch: int = 0


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _subnets(net: Supernet, opts: TrainOptions, rng: np.random.Generator, ladder: list[SubnetConfig]) -> list:
    space = net.space
    if opts.sorted_ladder:
        interior = rng.choice(np.arange(1, len(ladder) - 1), size=min(opts.sandwich, len(ladder) - 2), replace=False)
        extra = [ladder[i] for i in sorted(interior.tolist())]
    else:
        extra = [space.sample(rng) for _ in range(opts.sandwich)]
    return [space.smallest(), *extra]


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """In-place distillation: KL divergence from the teacher's soft predictions."""
    return F.kl_div(F.log_softmax(student, dim=1), F.softmax(teacher, dim=1), reduction="batchmean")


def sandwich_backward(net: Supernet, inputs: list[tuple[SubnetConfig, torch.Tensor]], y: torch.Tensor,
                      distill: bool = True, scale: float = 1.0) -> float:
    """Forward and backward of one sandwich step (gradients accumulate; no optimiser step).
    `inputs` pairs each subnet with its prepared batch; the first is the teacher, trained on
    the labels. Returns the teacher's loss."""
    (config, x), rest = inputs[0], inputs[1:]
    logits = net(x, config)
    loss = F.cross_entropy(logits, y)
    (loss * scale).backward()
    teacher = logits.detach()
    for config, x in rest:
        out = net(x, config)
        (scale * (distill_loss(out, teacher) if distill else F.cross_entropy(out, y))).backward()
    return loss.item()


def train_supernet(
    net: Supernet,
    train_loader: DataLoader,
    epochs: int,
    sandwich: int = 2,
    distill: bool = True,
    sorted_ladder: bool = False,
    grad_accum: int = 1,
    seed: int = 0,
    callbacks: Iterable[Callback] = (),
    *,
    lr: float = 4e-3,
    weight_decay: float = 0.02,
    val_loader: DataLoader | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    data: Any = None,
) -> TrainResult:
    """Train `net` in place with the sandwich rule.

    `callbacks` are called as ``cb(epoch, metrics)`` after every epoch. With `val_loader`, the
    largest and smallest subnets are evaluated each epoch (batch norm recalibrated on training
    batches). With `checkpoint`, the state is saved atomically after every epoch, and an
    existing checkpoint of the same run is resumed exactly when `resume` is true. `data` (a
    `nestnas.data.Data`) is recorded in the checkpoint; a resume on other data is refused.
    """
    opts = TrainOptions(epochs, sandwich, distill, sorted_ladder, grad_accum=grad_accum, lr=lr,
                        weight_decay=weight_decay, seed=seed)
    if len(train_loader) == 0:
        raise ConfigError("the training loader yields no batches")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    steps_per_epoch = math.ceil(len(train_loader) / opts.grad_accum)
    total = opts.epochs * steps_per_epoch
    warmup = max(1, int(opts.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    result = TrainResult()
    start_epoch = 0
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        _check_resume_data(checkpoint, data)
        start_epoch = _resume(net, optimizer, scheduler, opts, checkpoint, result)

    ladder = net.space.ladder(opts.ladder_rungs) if opts.sorted_ladder else []
    largest = net.space.largest()
    t0 = time.perf_counter()
    n_batches = opts.epochs * len(train_loader)
    with StageBar("train", progress) as bar:
        bar("", start_epoch * len(train_loader), n_batches)
        for epoch in range(start_epoch, opts.epochs):
            net.train()
            torch.manual_seed(_epoch_seed(seed, epoch))
            rng = np.random.default_rng([seed, epoch])
            losses = []
            optimizer.zero_grad(set_to_none=True)
            for i, (x, y) in enumerate(train_loader):
                configs = [largest, *_subnets(net, opts, rng, ladder)]
                inputs = [(c, net.prepare_input(x, c)) for c in configs]
                losses.append(sandwich_backward(net, inputs, y, opts.distill, 1.0 / opts.grad_accum))
                if (i + 1) % opts.grad_accum == 0 or i + 1 == len(train_loader):
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                bar(f"epoch {epoch + 1}/{opts.epochs} loss {np.mean(losses):.3f}", epoch * len(train_loader) + i + 1,
                    n_batches)
            metrics: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
            if val_loader is not None:
                metrics["val_acc_largest"] = subnet_accuracy(net, largest, val_loader, train_loader, seed=seed)
                metrics["val_acc_smallest"] = subnet_accuracy(net, net.space.smallest(), val_loader, train_loader,
                                                              seed=seed)
            result.history.append(metrics)
            if checkpoint is not None:
                save_checkpoint(net, checkpoint, {
                    "epoch": epoch + 1, "options": asdict(opts), "history": result.history,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                }, data=data)
            for cb in callbacks:
                cb(epoch + 1, metrics)
    result.seconds = time.perf_counter() - t0
    net.eval()
    return result


def _check_resume_data(checkpoint, data) -> None:
    saved = read_checkpoint(checkpoint).get("data")
    if data is not None and saved is not None and saved["fingerprint"] != data.fingerprint:
        raise CheckpointError(f"checkpoint {checkpoint} was trained on other data "
                              f"({saved['spec'] or 'given in Python'}); resume on the same data or write to a new "
                              "checkpoint")


def _resume(net, optimizer, scheduler, opts, checkpoint, result) -> int:
    payload = read_checkpoint(checkpoint)
    state = payload.get("train")
    if not state:
        raise CheckpointError(f"checkpoint {checkpoint} holds no training state to resume from")
    what = "training state of checkpoint"
    validate(state, TrainStateSchema, checkpoint, what, CheckpointError)
    if payload["space"] != net.space.to_dict():
        raise CheckpointError(f"checkpoint {checkpoint} was trained on another search space")
    try:
        saved = TrainOptions(**state["options"])
    except ConfigError as exc:
        raise CheckpointError(f"{what} {checkpoint}: field options: {exc}") from None
    if saved != opts:
        diff = {k: (v, getattr(opts, k)) for k, v in asdict(saved).items() if getattr(opts, k) != v}
        raise CheckpointError(
            f"checkpoint {checkpoint} was trained with other options {diff} (saved, asked); "
            "resume with the same options or write to a new checkpoint"
        )
    for name, load in (("model", lambda: net.load_state_dict(payload["model"])),
                       ("optimizer", lambda: optimizer.load_state_dict(state["optimizer"])),
                       ("scheduler", lambda: scheduler.load_state_dict(state["scheduler"]))):
        try:
            load()
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # torch's own checks of a state dict
            owner = "checkpoint" if name == "model" else what
            raise CheckpointError(f"{owner} {checkpoint}: field {name}: {str(exc).splitlines()[0]}") from None
    result.history = list(state["history"])
    result.resumed_from_epoch = state["epoch"]
    return result.resumed_from_epoch
