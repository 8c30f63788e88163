"""Supernet training with the sandwich rule and in-place distillation.

Each optimisation step trains the largest subnet on the labels, then the smallest and `sandwich`
more subnets (drawn by `sampling.SubnetSampler`: random, MACs-uniform, ladder rungs or progressive
shrinking's phases) on the
largest subnet's soft predictions. Randomness is reseeded from (seed, epoch) at every epoch, so
a run resumed from its end-of-epoch checkpoint is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import typing
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Callable, Iterable, Mapping, Optional

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
from nestnas.supernet.sampling import DISTILL_FROM, SAMPLINGS, SCORE_ROWS, SubnetSampler, macs_uncountable

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

#: Learning-rate schedules after the linear warm-up: "cosine" (to zero), "linear" (to zero), "constant".
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class Recipe:
    """A family's default training recipe: what `train_supernet` (and `nestnas train`) use for
    every option the caller leaves out. `epochs=None` takes the family's `default_epochs`."""

    epochs: int | None = None
    lr: float = 4e-3
    weight_decay: float = 0.02
    schedule: str = "cosine"
    warmup: float = 0.05  # share of the optimiser steps
    clip_grad: float | None = None  # max gradient norm; None: no clipping
    batch_size: int = 64
    # which subnets a step trains and how they learn (`TrainOptions`; measured by tools/bench_quality.py)
    sampling: str = "uniform"
    progressive: bool = False
    distill_temperature: float = 1.0
    step_resolution: bool = False


#: Supernets trained from scratch (the built-in families).
SCRATCH = Recipe()
#: Pretrained encoders fine-tuned as supernets (InstaTune / BERT fine-tuning): AdamW at a small
#: rate, 10% warm-up then linear decay, gradients clipped at norm 1, 3 epochs.
FINE_TUNING = Recipe(epochs=3, lr=1e-4, weight_decay=0.01, schedule="linear", warmup=0.1, clip_grad=1.0,
                     batch_size=32)
RECIPES = {"scratch": SCRATCH, "fine-tuning": FINE_TUNING}
# Families trained from pretrained weights whose class does not declare `default_recipe`.
_PRETRAINED_FAMILIES = {"hf-encoder": "fine-tuning"}


