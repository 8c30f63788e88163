"""Supernet training on a Ray cluster (Ray Train's `TorchTrainer`; gloo on CPUs, NCCL on GPUs).

Every rank runs `train.train_epoch` on the same data loader in the same order (the loader's
shuffle and the subnets come from the seeded (seed, epoch) generators), keeps its share of
each global batch (`torch.tensor_split` order), and draws the same subnets, so the sandwich
rule and in-place distillation mean what they mean on one process. Three things make N ranks
compute what one process computes on the whole batch:

- losses are sums over the shard divided by the global batch size, and the ranks' gradients are
  summed (one explicit all_reduce of the flattened gradients before each optimiser step), so
  the gradient is the global batch's mean cross entropy / "batchmean" KL gradient even when the
  shards are uneven. We do not use DDP (`prepare_model`): it averages instead of summing
  (wrong for uneven shards), reduces on every backward (a sandwich step has one per subnet),
  needs `find_unused_parameters` because a subnet leaves weights out, and renames the state
  dict (`module.`); one reduction per optimiser step is exact and cheaper;
- batch norm in training mode uses the global batch's statistics (`elastic.batch_norm_across`,
  an autograd all_reduce), active only inside this module's training loop;
- after each epoch rank 0 writes the same safetensors checkpoint `save_checkpoint` writes and
  reports it to Ray Train; a restarted worker group resumes from the last one, so a run that
  lost a worker finishes with the weights of one that did not.

Dropout (the pretrained encoders) draws other masks on a shard than on the whole batch, so those
families train equivalently but not bit for bit. Ray is imported only when this module trains.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from nestnas.errors import ClusterError, ConfigError
from nestnas.fileio import write_bytes
from nestnas.progress import StageBar
from nestnas.raycluster import cluster_cpus, connect, parse_address
from nestnas.supernet.base import Supernet
from nestnas.supernet.checkpoint import read_checkpoint, save_checkpoint
from nestnas.supernet.elastic import batch_norm_across
from nestnas.supernet.sampling import SubnetSampler
from nestnas.supernet.train import (
    TrainOptions,
    TrainResult,
    _check_resume_data,
    _resume,
    make_optimizer,
    train_epoch,
    train_state,
    validation_metrics,
)

CHECKPOINT_FILE = "supernet.safetensors"  # what `nestnas train --out` writes, inside each Ray checkpoint
PROGRESS_FILE = "progress.json"  # epoch and loss, read by the driver's progress bar
ATTEMPT_FILES = "attempt_*.json"  # one per start of the worker group, with the epoch it started from
POLL_S = 0.5


@dataclass(frozen=True)
class KillWorker:
    """Test hook (`train_distributed(fault=...)`): rank `rank` kills its own process with SIGKILL
    before batch `batch` (0-based) of epoch `epoch` (1-based), on the first attempt only, so
    that Ray Train's restart from the last checkpoint can be checked. It waits `delay_s` first:
    Ray Train registers a reported checkpoint when it next polls the workers (every 2 s), and a
    worker group lost before that restarts from the checkpoint before."""

    rank: int
    epoch: int
    batch: int = 0
    delay_s: float = 5.0

    def __call__(self) -> None:
        time.sleep(self.delay_s)
        os.kill(os.getpid(), signal.SIGKILL)


def train_distributed(net: Supernet, train_loader, opts: TrainOptions, *, address: str, workers: int = 1,
                      max_failures: int = 3, val_loader=None, checkpoint: str | os.PathLike | None = None,
                      resume: bool = True, progress: bool = True, data: Any = None, callbacks: Iterable = (),
                      threads: int = 1, fault: KillWorker | None = None) -> TrainResult:
    """Train `net` in place with `workers` Ray Train workers on the cluster at `address`
    (``local:N``, ``auto``, ``HOST:PORT``); the result equals `train_supernet`'s on one process.
    `checkpoint` is resumed (when `resume`) and rewritten after every epoch (from the checkpoint
    Ray Train registered) and at the end, in the one-process format, so a dead run resumes;
    Ray's own checkpoints live in a hidden folder next to it (or a temporary one) while the run
    lasts (on a multi-node cluster that folder must be on storage every node sees). Up to
    `max_failures` worker-group failures are survived. Each worker runs torch on `threads`
    threads. `callbacks` are called with each epoch's metrics once training has finished."""
    if isinstance(address, str):
        parse_address(address)  # a bad address is reported before any resume work
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a whole number of at least 1, got {workers!r}")
    if max_failures < -1:
        raise ConfigError(f"max_failures must be -1 (no limit) or more, got {max_failures}")
    if opts.sampling == "attentive":  # ranks scoring candidates apart could pick different subnets
        raise ConfigError("sampling 'attentive' trains in one process only; give another sampling for Ray training")
    optimizer, scheduler = make_optimizer(net, opts, len(train_loader))
    result = TrainResult()
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        _check_resume_data(checkpoint, data)
        _resume(net, optimizer, scheduler, opts, checkpoint, result)
    start_epoch = result.resumed_from_epoch
    if start_epoch >= opts.epochs:
        return result
    config = {
        "net": net, "loader": train_loader, "val_loader": val_loader, "opts": opts, "threads": threads,
        "data": data.record() if hasattr(data, "record") else data, "fault": fault,
        "start": train_state(start_epoch, opts, result.history, optimizer, scheduler) if start_epoch else None,
    }
    t0 = time.perf_counter()
    with connect(address) as ray:
        blob, starts = _fit(ray, config, workers, max_failures, checkpoint, progress, start_epoch)
    result.seconds = time.perf_counter() - t0
    if checkpoint is not None:
        write_bytes(checkpoint, blob)  # atomic; the very file rank 0 wrote
        payload = read_checkpoint(checkpoint)
    else:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / CHECKPOINT_FILE).write_bytes(blob)
            payload = read_checkpoint(Path(d) / CHECKPOINT_FILE)
    net.load_state_dict(payload["model"])
    net.eval()
    new = payload["train"]["history"][len(result.history):]
    result.history = list(payload["train"]["history"])
    result.restarts, result.restart_epochs = len(starts) - 1, starts[1:]
    for metrics in new:
        for cb in callbacks:
            cb(metrics["epoch"], metrics)
    return result