def recipe_for(net: Supernet | type[Supernet]) -> Recipe:
    """The default recipe of `net`'s family: its class's `default_recipe` (a `Recipe` or a name
    in `RECIPES`) if it declares one, fine-tuning for pretrained families, else `SCRATCH`;
    `epochs` filled in from the family's `default_epochs` where the recipe leaves it open."""
    cls = net if isinstance(net, type) else type(net)
    recipe = getattr(cls, "default_recipe", None) or _PRETRAINED_FAMILIES.get(cls.family, SCRATCH)
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ConfigError(f"family {cls.family!r}: default_recipe {recipe!r} is not one of {sorted(RECIPES)}")
        recipe = RECIPES[recipe]
    if recipe.epochs is None:
        recipe = dataclasses.replace(recipe, epochs=cls.default_epochs)
    return recipe


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based) of `total`:
    linear warm-up over the first `warmup` steps ((step + 1) / warmup, so the first step
    already learns), then cosine or linear decay towards zero, or constant."""
    ramp = min(1.0, (step + 1) / warmup)
    if schedule == "cosine":  # as before schedules were selectable: decay counted from step 0
        return ramp * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if schedule == "linear":
        return ramp if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
    return ramp


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
    schedule: str = "cosine"
    clip_grad: Optional[float] = None
    sampling: str = "uniform"
    distill_temperature: float = 1.0
    distill_from: str = "largest"
    progressive: bool = False
    step_resolution: bool = False

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
        if self.weight_decay < 0:
            raise ConfigError(f"training option 'weight_decay' must be 0 or more, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"training option 'schedule' is {self.schedule!r}; allowed: {list(SCHEDULES)}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"training option 'warmup' (share of the steps) must be in [0, 1), got "
                              f"{self.warmup_fraction}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ConfigError(f"training option 'clip_grad' must be positive (or 0: no clipping), got "
                              f"{self.clip_grad}")
        for name, allowed in (("sampling", SAMPLINGS), ("distill_from", DISTILL_FROM)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"training option {name!r} is {getattr(self, name)!r}; allowed: {list(allowed)}")
        if not self.distill_temperature > 0:
            raise ConfigError(f"training option 'distill_temperature' must be positive, got {self.distill_temperature}")
        if self.sorted_ladder and (self.sampling != "uniform" or self.progressive):
            raise ConfigError("training option 'sorted_ladder' draws the ladder's rungs; it cannot be combined with "
                              f"sampling={self.sampling!r} or progressive shrinking")


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
    restarts: int = 0  # distributed training: times Ray Train restarted the workers from a checkpoint
    restart_epochs: list[int] = field(default_factory=list)  # the epoch each restart resumed from


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, batch: int | None = None,
                 temperature: float = 1.0) -> torch.Tensor:
    """In-place distillation: KL divergence from the teacher's soft predictions ("batchmean";
    with `batch`, summed and divided by `batch`, the global batch that this shard is part of).
    At `temperature` T both sides are softened by T and the loss scaled by T^2 (Hinton et al.),
    so gradients keep their size."""
    if temperature != 1.0:
        student, teacher = student / temperature, teacher / temperature
    log_p, q = F.log_softmax(student, dim=1), F.softmax(teacher, dim=1)
    loss = F.kl_div(log_p, q, reduction="batchmean") if batch is None else F.kl_div(log_p, q, reduction="sum") / batch
    return loss if temperature == 1.0 else loss * temperature ** 2


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, batch: int | None) -> torch.Tensor:
    return F.cross_entropy(logits, y) if batch is None else F.cross_entropy(logits, y, reduction="sum") / batch


def sandwich_backward(net: Supernet, inputs: list[tuple[SubnetConfig, torch.Tensor]], y: torch.Tensor,
                      distill: bool = True, scale: float = 1.0, batch: int | None = None,
                      temperature: float = 1.0, chain: bool = False) -> float:
    """Forward and backward of one sandwich step (gradients accumulate; no optimiser step).
    `inputs` pairs each subnet with its prepared batch; the first is the teacher, trained on
    the labels. Returns the teacher's loss. With `batch` (distributed training: `y` is one
    rank's shard of a global batch of that size), losses are sums over the shard divided by
    `batch`, so that the ranks' gradients summed are the global batch's gradient. With `chain`,
    each subnet learns from the one before it in `inputs` instead of from the first."""
    (config, x), rest = inputs[0], inputs[1:]
    logits = net(x, config)
    loss = _cross_entropy(logits, y, batch)
    (loss * scale).backward()
    teacher = logits.detach()
    for config, x in rest:
        out = net(x, config)
        student = distill_loss(out, teacher, batch, temperature) if distill else _cross_entropy(out, y, batch)
        (scale * student).backward()
        if chain:
            teacher = out.detach()
    return loss.item()


def make_optimizer(net: Supernet, opts: TrainOptions, batches_per_epoch: int):
    """(AdamW, its LambdaLR schedule) of a run of `opts` over `batches_per_epoch` batches an epoch."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    total = opts.epochs * math.ceil(batches_per_epoch / opts.grad_accum)
    warmup_steps = max(1, int(opts.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(opts.schedule, s, total, warmup_steps))
    return optimizer, scheduler


def train_epoch(net: Supernet, train_loader: DataLoader, opts: TrainOptions, epoch: int, optimizer, scheduler,
                sampler: SubnetSampler, on_batch: Callable[[int, list[float]], None] | None = None,
                shard: Callable[[Any, torch.Tensor], tuple[Any, torch.Tensor]] | None = None,
                reduce_grads: Callable[[], None] | None = None) -> list[float]:
    """One epoch (0-based `epoch`) of sandwich steps; returns the teacher's loss per batch.
    Randomness (loader order, subnets) comes from (seed, epoch) alone. Distributed training
    passes `shard` (a global batch to this rank's rows) and `reduce_grads` (sums the ranks'
    gradients before each optimiser step); every rank then draws the same subnets."""
    net.train()
    torch.manual_seed(_epoch_seed(opts.seed, epoch))
    rng = np.random.default_rng([opts.seed, epoch])
    losses: list[float] = []
    optimizer.zero_grad(set_to_none=True)
    with channels_last(net):  # faster backward of depthwise convolutions on CPU
        for i, (x, y) in enumerate(train_loader):
            configs = sampler.draw(epoch, rng, score=lambda cs, x=x, y=y: batch_losses(net, x, y, cs))
            batch = None
            if shard is not None:
                batch = len(y)
                x, y = shard(x, y)
            inputs = [(c, _as_channels_last(net.prepare_input(x, c))) for c in configs]
            losses.append(sandwich_backward(net, inputs, y, opts.distill, 1.0 / opts.grad_accum, batch,
                                            opts.distill_temperature, chain=opts.distill_from == "previous"))
            if (i + 1) % opts.grad_accum == 0 or i + 1 == len(train_loader):
                if reduce_grads is not None:
                    reduce_grads()
                if opts.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), opts.clip_grad)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if on_batch is not None:
                on_batch(i, losses)
    return losses