def _fit(ray, config: dict, workers: int, max_failures: int, checkpoint, progress: bool,
         start_epoch: int) -> tuple[bytes, list[int]]:
    """Run the trainer; (the last checkpoint file's bytes, the epoch each attempt started from)."""
    cpus = cluster_cpus(ray)
    if workers > cpus:
        raise ClusterError(f"--workers {workers} needs {workers} CPUs, but the Ray cluster has {cpus}")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = int(ray.cluster_resources().get("GPU", 0)) >= workers
    config["use_gpu"] = use_gpu
    if checkpoint is not None:
        out = Path(checkpoint).resolve()
        root, owned = out.parent / f".{out.name}.ray", False
    else:
        root, owned = Path(tempfile.mkdtemp(prefix="nestnas-ray-")), True
    name = f"train-{uuid.uuid4().hex[:8]}"
    config["run_dir"] = str(root / name)
    trainer = TorchTrainer(
        _worker, train_loop_config=config, torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name=name, storage_path=str(root), failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    try:
        outcome = _fit_with_progress(trainer, root / name, config["opts"].epochs, start_epoch, workers, progress,
                                     checkpoint)
        starts = [json.loads(p.read_text())["start_epoch"] for p in sorted((root / name).glob(ATTEMPT_FILES))]
        with outcome.checkpoint.as_directory() as d:
            return (Path(d) / CHECKPOINT_FILE).read_bytes(), starts
    finally:
        shutil.rmtree(root if owned else root / name, ignore_errors=True)
        if not owned and root.is_dir() and not any(root.iterdir()):
            root.rmdir()


def _fit_with_progress(trainer, run_dir: Path, epochs: int, start_epoch: int, workers: int, progress: bool,
                       checkpoint=None):
    """`trainer.fit()` in a thread while this one shows an epoch bar from the reported checkpoints
    and copies each new one to `checkpoint`, so that a killed driver resumes from its last epoch."""
    from ray.train import TrainingFailedError

    box: dict[str, Any] = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 -- handed to the calling thread
            box["error"] = exc

    thread = threading.Thread(target=fit, name="nestnas-ray-train", daemon=True)
    thread.start()
    with StageBar("train", progress) as bar:
        shown, copied = -1, start_epoch
        while thread.is_alive():
            thread.join(POLL_S)
            state = _latest_progress(run_dir)
            epoch = state["epoch"] if state else start_epoch
            if checkpoint is not None and state and epoch > copied:
                copied = epoch if _copy_checkpoint(run_dir / f"epoch_{epoch:05d}", checkpoint) else copied
            if progress and epoch != shown:
                shown = epoch
                loss = f" loss {state['loss']:.3f}" if state else ""
                bar(f"epoch {epoch}/{epochs}{loss} ({workers} workers)", epoch, epochs)
        error = box.get("error")
        if isinstance(error, TrainingFailedError):
            raise ClusterError(f"distributed training failed: {_root_cause(error)}") from None
        if error is not None:
            raise error
    return box["result"]


def _copy_checkpoint(folder: Path, checkpoint) -> bool:
    """Write the reported checkpoint in `folder` to `checkpoint` (atomic) once it reads whole."""
    from nestnas.errors import CheckpointError

    source = folder / CHECKPOINT_FILE
    try:
        read_checkpoint(source)  # Ray may still be copying it into storage
        write_bytes(checkpoint, source.read_bytes())
    except (OSError, CheckpointError):
        return False
    return True


def _latest_progress(run_dir: Path) -> dict | None:
    try:
        folders = sorted(p for p in run_dir.glob("epoch_*") if (p / PROGRESS_FILE).is_file())
        return json.loads((folders[-1] / PROGRESS_FILE).read_text()) if folders else None
    except (OSError, ValueError):  # a checkpoint being written or pruned
        return None


def _root_cause(error: Exception) -> str:
    failures = getattr(error, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) or getattr(error, "controller_failure", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    nestnas_line = next((line for line in reversed(lines) if "nestnas.errors." in line), None)
    return (nestnas_line or (lines[-1] if lines else type(cause).__name__))[:300]


# --- on each worker ---------------------------------------------------------------------------
def _rows(value, rank: int, size: int, device: torch.device):
    """This rank's rows of a batch (a tensor, or a tuple, list or dict of them)."""
    if isinstance(value, torch.Tensor):
        return torch.tensor_split(value, size)[rank].to(device)
    if isinstance(value, dict):
        return {k: _rows(v, rank, size, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rank, size, device) for v in value)
    raise ConfigError(f"a training batch of type {type(value).__name__} cannot be split across workers")


def _sum_gradients(net: torch.nn.Module) -> None:
    """Sum the ranks' gradients in one collective (every rank trained the same subnets, so the
    same parameters have gradients)."""
    import torch.distributed as dist

    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, part in zip(grads, torch.split(flat, [g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def _worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    net, opts, loader = config["net"].to(device), config["opts"], config["loader"]
    optimizer, scheduler = make_optimizer(net, opts, len(loader))
    start = _restore(net, optimizer, scheduler, opts, config["start"])
    start_epoch, history = (start["epoch"], list(start["history"])) if start else (0, [])
    attempt = _attempt(Path(config["run_dir"]), rank, start_epoch, device)
    sampler = SubnetSampler(net, opts)
    fault = config["fault"]
    with batch_norm_across(all_reduce):
        for epoch in range(start_epoch, opts.epochs):
            on_batch = None
            if fault is not None and attempt == 0 and rank == fault.rank and epoch + 1 == fault.epoch:
                def on_batch(i, losses):  # after batch i: the kill falls before batch fault.batch
                    if i + 1 == fault.batch:
                        fault()
                if fault.batch == 0:
                    fault()
            losses = train_epoch(net, loader, opts, epoch, optimizer, scheduler, sampler, on_batch,
                                 shard=lambda x, y: (_rows(x, rank, size, device), _rows(y, rank, size, device)),
                                 reduce_grads=lambda: _sum_gradients(net))
            total = torch.tensor(losses, dtype=torch.float64, device=device)
            dist.all_reduce(total)  # each rank's losses are its share of the global batch's mean
            metrics: dict[str, Any] = {"epoch": epoch + 1, "loss": float(total.mean())}
            if config["val_loader"] is not None and rank == 0:
                on_cpu = net if device.type == "cpu" else _cpu_copy(net)
                metrics.update(validation_metrics(on_cpu, config["val_loader"], loader, opts.seed))
            history.append(metrics)
            _report(net, opts, history, optimizer, scheduler, config["data"], rank, {**metrics, "attempt": attempt})


def _cpu_copy(net):
    import copy

    return copy.deepcopy(net).cpu()


def _attempt(run_dir: Path, rank: int, start_epoch: int, device) -> int:
    """Number this start of the worker group (0: the first) and record the epoch it starts from;
    counted on the run's storage by rank 0 and broadcast, so that every rank agrees."""
    import torch.distributed as dist

    n = torch.zeros(1, dtype=torch.int64, device=device)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        n += len(list(run_dir.glob(ATTEMPT_FILES)))
        (run_dir / f"attempt_{int(n):04d}.json").write_text(json.dumps({"start_epoch": start_epoch}))
    dist.broadcast(n, 0)
    return int(n)


def _restore(net, optimizer, scheduler, opts, start):
    """The state to start from: Ray's last checkpoint after a restart, else the state the driver
    resumed from `checkpoint` (None: a fresh run)."""
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is None:
        if start is not None:
            optimizer.load_state_dict(start["optimizer"])
            scheduler.load_state_dict(start["scheduler"])
        return start
    with restored.as_directory() as d:
        result = TrainResult()
        _resume(net, optimizer, scheduler, opts, Path(d) / CHECKPOINT_FILE, result)
    return {"epoch": result.resumed_from_epoch, "history": result.history}


def _report(net, opts, history, optimizer, scheduler, data, rank: int, record: dict) -> None:
    """Report the epoch to Ray Train; rank 0 adds the checkpoint (every rank holds the same state)."""
    import ray.train

    epoch = record["epoch"]
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            save_checkpoint(net, Path(d) / CHECKPOINT_FILE, train_state(epoch, opts, history, optimizer, scheduler),
                            data=data)
            (Path(d) / PROGRESS_FILE).write_text(json.dumps(record, allow_nan=True))
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))}, checkpoint=ckpt,
                         checkpoint_dir_name=f"epoch_{epoch:05d}")