def batch_losses(net: Supernet, x: Any, y: torch.Tensor, configs: list[SubnetConfig]) -> list[float]:
    """Cross-entropy of each subnet on the first `SCORE_ROWS` rows of a batch, without gradients
    (what attentive sampling ranks its candidates by)."""
    x, y = _rows(x, SCORE_ROWS), y[:SCORE_ROWS]
    with torch.no_grad():
        return [F.cross_entropy(net(_as_channels_last(net.prepare_input(x, c)), c), y).item() for c in configs]


def _rows(x: Any, n: int) -> Any:
    if isinstance(x, dict):
        return {k: _rows(v, n) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_rows(v, n) for v in x)
    return x[:n] if isinstance(x, torch.Tensor) else x


@contextlib.contextmanager
def channels_last(net: torch.nn.Module):
    """4-D weights in channels-last layout for the duration: on CPU the backward of depthwise
    convolutions is 3x faster there (an epoch of the CNN family 1.6x). Outside, the module is
    back in the default layout, so evaluation, extraction and export see what they always saw."""
    if not any(p.dim() == 4 for p in net.parameters()):
        yield
        return
    net.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        net.to(memory_format=torch.contiguous_format)


def _as_channels_last(x: Any) -> Any:
    return x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.dim() == 4 else x



def validation_metrics(net: Supernet, val_loader: DataLoader, train_loader: DataLoader, seed: int) -> dict:
    """Validation accuracy of the largest and smallest subnets (batch norm recalibrated)."""
    return {f"val_acc_{name}": subnet_accuracy(net, config, val_loader, train_loader, seed=seed)
            for name, config in (("largest", net.space.largest()), ("smallest", net.space.smallest()))}


def train_state(epoch: int, opts: TrainOptions, history: list, optimizer, scheduler) -> dict[str, Any]:
    """The training state a checkpoint holds after `epoch` epochs (see `TrainStateSchema`)."""
    return {"epoch": epoch, "options": asdict(opts), "history": history,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def train_supernet(
    net: Supernet,
    train_loader: DataLoader,
    epochs: int | None = None,
    sandwich: int = 2,
    distill: bool = True,
    sorted_ladder: bool = False,
    grad_accum: int | None = None,
    seed: int = 0,
    callbacks: Iterable[Callback] = (),
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    schedule: str | None = None,
    warmup: float | None = None,
    clip_grad: float | None = None,
    accumulate: int | None = None,
    sampling: str | None = None,
    distill_temperature: float | None = None,
    distill_from: str = "largest",
    progressive: bool | None = None,
    step_resolution: bool | None = None,
    val_loader: DataLoader | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    data: Any = None,
    ray_address: str | None = None,
    workers: int = 1,
    max_failures: int = 3,
) -> TrainResult:
    """Train `net` in place with the sandwich rule.

    Options left out come from the family's recipe (`recipe_for(net)`: for the built-in
    families 4e-3, weight decay 0.02, cosine schedule, 5% warm-up, no clipping; for pretrained
    encoders `FINE_TUNING`). `schedule` is one of `SCHEDULES` after a linear warm-up over the
    share `warmup` of the optimiser steps; `clip_grad` the largest gradient norm (0: no
    clipping); `grad_accum` (or its alias `accumulate`) batches per optimiser step.

    Which subnets each step trains (each left None takes the family recipe's value): `sampling`
    ("uniform" choices, "macs" uniform in MACs, "log-macs" in log MACs, "attentive": the worst of
    equal-cost candidates on the step's batch),
    `sorted_ladder`, and `progressive` shrinking (`nestnas.supernet.sampling`); how they learn:
    `distill` from the largest's soft predictions at `distill_temperature`, or with
    `distill_from="previous"` each from the next larger subnet of the step.

    `callbacks` are called as ``cb(epoch, metrics)`` after every epoch. With `val_loader`, the
    largest and smallest subnets are evaluated each epoch (batch norm recalibrated on training
    batches). With `checkpoint`, the state is saved atomically after every epoch, and an
    existing checkpoint of the same run is resumed exactly when `resume` is true. `data` (a
    `nestnas.data.Data`) is recorded in the checkpoint; a resume on other data is refused.

    With `ray_address` (``local:N``, ``auto`` or ``HOST:PORT``), `workers` Ray Train workers
    share each global batch and give the same result as one process
    (`nestnas.supernet.distributed.train_distributed`, which also takes `max_failures`).
    """
    recipe = recipe_for(net)
    sampling, progressive = _sampling_defaults(net, recipe, sampling, progressive, sorted_ladder)
    if accumulate is not None and grad_accum is not None and accumulate != grad_accum:
        raise ConfigError(f"accumulate={accumulate} and grad_accum={grad_accum} name the same option; give one")
    opts = TrainOptions(
        recipe.epochs if epochs is None else epochs, sandwich, distill, sorted_ladder,
        grad_accum=next((v for v in (grad_accum, accumulate) if v is not None), 1),
        lr=recipe.lr if lr is None else lr, weight_decay=recipe.weight_decay if weight_decay is None else weight_decay,
        warmup_fraction=recipe.warmup if warmup is None else warmup, seed=seed,
        schedule=recipe.schedule if schedule is None else schedule,
        clip_grad=recipe.clip_grad if clip_grad is None else (clip_grad or None), sampling=sampling,
        distill_temperature=recipe.distill_temperature if distill_temperature is None else distill_temperature,
        distill_from=distill_from, progressive=progressive,
        step_resolution=recipe.step_resolution if step_resolution is None else step_resolution)
    if len(train_loader) == 0:
        raise ConfigError("the training loader yields no batches")
    if ray_address is not None:
        from nestnas.supernet.distributed import train_distributed  # imports Ray only when asked

        return train_distributed(net, train_loader, opts, address=ray_address, workers=workers,
                                 max_failures=max_failures, val_loader=val_loader, checkpoint=checkpoint,
                                 resume=resume, progress=progress, data=data, callbacks=callbacks)
    if workers != 1:
        raise ConfigError(f"workers={workers} needs a Ray cluster (ray_address= or --ray); one process trains alone")
    torch.manual_seed(seed)
    optimizer, scheduler = make_optimizer(net, opts, len(train_loader))
    result = TrainResult()
    start_epoch = 0
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        _check_resume_data(checkpoint, data)
        start_epoch = _resume(net, optimizer, scheduler, opts, checkpoint, result)

    sampler = SubnetSampler(net, opts)
    t0 = time.perf_counter()
    n_batches = opts.epochs * len(train_loader)
    with StageBar("train", progress) as bar:
        bar("", start_epoch * len(train_loader), n_batches)
        for epoch in range(start_epoch, opts.epochs):
            def on_batch(i, losses, epoch=epoch):
                bar(f"epoch {epoch + 1}/{opts.epochs} loss {np.mean(losses):.3f}", epoch * len(train_loader) + i + 1,
                    n_batches)

            losses = train_epoch(net, train_loader, opts, epoch, optimizer, scheduler, sampler, on_batch)
            metrics: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
            if val_loader is not None:
                metrics.update(validation_metrics(net, val_loader, train_loader, seed))
            result.history.append(metrics)
            if checkpoint is not None:
                save_checkpoint(net, checkpoint, train_state(epoch + 1, opts, result.history, optimizer, scheduler),
                                data=data)
            for cb in callbacks:
                cb(epoch + 1, metrics)
    result.seconds = time.perf_counter() - t0
    net.eval()
    return result


def _sampling_defaults(net, recipe: Recipe, sampling, progressive, sorted_ladder) -> tuple[str, bool]:
    """`sampling` and `progressive` where the caller left them None: the recipe's, except that a
    sorted ladder draws its own rungs (uniform, not progressive) and a family whose MACs cannot
    be counted samples choices uniformly instead of by MACs."""
    if sorted_ladder:
        return sampling or "uniform", bool(progressive)
    progressive = recipe.progressive if progressive is None else progressive
    if sampling is None:
        sampling = recipe.sampling
        if sampling != "uniform" and macs_uncountable(net):
            sampling = "uniform"
    return sampling, progressive


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
