"""`nestnas` command line: a thin Typer shell over the library.

User errors (NestnasError) become one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from nestnas import __version__
from nestnas.errors import ConfigError, NestnasError
from nestnas.fileio import check_output, check_outputs
from nestnas.progress import SearchProgress, StageBar
from nestnas.supernet.families import DEFAULT_FAMILY, family_names

app = typer.Typer(
    name="nestnas", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Hardware-aware subnetwork search over weight-sharing supernets, with a compiler bridge.",
)
console = Console()
err_console = Console(stderr=True)
# Typer has vendored click since 0.20; take its base class from Typer itself so either works.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

# numpy and scikit-learn take seeds in [0, 2**32 - 1]
Seed = Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of every random choice (results reproduce "
                                                              "bit for bit).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
DataOpt = Annotated[Optional[str], typer.Option(
    "--data", help="Data: digits, a folder of class sub-folders, FILE.npz, FILE.csv:label=COLUMN or "
                   "package.module:function (see the README) \\[default: the data the checkpoint was trained on].",
    show_default=False)]
Family = Annotated[str, typer.Option(help=f"Supernet family: {' or '.join(family_names())}.")]


def _version(value: bool) -> None:
    if value:
        print(f"nestnas {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Hardware-aware subnetwork search over weight-sharing supernets, with a compiler bridge."""


def _report(summary: dict, as_json: bool, line: str) -> None:
    """Machine-readable JSON on stdout, or one human line."""
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(line)


def _read_config(text: str, space):
    """A config of `space` given inline as JSON or as the path of a JSON file."""
    from nestnas.supernet.config import SubnetConfig

    where = "--config"
    try:
        if text.lstrip().startswith("{"):
            return space.validate(SubnetConfig.from_json(text))
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"{text!r} is neither inline JSON nor an existing file")
        where = f"--config {path}"
        return space.validate(SubnetConfig.from_json(path.read_text()))
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not a JSON text file") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Checkpoint file to write (resumed if it exists).")],
    family: Annotated[Optional[str], typer.Option(
        help=f"Supernet family: {' or '.join(family_names())} \\[default: {DEFAULT_FAMILY}; hf-encoder with "
             "--model].", show_default=False)] = None,
    model: Annotated[Optional[Path], typer.Option(
        help="A pretrained transformers model folder (save_pretrained: BERT, RoBERTa, DistilBERT, ViT) to "
             "fine-tune as a supernet (family hf-encoder); text data is tokenised with its own tokenizer.",
        show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Training epochs \\[default: the family's recipe; 3 "
                                                              "when fine-tuning --model].", show_default=False)] = None,
    sandwich: Annotated[int, typer.Option(min=0,
                                          help="Subnets trained per step besides the largest and smallest.")] = 2,
    distill: Annotated[bool, typer.Option(help="Train subnets on the largest subnet's soft predictions.")] = True,
    sorted_ladder: Annotated[bool, typer.Option(help="Draw subnets from a sorted ladder of nested subnets "
                                                     "(SortedNet) instead of at random.")] = False,
    sampling: Annotated[Optional[str], typer.Option(
        help="How the random subnets are drawn: uniform (every choice uniform), macs (uniform in MACs), "
             "log-macs (uniform in log MACs) or attentive (of 3 candidates at one log-MACs target, the one with "
             "the highest loss on the step's batch; one process only); default: the family recipe's")] = None,
    progressive: Annotated[Optional[bool], typer.Option(
        "--progressive/--no-progressive", help="Progressive shrinking (Once-for-All): the largest alone, then "
                                               "elastic kernel, depth and width in phases; default: the family "
                                               "recipe's")] = None,
    distill_temperature: Annotated[Optional[float], typer.Option(
        help="Temperature of the distillation loss; default: the family recipe's")] = None,
    step_resolution: Annotated[Optional[bool], typer.Option(
        "--step-resolution/--no-step-resolution", help="Run every subnet of a step at one input size drawn for the "
                                                       "step (Once-for-All); default: the family recipe's")] = None,
    distill_from: Annotated[str, typer.Option(help="Teacher of each subnet: largest, or previous (the next larger "
                                                   "subnet of the step).")] = "largest",
    grad_accum: Annotated[int, typer.Option("--grad-accum", "--accumulate", min=1,
                                            help="Batches per optimiser step (gradient accumulation).")] = 1,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Training batch size \\[default: 64; 32 when "
                                                                  "fine-tuning --model].", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="Peak learning rate of AdamW \\[default: 4e-3; 1e-4 "
                                                              "when fine-tuning --model].", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(min=0.0, help="AdamW weight decay \\[default: 0.02; 0.01 "
                                                                        "when fine-tuning --model].",
                                                          show_default=False)] = None,
    schedule: Annotated[Optional[str], typer.Option(help="Learning-rate schedule after the warm-up: cosine, linear or "
                                                         "constant \\[default: cosine; linear when fine-tuning "
                                                         "--model].", show_default=False)] = None,
    warmup: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, help="Share of the optimiser steps spent "
                                                                            "warming the learning rate up linearly "
                                                                            "\\[default: 0.05; 0.1 when fine-tuning "
                                                                            "--model].", show_default=False)] = None,
    clip_grad: Annotated[Optional[float], typer.Option(min=0.0, help="Largest gradient norm, 0 for no clipping "
                                                                     "\\[default: 0; 1.0 when fine-tuning --model].",
                                                       show_default=False)] = None,
    max_length: Annotated[Optional[int], typer.Option(min=2, help="Tokens per text sample, padded or truncated "
                                                                  "\\[default: min(128, the model's positions)].",
                                                      show_default=False)] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT if it holds an unfinished run.")] = True,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Data: digits, a folder of class sub-folders, FILE.npz, FILE.csv:label=COLUMN, text as "
                       "FILE.csv:text=COLUMN,label=COLUMN or FILE.jsonl (with --model), or package.module:function "
                       "(see the README) \\[default: digits; required with --model].", show_default=False)] = None,
    seed: Seed = 0,
    ray: Annotated[Optional[str], typer.Option(help="Train on a Ray cluster with Ray Train: auto, HOST:PORT or "
                                                    "local:N (a private one with N CPUs); needs the ray extra.",
                                               show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(help="With --ray: training workers sharing each batch "
                                                        "\\[default: 1].", show_default=False)] = None,
    as_json: AsJson = False,
) -> None:
    """Train a supernet on a data set (default: the embedded digits), or fine-tune a pretrained
    transformers model folder as one (--model), and write a checkpoint that records the data."""
    check_output(out, "--out")
    if workers is not None and ray is None:
        raise ConfigError("--workers needs --ray (the Ray cluster whose workers train)")
    if ray is not None:
        from nestnas.raycluster import parse_address, require_ray

        parse_address(ray, "--ray")
        require_ray("--ray")
        if workers is not None and workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
    import torch

    from nestnas.supernet import SearchSpace, build_supernet
    from nestnas.supernet.data import load_data
    from nestnas.supernet.evaluate import subnet_accuracy
    from nestnas.supernet.families import supernet_class
    from nestnas.supernet.train import recipe_for, train_supernet

    torch.manual_seed(seed)
    if model is not None:
        if family not in (None, PRETRAINED_FAMILY):
            raise ConfigError(f"--family {family} cannot be fine-tuned from --model; a model folder becomes the "
                              f"{PRETRAINED_FAMILY} family (leave --family out)")
        family = PRETRAINED_FAMILY
        recipe = recipe_for(supernet_class(family))
        net, dataset, (train_loader, val_loader) = _pretrained_supernet(model, data, max_length, seed,
                                                                        batch_size or recipe.batch_size)
        space = net.space
    else:
        if max_length is not None:
            raise ConfigError("--max-length applies to text data, which needs the model folder that tokenises it "
                              "(--model DIR)")
        family = family or DEFAULT_FAMILY
        space = SearchSpace.for_family(family)
        recipe = recipe_for(supernet_class(family))
        dataset = load_data(data or "digits", space, seed=seed)
        train_loader, val_loader = dataset.loaders(batch_size or recipe.batch_size)
        net = build_supernet(space, **dataset.spec_for(space))
    epochs = epochs or recipe.epochs
    result = train_supernet(net, train_loader, epochs, sandwich=sandwich, distill=distill,
                            sorted_ladder=sorted_ladder, grad_accum=grad_accum, seed=seed, lr=lr,
                            sampling=sampling, progressive=progressive, distill_temperature=distill_temperature,
                            step_resolution=step_resolution,
                            distill_from=distill_from,
                            weight_decay=weight_decay, schedule=schedule, warmup=warmup, clip_grad=clip_grad,
                            checkpoint=out, resume=resume, progress=not as_json, data=dataset, ray_address=ray,
                            workers=workers or 1)
    summary = {
        "checkpoint": str(out), "family": family, "epochs": epochs, "train_seconds": result.seconds,
        "data": dataset.spec, "sample_shape": list(dataset.sample_shape), "num_classes": dataset.num_classes,
        "resumed_from_epoch": result.resumed_from_epoch, "workers": workers or 1, "restarts": result.restarts,
        "val_acc_largest": subnet_accuracy(net, space.largest(), val_loader, train_loader, seed=seed),
        "val_acc_smallest": subnet_accuracy(net, space.smallest(), val_loader, train_loader, seed=seed),
    }
    if model is not None:
        summary.update(model=str(model), classes=list(dataset.classes or ()))
    _report(summary, as_json, f"checkpoint {out}: largest {100 * summary['val_acc_largest']:.2f}%, "
                              f"smallest {100 * summary['val_acc_smallest']:.2f}% validation accuracy "
                              f"({result.seconds:.0f} s of training)")


#: The family a pretrained model folder becomes (`nestnas train --model`).
PRETRAINED_FAMILY = "hf-encoder"


def _pretrained_supernet(model: Path, data: str | None, max_length: int | None, seed: int, batch_size: int):
    """(supernet, data, loaders) of a pretrained model folder: the folder loaded, the data read
    (text tokenised with the folder's own tokenizer), the model made elastic with its heads and
    neurons ranked on a few training batches."""
    from nestnas.supernet.data import load_data, parse_spec
    from nestnas.supernet.hf_encoder import elasticize, load_pretrained, pretrained_space

    if data is None:
        raise ConfigError("--model needs --data: the task to fine-tune on, e.g. FILE.csv:text=COLUMN,label=COLUMN "
                          "or FILE.jsonl")
    text = parse_spec(data).kind == "text"
    if max_length is not None and not text:
        raise ConfigError(f"--max-length applies to text data; --data {data} is not text")
    pretrained = load_pretrained(model)
    space = pretrained_space(pretrained)  # the model's image size, and whether it takes text or images
    dataset = load_data(data, space, seed=seed, model=model, max_length=max_length)
    dataset.spec_for(space)  # data of the wrong kind for this model: one line, before any ranking
    loaders = dataset.loaders(batch_size)
    # text subnets run at a quarter, half and all of the data's padded length
    seq_lens = sorted({max(1, round(dataset.sample_shape[1] * f)) for f in (0.25, 0.5, 1.0)}) if text else None
    net = elasticize(pretrained, loaders[0], num_labels=dataset.num_classes, seq_len_choices=seq_lens,
                     source=str(model.resolve()))
    return net, dataset, loaders


@app.command("eval")
def eval_(
    checkpoint: Annotated[Path, typer.Option(help="Supernet checkpoint (from `nestnas train`).")],
    config: Annotated[Optional[str], typer.Option(help="Subnet config as inline JSON or a JSON file; "
                                                       "default: largest and smallest.")] = None,
    data: DataOpt = None,
    seed: Seed = 0,
    as_json: AsJson = False,
) -> None:
    """Shared-weight accuracy (batch norm recalibrated), params and MACs of subnets of a checkpoint,
    on the validation split of its data (or of --data)."""
    from nestnas.report import describe_subnet, subnet_table
    from nestnas.supernet.checkpoint import load_supernet
    from nestnas.supernet.data import data_for_checkpoint

    net = load_supernet(checkpoint)
    space = net.space
    if config is not None:
        picks = [("config", _read_config(config, space))]
    else:
        picks = [("largest", space.largest()), ("smallest", space.smallest())]
    dataset = data_for_checkpoint(net, checkpoint, data, seed=seed)
    train_loader, val_loader = dataset.loaders(64)
    rows = [(name, describe_subnet(net, c, val_loader, train_loader, seed)) for name, c in picks]
    if as_json:
        print(json.dumps({name: r for name, r in rows}, indent=2))
    else:
        console.print(subnet_table(f"{checkpoint} on {dataset.name}", rows))


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Folder for the checkpoint and results.")] = Path("nestnas-quickstart"),
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Supernet training epochs \\[default: 8].",
                                                  show_default=False)] = None,
    profile_samples: Annotated[int, typer.Option(min=8, help="Subnets to profile on ONNX Runtime.")] = 48,
    search_evals: Annotated[int, typer.Option(min=16, help="Subnets the search evaluates on shared "
                                                           "weights.")] = 96,
    tune_trials: Annotated[int, typer.Option(min=0, help="TVM tuning trials per workload for the exported "
                                                         "bundle (0: untuned).")] = 4,
    tune_seconds: Annotated[float, typer.Option(min=1, help="Stop tuning new TVM workloads (heaviest go "
                                                            "first) after this many seconds.")] = 10.0,
    seed: Seed = 0,
    as_json: AsJson = False,
) -> None:
    """Run every stage of the pipeline on scikit-learn's digits: train, profile this CPU and a
    second device (ONNX Runtime at one thread) by transfer from 20 subnets, fit, search one front
    per device in one run, export (under 5 minutes on 2 cores)."""
    check_output(out, "--out", kind="dir")
    from nestnas.quickstart import run_quickstart
    from nestnas.supernet.train import DEFAULT_EPOCHS

    summary = run_quickstart(out, epochs=epochs or DEFAULT_EPOCHS[DEFAULT_FAMILY], seed=seed,
                             profile_samples=profile_samples,
                             search_evals=search_evals, tune_trials=tune_trials, tune_seconds=tune_seconds,
                             console=Console(stderr=True) if as_json else console,
                             progress=not as_json)
    if as_json:
        print(json.dumps(summary, indent=2))


def _parse_resolutions(text: str | None, family: str) -> dict:
    if text is None:
        return {}
    from nestnas.supernet import SearchSpace

    def has_resolution(name: str) -> bool:
        return "resolution_choices" in {f.name for f in dataclasses.fields(type(SearchSpace.for_family(name)))}

    if not has_resolution(family):
        names = [name for name in family_names() if has_resolution(name)]
        raise ConfigError(f"--resolution applies to the {' and '.join(names)} family only")
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise ConfigError(f"--resolution: expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 4:
        raise ConfigError(f"--resolution: resolutions must be at least 4, got {text!r}")
    return {"resolution_choices": values}


def _profiled_space(family: str | None, resolution: str | None, model: Path | None, checkpoint: Path | None):
    """(family, space, spec) that `profile` measures: a built-in space (and the constructor's
    default spec), or the space and spec of a model folder or of a checkpoint."""
    from nestnas.supernet import SearchSpace

    if model is None and checkpoint is None:
        family = family or DEFAULT_FAMILY
        return family, SearchSpace.for_family(family, **_parse_resolutions(resolution, family)), None
    if model is not None and checkpoint is not None:
        raise ConfigError("give --model or --checkpoint, not both")
    option = "--model" if model is not None else "--checkpoint"
    if resolution is not None:
        raise ConfigError(f"--resolution sets a built-in space; with {option} the space is the "
                          f"{'model' if model is not None else 'checkpoint'}'s")
    if model is not None:
        from nestnas.supernet.hf_encoder import FAMILY, elasticize, load_pretrained

        if family not in (None, FAMILY):
            raise ConfigError(f"--family {family}: a model folder (--model) makes a {FAMILY!r} supernet "
                              "(leave --family out)")
        # Latency does not depend on the weights: no ranking (the profiler builds from the spec).
        net = elasticize(load_pretrained(model), rank=False)
    else:
        from nestnas.supernet.checkpoint import load_supernet

        net = load_supernet(checkpoint)
    if family is not None and family != net.family:
        raise ConfigError(f"--family {family}: {option} {checkpoint} is a {net.family!r} supernet "
                          "(leave --family out)")
    return net.family, net.space, net.spec()


@app.command()
def profile(
    backend: Annotated[str, typer.Option(help="Runtime to measure on: onnxruntime or tvm.")] = "onnxruntime",
    family: Annotated[Optional[str], typer.Option(
        help=f"Supernet family: {' or '.join(family_names())} \\[default: {DEFAULT_FAMILY}; hf-encoder with "
             "--model; the checkpoint's with --checkpoint].", show_default=False)] = None,
    model: Annotated[Optional[Path], typer.Option(
        help="A pretrained transformers model folder (BERT, RoBERTa, DistilBERT, ViT): profile the hf-encoder "
             "supernet made from it (its space and sizes; latency does not depend on the weights).",
        show_default=False)] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        help="A supernet checkpoint (any family): profile its space and model spec, so that the profile fits "
             "searches of it (e.g. a fine-tuned --model with its own number of labels).",
        show_default=False)] = None,
    resolution: Annotated[Optional[str], typer.Option(help="CNN input resolutions to profile, comma-separated "
                                                           "\\[default: the space's own].")] = None,
    samples: Annotated[int, typer.Option(help="Subnets to measure (space-filling sample): 2 to the space's "
                                              "number of distinct subnets, at most 10000.")] = 200,
    name: Annotated[str, typer.Option(help="Device name recorded in the profile.")] = "local",
    out: Annotated[Optional[Path], typer.Option(help="Profile file to write (resumed if it exists) "
                                                     "\\[default: ~/.nestnas/profiles/NAME-BACKEND-FAMILY.json].",
                                                show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Input batch size, 1 to 1024 \\[default: the smallest "
                                                           "power of two at which the smallest subnet takes 0.5 ms].",
                                                      show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option(help="Runtime threads, 1 to 256 \\[default: all cores].",
                                                   show_default=False)] = None,
    blocks: Annotated[Optional[bool], typer.Option(help="Also measure every distinct block for the lookup-table "
                                                        "predictor \\[default: yes; no with --transfer].",
                                                   show_default=False)] = None,
    transfer: Annotated[bool, typer.Option(help="Transfer profile: measure only --samples informative subnets "
                                                "(e.g. 20) and fit this device's latency from them with every "
                                                "shipped and user profile of the same space as priors.")] = False,
    prior: Annotated[Optional[list[Path]], typer.Option(help="With --transfer: a prior profile to add to the "
                                                             "discovered ones (repeatable).", metavar="FILE",
                                                        show_default=False)] = None,
    remeasure_unstable: Annotated[bool, typer.Option(help="On resume, measure again what was flagged as too "
                                                          "noisy (after everything missing).")] = True,
    passes: Annotated[Optional[int], typer.Option(help="Sweeps over all subnets and blocks, 1 to 10; each "
                                                  "subnet keeps the median of its passes, which averages out the "
                                                  "host's drift \\[default: 2 on onnxruntime, 1 on tvm].",
                                                  show_default=False)] = None,
    exporter: Annotated[str, typer.Option(help="ONNX exporter of the measured graphs: torchscript (fast) or "
                                               "dynamo (what bundles ship; use it for TVM profiles that should "
                                               "predict exported artifacts).")] = "torchscript",
    max_minutes: Annotated[Optional[float], typer.Option(help="Time budget of this run in minutes: it stops after "
                                                              "the measurement during which the budget ran out and "
                                                              "saves an incomplete profile that rerunning the same "
                                                              "command continues; retries stop once half of it is "
                                                              "gone. Exit code 0 with a warning line if the profile "
                                                              "has the 7 subnets `nestnas fit` needs, else 1 "
                                                              "\\[default: no budget].", show_default=False)] = None,
    seed: Seed = 0,
    ray: Annotated[Optional[str], typer.Option(help="Measure on device agents of this Ray cluster (`nestnas agent`): "
                                                    "HOST:PORT or auto; needs --device and the ray extra.",
                                               show_default=False)] = None,
    device: Annotated[Optional[list[str]], typer.Option(
        help="With --ray: the device (its agent's `--device NAME`) to profile; repeat it to profile several in "
             "parallel, and --out is then a folder holding DEVICE-BACKEND-FAMILY.json for each \\[default: "
             "~/.nestnas/profiles]. The profile records the agent's fingerprint.", metavar="NAME",
        show_default=False)] = None,
    as_json: AsJson = False,
) -> None:
    """Measure subnets of a search space on this device, or on device agents with --ray (resumable;
    saved after every measurement) and report unstable measurements, retries and how busy the host was."""
    from nestnas.errors import ProfileError
    from nestnas.hw_profiles.devices import default_profile_path
    from nestnas.hw_profiles.profiler import profile_device

    if device and ray is None:
        raise ConfigError("--device needs --ray (the Ray cluster whose agents measure)")
    if ray is not None:
        _profile_on_farm(ray, device or [], backend=backend, family=family, resolution=resolution, model=model,
                         checkpoint=checkpoint, samples=samples, out=out, batch_size=batch_size, threads=threads,
                         blocks=blocks, transfer=transfer, prior=prior, remeasure_unstable=remeasure_unstable,
                         passes=passes, exporter=exporter, max_minutes=max_minutes, seed=seed, as_json=as_json)
        return
    family, space, spec = _profiled_space(family, resolution, model, checkpoint)
    out = out or default_profile_path(name, backend, family)
    check_output(out, "--out")
    if prior and not transfer:
        raise ConfigError("--prior applies to a transfer profile: add --transfer")
    priors = None
    if transfer:
        from nestnas.hw_profiles.transfer import discover_priors

        priors = [*discover_priors(space, exclude=out), *(prior or [])] if prior else True
    with StageBar("profile", not as_json, err_console) as bar:
        result = profile_device(space, backend, samples, seed, out=out, name=name, spec=spec, batch_size=batch_size,
                                threads=threads, blocks=blocks, remeasure_unstable=remeasure_unstable,
                                passes=passes, exporter=exporter, progress=bar, max_minutes=max_minutes,
                                transfer=priors)
    run = result.meta["last_run"]
    medians = sorted(m.median_ms for m in result.measurements.values())
    flagged = sum(not m.stable for m in result.measurements.values())
    summary = {"profile": str(out), "backend": backend, "family": family, "subnets": len(result.measurements),
               "blocks": len(result.blocks), "batch_size": result.batch_size, "flagged_unstable": flagged,
               "min_ms": medians[0] if medians else None, "max_ms": medians[-1] if medians else None,
               "subnet_seconds": result.meta.get("subnet_seconds"), "block_seconds": result.meta.get("block_seconds"),
               **run}
    kind_note = ""
    if "transfer" in result.meta:
        summary["transfer"] = result.meta["transfer"]
        kind_note = (f" (transfer profile; priors: "
                     f"{', '.join(p['name'] for p in result.meta['transfer']['priors'])})")
    span = f"{medians[0]:.3f} to {medians[-1]:.3f} ms" if medians else "no subnet yet"
    _report(summary, as_json, f"profile {out}{kind_note}: {summary['subnets']} subnets, {summary['blocks']} blocks "
                              f"at batch {summary['batch_size']}; {span}; {flagged} flagged as unstable")
    if not run["complete"]:
        progress = (f"the {max_minutes:g}-minute budget ran out after {run['done']} of {run['total']} measurements; "
                    f"{out} is incomplete (rerun the same command to continue)")
        if not run["usable"]:  # the one line of an error, as for any other failure
            raise ProfileError(f"{progress}; nothing usable yet: {summary['subnets']} subnets measured, "
                               "`nestnas fit` needs 7")
    loads = f"{run['load_start']} at start, {run['load_end']} at end" if run["load_start"] is not None else "unknown"
    notes = [f"this run: {run['measured']} measurements in {run['seconds']:.0f} s, {run['unstable']} unstable "
             f"(hit the retry cap), {run['retries']} retries, {run['first_attempt_only']} accepted at the first "
             f"attempt to save the budget; load average {loads} on {run['cores']} cores"]
    if run["busy"]:
        notes.append(f"warning: the host was busy ({run['busy_reason']}): latencies may be inflated and noisy; "
                     "profile on a quiet machine for a profile to trust")
    if not run["complete"]:
        notes.append(f"warning: {progress}; its {summary['subnets']} subnets are usable")
    for note in notes:  # the report on stdout with the summary; warnings on stderr, --json or not
        if note.startswith("warning:"):
            err_console.print(note, markup=False, highlight=False, soft_wrap=True)
        elif not as_json:
            console.print(note, markup=False, highlight=False)


def _profile_on_farm(ray: str, device: list[str], *, backend, family, resolution, model, checkpoint, samples, out,
                     batch_size, threads, blocks, transfer, prior, remeasure_unstable, passes, exporter, max_minutes,
                     seed, as_json) -> None:
    """`nestnas profile --ray ADDRESS --device NAME...`: one profile per device, measured on its agent."""
    from nestnas.hw_profiles.farm import check_device_name, profile_devices, profile_path
    from nestnas.raycluster import parse_address, require_ray

    parse_address(ray, "--ray")
    if not device:
        raise ConfigError("--ray needs --device NAME (a device whose agent runs `nestnas agent`); "
                          "`nestnas devices --ray ADDRESS` lists them")
    for d in device:
        check_device_name(d)
    require_ray("--ray")
    family, space, spec = _profiled_space(family, resolution, model, checkpoint)
    several = len(device) > 1
    if several and out is not None and out.suffix == ".json":
        raise ConfigError(f"--out {out}: with several --device, --out is a folder (one DEVICE-BACKEND-FAMILY.json "
                          "each)")
    outs = {d: profile_path(out, d, backend, family, several) for d in device}
    for path in outs.values():
        check_output(path, "--out")
    if prior and not transfer:
        raise ConfigError("--prior applies to a transfer profile: add --transfer")
    priors = None
    if transfer:
        from nestnas.hw_profiles.transfer import discover_priors

        priors = [*discover_priors(space), *(prior or [])] if prior else True
    with StageBar("profile", not as_json and not several, err_console) as bar:
        def progress(dev: str, text: str, done: int, total: int) -> None:
            if several and not as_json:
                err_console.print(f"{dev}: {done}/{total} {text}", markup=False, highlight=False)
            else:
                bar(text, done, total)

        results = profile_devices(ray, device, outs, backend=backend, exporter=exporter, threads=threads,
                                  progress=progress, space=space, n_samples=samples, seed=seed, spec=spec,
                                  batch_size=batch_size, blocks=blocks, remeasure_unstable=remeasure_unstable,
                                  passes=passes, max_minutes=max_minutes, transfer=priors)
    summaries = []
    for d in device:
        result = results[d]
        medians = sorted(m.median_ms for m in result.measurements.values())
        summaries.append({"device": d, "profile": str(outs[d]), "backend": backend, "family": family,
                          "subnets": len(result.measurements), "blocks": len(result.blocks),
                          "batch_size": result.batch_size, "min_ms": medians[0] if medians else None,
                          "max_ms": medians[-1] if medians else None, "complete": result.complete,
                          "fingerprint": result.fingerprint})
    if as_json:
        print(json.dumps(summaries, indent=2))
        return
    for s in summaries:
        span = f"{s['min_ms']:.3f} to {s['max_ms']:.3f} ms" if s["min_ms"] is not None else "no subnet yet"
        console.print(f"profile {s['profile']} (device {s['device']}, on {s['fingerprint'].get('cpu')}): "
                      f"{s['subnets']} subnets, {s['blocks']} blocks at batch {s['batch_size']}; {span}"
                      + ("" if s["complete"] else "; incomplete (rerun the same command to continue)"),
                      markup=False, highlight=False)


@app.command()
def agent(
    address: Annotated[str, typer.Option(help="The Ray cluster to join: HOST:PORT of its head, or auto.")],
    device: Annotated[str, typer.Option(help="Device name this agent advertises (resource device:NAME); "
                                             "`nestnas profile --ray ADDRESS --device NAME` measures here.")],
    backend: Annotated[str, typer.Option(help="Runtime it measures on: onnxruntime or tvm.")] = "onnxruntime",
    threads: Annotated[Optional[int], typer.Option(help="Runtime threads, 1 to 256 \\[default: all cores this "
                                                        "process may use].", show_default=False)] = None,
) -> None:
    """Join a Ray cluster as a measuring device agent until Ctrl-C or SIGTERM (then leave it cleanly)."""
    import os

    from nestnas.hw_profiles.farm import run_agent

    if threads is None and hasattr(os, "sched_getaffinity"):
        threads = len(os.sched_getaffinity(0))  # `taskset` pins an agent to its cores

    def ready(info: dict) -> None:
        fp = info["fingerprint"]
        err_console.print(f"agent {device} up: {info['backend']} {fp.get('version')} with {info['threads']} threads "
                          f"on {fp.get('cpu')} (cpus {fp.get('cpu_affinity')}), nestnas {info['version']}; Ctrl-C "
                          "stops it", markup=False, highlight=False)

    run_agent(address, device, backend=backend, threads=threads, ready=ready)


@app.command()
def devices(
    as_json: AsJson = False,
    ray: Annotated[Optional[str], typer.Option(help="List the device agents that are up on this Ray cluster "
                                                    "(HOST:PORT or auto) instead of the profiles.",
                                               show_default=False)] = None,
) -> None:
    """List the device profiles shipped with nestnas and your own (~/.nestnas/profiles), or with
    --ray the device agents that are up."""
    from rich.markup import escape
    from rich.table import Table

    from nestnas.hw_profiles.devices import list_profiles

    if ray is not None:
        from nestnas.hw_profiles.farm import agent_rows, list_agents
        from nestnas.raycluster import connect

        with connect(ray, what="--ray") as joined:
            rows = agent_rows(list_agents(joined))
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        table = Table(title=f"device agents on {ray}")
        for col in ("device", "host", "cpu", "cpus", "backend", "threads", "nestnas"):
            table.add_column(col)
        for r in rows:
            table.add_row(escape(r["device"]), escape(r["host"]), escape(str(r["cpu"])), str(r["cpu_affinity"]),
                          f"{r['backend']} {r['backend_version']}", str(r["threads"]), escape(r["nestnas"]))
        console.print(table)
        return

    rows = list_profiles()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="device profiles")
    for col in ("origin", "name", "backend", "family", "subnets", "blocks", "batch", "cpu", "threads", "path"):
        table.add_column(col)
    for r in rows:
        if "error" in r:  # the reason is text, not markup (it may quote brackets)
            table.add_row(r["origin"], "[red]unreadable[/]", "", "", "", "", "", escape(r["error"]), "",
                          escape(r["path"]))
        else:
            table.add_row(r["origin"], r["name"], r["backend"], r["family"], str(r["subnets"]), str(r["blocks"]),
                          str(r["batch_size"]), str(r["cpu"]), str(r["threads"]), r["path"])
    console.print(table)


@app.command()
def fit(
    out: Annotated[Path, typer.Option(help="Predictor file to write (JSON; refitted from its data on load).")],
    profile: Annotated[Optional[Path], typer.Option(help="Device profile: fit a latency predictor.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Supernet checkpoint: fit an accuracy predictor "
                                                            "on shared-weight accuracies.")] = None,
    kind: Annotated[str, typer.Option(help="Latency predictor to save: auto (chosen by cross-validation on "
                                           "the fitting subnets; transfer on a transfer profile), hybrid, lut, "
                                           "ensemble or transfer.")] = "auto",
    samples: Annotated[int, typer.Option(min=7, help="Subnets to evaluate for an accuracy predictor.")] = 200,
    holdout: Annotated[float, typer.Option(help="Share of subnets held out for the printed figures.")] = 1 / 3,
    data: DataOpt = None,
    seed: Seed = 0,
    as_json: AsJson = False,
) -> None:
    """Fit a latency predictor on a profile (or an accuracy predictor on a checkpoint) and print
    RMSE, MAPE, Kendall tau and the share within +-10% on held-out subnets."""
    check_output(out, "--out")
    from nestnas.predictors import fitting
    from nestnas.predictors.store import save_predictor

    if (profile is None) == (checkpoint is None):
        raise ConfigError("give exactly one of --profile (latency) or --checkpoint (accuracy)")
    if data is not None and checkpoint is None:
        raise ConfigError("--data applies to an accuracy predictor (--checkpoint), not to a latency profile")
    if profile is not None:
        from nestnas.hw_profiles.profile import DeviceProfile

        prof = DeviceProfile.load(profile)
        _warn_incomplete(prof, profile)
        chosen = fitting.fit_and_select(prof, kind, holdout, seed)
        if chosen.warning:
            err_console.print(f"warning: {chosen.warning}", markup=False, soft_wrap=True)
        kind = chosen.kind
        save_predictor(out, "latency", profile, kind, seed, chosen.train, chosen.scores[kind])
        rows, unit = chosen.scores, "ms"
    else:
        rows, unit, kind = _fit_accuracy(checkpoint, out, samples, holdout, seed, as_json, data), "", "accuracy"
    summary = {"predictor": str(out), "saved_kind": kind, "heldout": rows}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"held-out subnets ({next(iter(rows.values()))['n']}), never used in fitting")
    for col in ("predictor", f"RMSE {unit}".strip(), "MAPE %", "Kendall tau", "within +-10%"):
        table.add_column(col, justify="right")
    for name, m in rows.items():
        mark = " (saved)" if name == kind else ""
        table.add_row(name + mark, f"{m['rmse']:.4f}", f"{m['mape']:.2f}", f"{m['kendall_tau']:.3f}",
                      f"{100 * m['within_10pct']:.1f}%")
    console.print(table)
    console.print(f"predictor saved to {out}")


def _warn_incomplete(prof, path: Path) -> None:
    if not prof.complete:
        err_console.print(f"warning: profile {path} is incomplete ({len(prof.measurements)} subnets; its last run "
                          f"stopped before the end); rerun `nestnas profile --out {path}` with the same options "
                          "to finish it", markup=False, soft_wrap=True)


def _fit_accuracy(checkpoint: Path, out: Path, samples: int, holdout: float, seed: int, quiet: bool,
                  data: str | None = None) -> dict:
    import hashlib

    from nestnas.hw_profiles.sampling import space_filling_sample
    from nestnas.predictors import fitting
    from nestnas.predictors.accuracy_data import AccuracyTable, measure_accuracies
    from nestnas.predictors.store import save_predictor, sha256_file
    from nestnas.supernet.checkpoint import load_supernet
    from nestnas.supernet.data import data_for_checkpoint

    net = load_supernet(checkpoint)
    dataset = data_for_checkpoint(net, checkpoint, data, seed=seed)
    table_path = out.with_suffix(".accuracy.json")
    digest = sha256_file(checkpoint)
    if data is not None:  # accuracies on other data are another table
        digest = hashlib.sha256(f"{digest}|{dataset.fingerprint}".encode()).hexdigest()
    table = None
    if table_path.exists():
        table = AccuracyTable.load(table_path)
        if table.checkpoint_sha256 != digest:
            table = None  # another checkpoint: start afresh
    train_loader, val_loader = dataset.loaders(64)
    configs = space_filling_sample(net.space, samples, seed)
    with StageBar("accuracy", not quiet, err_console) as bar:
        table = measure_accuracies(net, configs, val_loader, train_loader, digest, table, seed,
                                   progress=lambda d, t: bar("subnets", d, t), out=table_path)
    train, held = fitting.split_hashes(table.entries, holdout, seed)
    _, metrics = fitting.score_accuracy(table, train, held, seed)
    save_predictor(out, "accuracy", table_path, "ensemble", seed, train, metrics)
    return {"accuracy": metrics}


@app.command()
def search(
    checkpoint: Annotated[Path, typer.Option(help="Trained supernet checkpoint (accuracy on the validation "
                                                  "split of its data, batch norm recalibrated).")],
    out: Annotated[Path, typer.Option(help="Pareto front file to write (JSON).")],
    profile: Annotated[Optional[list[str]], typer.Option(help="Device profile: latency from its default "
                                                               "predictor. Repeat for a fleet (objective "
                                                               "latency@DEVICE per profile; NAME=FILE names the "
                                                               "device \\[default: the profile's name]).",
                                                          show_default=False)] = None,
    predictor: Annotated[Optional[Path], typer.Option(help="Saved latency predictor (instead of --profile).")] = None,
    objectives: Annotated[str, typer.Option(help="Comma-separated: accuracy, latency, macs, params.")] =
        "accuracy,latency",
    budget: Annotated[Optional[list[str]], typer.Option(help="Constraint such as latency=5 (ms), "
                                                             "latency@DEVICE=20 (one device of a fleet), "
                                                             "macs=20M or accuracy>=0.9; repeatable.")] = None,
    per_device: Annotated[bool, typer.Option("--per-device", help="With several profiles: one front per device "
                                                                  "from one run (accuracy evaluated once per "
                                                                  "subnet); a device's latency budget bounds its "
                                                                  "front only. Without it: one joint front.")] =
        False,
    evals: Annotated[int, typer.Option(min=4, help="Distinct subnets to evaluate (true evaluations).")] = 500,
    algorithm: Annotated[str, typer.Option(help="nsga2, linas, agemoea, unsga3 or random.")] = "nsga2",
    pop_size: Annotated[int, typer.Option(min=4, help="Population (LINAS: subnets evaluated per "
                                                      "iteration).")] = 40,
    cache: Annotated[Optional[Path], typer.Option(help="SQLite evaluation cache shared by searches "
                                                       "\\[default: $NESTNAS_HOME/evals.sqlite].",
                                                  show_default=False)] = None,
    state: Annotated[Optional[Path], typer.Option(help="Search state file, saved every generation and "
                                                       "resumed from \\[default: OUT.state.json].",
                                                  show_default=False)] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Also save the front as a PNG plot.")] = None,
    inner_evals: Annotated[int, typer.Option(min=100, max=1_000_000,
                                             help="LINAS: predictor-only evaluations of each iteration's inner "
                                                  "NSGA-II.")] = 5000,
    ray: Annotated[Optional[str], typer.Option(help="Evaluate accuracies on Ray actors, one supernet each: auto, "
                                                    "HOST:PORT or local:N (a private cluster of N CPUs); the "
                                                    "cache and state stay here.", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="With --ray: evaluation actors \\[default: the "
                                                               "cluster's CPUs].", show_default=False)] = None,
    data: DataOpt = None,
    seed: Seed = 0,
    as_json: AsJson = False,
) -> None:
    """Search the Pareto front of accuracy against latency (and MACs or params) on a trained
    supernet; resumable, with evaluations cached by functional hash."""
    import contextlib
    import warnings

    from nestnas.hw_profiles.devices import user_dir
    from nestnas.search import EvalCache
    from nestnas.search import search as run_search
    from nestnas.search.objectives import parse_budget
    from nestnas.search.presets import METRICS, objectives_from_files

    names = [n.strip() for n in objectives.split(",") if n.strip()]
    directions = {"accuracy": "max", "latency": "min", "macs": "min", "params": "min"}
    fleet, aliases = _search_fleet(profile or [], per_device)
    if fleet:
        del directions["latency"]
        directions.update({f"latency@{d}": "min" for d, _ in fleet})
    budgets = [parse_budget(b, directions, aliases) for b in budget or []]
    session = _search_ray(ray, workers, [*names, *(b.metric for b in budgets)]) if ray or workers else \
        contextlib.nullcontext()
    if any(n not in METRICS for n in names):
        raise ConfigError(f"--objectives: unknown objective {next(n for n in names if n not in METRICS)!r}; "
                          f"allowed: {list(METRICS)}")
    check_outputs({"--out": out, "--plot": plot, "--state": state, "--cache": cache})
    cache_path = cache or user_dir().parent / "evals.sqlite"
    state = state or out.with_name(out.name + ".state.json")
    files = {k: v.resolve() for k, v in {"--out": out, "--plot": plot, "--state": state, "--cache": cache_path}.items()
             if v is not None}
    for first, a in files.items():  # one would overwrite the other, or need it to be a folder
        for other, b in files.items():
            if first != other and (a == b or a in b.parents):
                raise ConfigError(f"{first} {a} and {other} {b} collide (the same file, or one inside the other); "
                                  "give each its own file")
    if profile:
        from nestnas.hw_profiles.profile import DeviceProfile
        from nestnas.search.presets import profile_entries

        for _, path in profile_entries(profile):
            _warn_incomplete(DeviceProfile.load(path), path)
    with warnings.catch_warnings(record=True) as fitted:  # e.g. a latency predictor fitted on unstable medians
        warnings.simplefilter("always")
        net, objs, extra = objectives_from_files(names, checkpoint, profile=profile or None, predictor=predictor,
                                                 budget_metrics=[b.metric for b in budgets], seed=seed, data=data)
    for w in fitted:
        err_console.print(f"warning: {w.message}", markup=False)
    with warnings.catch_warnings(record=True) as caught, EvalCache(cache_path) as db, session, \
            SearchProgress(not as_json, evals, err_console) as bar:
        warnings.simplefilter("always")
        front = run_search(net.space, objs, budgets, algorithm=algorithm, evals=evals, pop_size=pop_size, seed=seed,
                           extra_metrics=extra, cache=db, state=state, inner_evals=inner_evals, progress=bar,
                           per_device=per_device, ray_address=ray, workers=workers)
    for w in caught:
        err_console.print(f"warning: {w.message}", markup=False)
    from nestnas.predictors.store import sha256_file

    front.meta["checkpoint"] = {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint)}
    front.save(out, plot=plot)
    if as_json:
        summary = {"front": str(out), "plot": str(plot) if plot else None, "size": len(front),
                   "evaluated": len(front.evaluated), "hypervolume": front.hypervolume,
                   "cache_hit_rate": front.meta["cache"]["hit_rate"], "seconds": front.meta["seconds"],
                   "knee": front.knee().to_dict()}
        if front.devices:
            summary["devices"] = _device_summaries(front)
        print(json.dumps(summary, indent=2))
        return
    _print_fronts(front)
    cache_meta = front.meta["cache"]
    console.print(f"{len(front.evaluated)} subnets evaluated in {front.meta['seconds']:.0f} s; cache hits "
                  f"{cache_meta['hits']} of {cache_meta['hits'] + cache_meta['misses']} "
                  f"({100 * cache_meta['hit_rate']:.0f}%); reference point {front.reference}")
    console.print(f"front saved to {out}" + (f"; plot: {plot}" if plot else ""))


def _search_ray(ray: str | None, workers: int | None, metrics: list[str]):
    """The Ray session of `nestnas search --ray` (joined here, so that its messages name --ray),
    after the checks that need no cluster."""
    from nestnas.raycluster import connect, parse_address

    if ray is None:
        raise ConfigError("--workers needs --ray (the Ray cluster whose actors evaluate)")
    parse_address(ray, "--ray")
    if "accuracy" not in metrics:
        raise ConfigError("--ray: only the measured accuracy runs on Ray; add accuracy to --objectives or drop --ray")
    return connect(ray, what="--ray")


def _search_fleet(profiles: list[str], per_device: bool) -> tuple[list, dict]:
    """The fleet of `nestnas search` ((device, path) per profile; [] for one profile or none) and
    budget aliases (one profile: `latency@ITS-DEVICE` is `latency`)."""
    from nestnas.search.presets import fleet_devices

    if not profiles:
        if per_device:
            raise ConfigError("--per-device needs two or more --profile options (one per device)")
        return [], {}
    fleet = fleet_devices(profiles)
    if len(fleet) == 1:
        if per_device:
            raise ConfigError("--per-device needs two or more --profile options (one per device)")
        return [], {f"latency@{fleet[0][0]}": "latency"}
    return fleet, {}


def _device_summaries(front) -> dict:
    out = {}
    for device in front.devices:
        sub = front.for_device(device)
        out[device] = {"size": len(sub), "hypervolume": sub.hypervolume, "knee": sub.knee().hash,
                       "batch_size": sub.info("latency").batch_size}
    return out


def _print_fronts(front, device: str | None = None) -> None:
    """One table per device for a per-device front (or the device asked), else the front's table."""
    if device is not None:
        console.print(front.for_device(device).table())
    elif front.per_device:
        for name in front.devices:
            console.print(front.for_device(name).table())
    else:
        console.print(front.table())


@app.command()
def show(
    front: Annotated[Path, typer.Argument(help="Pareto front file written by `nestnas search`.")],
    device: Annotated[Optional[str], typer.Option(help="Show only this device's front (a fleet front).")] = None,
    as_json: AsJson = False,
) -> None:
    """Print a saved Pareto front as a table (knee marked); a per-device front as one table per
    device."""
    from nestnas.search import ParetoFront

    loaded = ParetoFront.load(front)
    if device is not None:
        loaded.for_device(device)  # a device that matches no front: one line
    if as_json:
        chosen = loaded.for_device(device) if device is not None else loaded
        summary = {"hypervolume": chosen.hypervolume, "reference": chosen.reference,
                   "knee": chosen.knee().hash, "candidates": [c.to_dict() for c in chosen]}
        if device is None and loaded.devices:
            summary["per_device"] = loaded.per_device
            summary["devices"] = {d: {**s, "candidates": [c.to_dict() for c in loaded.for_device(d)]}
                                  for d, s in _device_summaries(loaded).items()}
        print(json.dumps(summary, indent=2))
        return
    _print_fronts(loaded, device)
    shown = loaded.for_device(device) if device is not None else loaded
    meta = shown.meta
    console.print(f"{meta.get('algorithm', '?')} with seed {meta.get('seed', '?')}; reference point "
                  f"{shown.reference}; budgets: {', '.join(meta.get('budgets', [])) or 'none'}")


def _parse_pick(text: str, front) -> list:
    text = text.strip()
    if text == "knee":
        return [front.knee()]
    if text == "all":
        return list(front.candidates)
    try:
        picks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--pick {text!r}: expected knee, all or front indices such as 0,3") from None
    bad = [i for i in picks if not 0 <= i < len(front)]
    if bad or not picks:
        raise ConfigError(f"--pick {text!r}: the front has {len(front)} subnets (indices 0..{len(front) - 1})")
    return [front[i] for i in picks]


@app.command()
def export(
    front: Annotated[Path, typer.Option(help="Pareto front file from `nestnas search`.")],
    out: Annotated[Path, typer.Option(help="Bundle folder (one subnet) or folder of bundles.")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="Supernet checkpoint \\[default: the one the front "
                                                             "was searched with].", show_default=False)] = None,
    pick: Annotated[str, typer.Option(help="knee, all, or front indices such as 0,3 (see `nestnas show`).")] =
        "knee",
    formats: Annotated[Optional[str], typer.Option(help="Comma-separated: onnx, tvm \\[default: onnx,tvm, or "
                                                        "onnx where the tvm extra is not installed].",
                                                   show_default=False)] = None,
    tune_trials: Annotated[int, typer.Option(min=0, help="TVM MetaSchedule trials per unique workload, on "
                                                         "average: one round of up to 16 each, the rest to "
                                                         "the workloads that take the most time (0: untuned).")] = 32,
    tune_seconds: Annotated[Optional[float], typer.Option(help="Stop tuning new workloads after this many "
                                                               "seconds.")] = None,
    tune_strategy: Annotated[str, typer.Option(help="TVM search: evolutionary (xgboost cost model) or "
                                                    "replay-trace (random samples; ~2.5x faster per trial, "
                                                    "slower code).")] = "evolutionary",
    tune_transfer: Annotated[bool, typer.Option(help="A workload whose relative (the same kernel at other "
                                                     "sizes) is tuned starts from the relative's best "
                                                     "schedules, fitted to its sizes, instead of a search "
                                                     "round.")] = True,
    tune_db: Annotated[Optional[Path], typer.Option(help="Tuning database folder shared across exports "
                                                         "\\[default: $NESTNAS_HOME/tuning/CPU-CORES].",
                                                    show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Input batch of the artifacts \\[default: the "
                                                                 "batch the latency was predicted at, else 1].",
                                                      show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Runtime threads \\[default: all cores].",
                                                   show_default=False)] = None,
    switchable: Annotated[bool, typer.Option("--switchable", help="One bundle holding the picked subnets "
                                                                  "\\[default pick: all] and a host module that "
                                                                  "runs the most accurate one meeting a latency "
                                                                  "budget given at run time.")] = False,
    data: Annotated[Optional[str], typer.Option("--data", help="Measure the manifests' accuracy on this data's "
                                                               "validation split (a spec as for train) \\[default: "
                                                               "the front's accuracy].", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help="Device of a fleet front: pick from its front, build at its "
                                                       "batch and record it in the manifest (see `nestnas show`).")]
        = None,
    seed: Seed = 0,
    as_json: AsJson = False,
) -> None:
    """Export Pareto subnets as deployable bundles: ONNX (verified on ONNX Runtime) and a TVM
    library (tuned with one shared database, verified after reloading), with a checksummed
    manifest and latencies measured on this device. With --switchable, one bundle switches
    among the subnets by a latency budget at run time."""
    check_outputs({"--out": out, "--tune-db": tune_db}, kind="dir")
    from nestnas.compile.bundle import check_formats, installed_formats
    from nestnas.exporting import export as run_export
    from nestnas.search import ParetoFront
    from nestnas.supernet.checkpoint import load_supernet

    if formats is None:
        fmts, note = installed_formats()
        if note:
            err_console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    else:
        fmts = [f.strip() for f in formats.split(",") if f.strip()]
    fmts = list(check_formats(fmts))
    from nestnas.exporting import device_front

    loaded = device_front(ParetoFront.load(front), device, f"front {front}")
    ckpt = checkpoint or Path(loaded.meta.get("checkpoint", {}).get("path", ""))
    if not str(ckpt) or not ckpt.is_file():
        raise ConfigError(f"--checkpoint: give the supernet checkpoint the front {front} was searched with")
    net = load_supernet(ckpt)
    if net.space.fingerprint() != loaded.space.fingerprint():
        raise ConfigError(f"front {front} was searched on another search space than checkpoint {ckpt}")
    chosen = _parse_pick("all" if switchable and pick == "knee" else pick, loaded)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    if data is not None:
        chosen = _accuracy_on(net, ckpt, data, chosen, seed)
    if switchable:
        _export_switchable(net, loaded, chosen, out, fmts, threads, seed, as_json)
        return
    with StageBar("export", not as_json, err_console) as bar:
        result = run_export(chosen if len(chosen) > 1 else chosen[0], out, net=net, front=loaded, formats=fmts,
                            tune_trials=tune_trials, tune_seconds=tune_seconds, tune_strategy=tune_strategy,
                            tune_transfer=tune_transfer, database=tune_db,
                            batch_size=batch_size, threads=threads, seed=seed, progress=bar, device=device)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _bundle_table(result["manifests"], result["folders"])
    if result.get("tuning"):
        t = result["tuning"]
        console.print(f"TVM tuning: {t['unique_tasks']} unique workloads of {t['total_tasks']} tasks "
                      f"({t['reused_from_database']} already in the database, {t['tuned']} tuned with "
                      f"{t['trials']} {t['strategy']} trials, {t['transplanted']} from tuned relatives, "
                      f"{len(t['extra_rounds'])} given extra rounds, "
                      f"{t['skipped_for_time']} left for time) in "
                      f"{t['seconds']:.0f} s; database: {t['database']}")


def _accuracy_on(net, checkpoint: Path, data: str, chosen: list, seed: int) -> list:
    """`chosen` front candidates with their accuracy measured on `data` (checked to fit first)."""
    from nestnas.supernet.data import data_for_checkpoint
    from nestnas.supernet.evaluate import subnet_accuracy

    train_loader, val_loader = data_for_checkpoint(net, checkpoint, data, seed=seed).loaders(64)
    return [dataclasses.replace(c, metrics={**c.metrics, "accuracy": subnet_accuracy(net, c.config, val_loader,
                                                                                     train_loader, seed=seed)},
                                measured=tuple(dict.fromkeys([*c.measured, "accuracy"])),
                                predicted=tuple(m for m in c.predicted if m != "accuracy")) for c in chosen]


def _export_switchable(net, front, chosen, out: Path, fmts: list[str], threads, seed: int, as_json: bool) -> None:
    from nestnas.compile.switch import export_switchable

    key = "accuracy" if "accuracy" in front.names else "macs" if "macs" in front.names else None
    if key:  # least to most accurate (or smallest to largest)
        chosen = sorted(chosen, key=lambda c: c.metrics.get(key, 0.0))
    backends = [{"onnx": "onnxruntime", "tvm": "tvm"}[f] for f in fmts]
    if "onnxruntime" not in backends:
        raise ConfigError("--switchable needs the onnx format (its subgraphs are verified on ONNX Runtime)")
    with StageBar("export", not as_json, err_console) as bar:
        result = export_switchable(net, [c.config for c in chosen], out, backends, threads,
                                   [c.metrics.get("accuracy") for c in chosen] if key == "accuracy" else None,
                                   seed, bar)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"switchable bundle {result['folder']} (batch 1; the host module uses "
                        f"{result['host_uses']} latencies)")
    for col in ("subnet", *(f"{b} ms" for b in result["latencies_ms"]), *(["accuracy"] if key == "accuracy" else [])):
        table.add_column(col, justify="right")
    for i, c in enumerate(chosen):
        table.add_row(c.hash, *(f"{v[i]:.3f}" for v in result["latencies_ms"].values()),
                      *([f"{100 * c.metrics['accuracy']:.2f}%"] if key == "accuracy" else []))
    console.print(table)
    console.print(f"{result['subnets']} subnets in {result['subgraphs']} static subgraphs, "
                  f"{result['bytes'] / 1e6:.2f} MB")


def _bundle_table(manifests: list[dict], folders: list[str]) -> None:
    from rich.table import Table

    from nestnas.compile.bundle import bundle_batch

    table = Table(title="bundles (latency in ms at the bundle's batch; predicted from the front)")
    for col in ("bundle", "batch", "accuracy", "MACs", "predicted", "ONNX Runtime", "TVM", "folder"):
        table.add_column(col, justify="left" if col in ("bundle", "folder") else "right")
    for m, folder in zip(manifests, folders):
        measured = m.get("measured", {})
        pred = m.get("predicted_latency")
        def fmt(b, measured=measured):
            return f"{measured[b]['median_ms']:.3f}" if b in measured else "-"
        table.add_row(m.get("hash", m["name"]), str(bundle_batch(m)),
                      f"{100 * m['accuracy']['value']:.2f}%" if "accuracy" in m else "-",
                      f"{m['macs'] / 1e6:.2f}M" if "macs" in m else "-",
                      f"{pred['ms']:.3f}" if pred and pred.get("batch") == bundle_batch(m) else "-",
                      fmt("onnxruntime"), fmt("tvm"), folder)
    console.print(table)


def _parse_backends(text: str | None) -> list[str]:
    names = list(dict.fromkeys(b.strip() for b in (text or "").split(",") if b.strip()))
    bad = [b for b in names if b not in ("onnxruntime", "tvm")]
    if bad or (text is not None and not names):
        raise ConfigError(f"--backend {bad[0] if bad else text!r}: unknown backend; allowed: onnxruntime, tvm"
                          if bad else "--backend: give onnxruntime, tvm or both (comma-separated)")
    return names


def _bench_program(bundle: Path, kind: str, inputs: Path | None, backends: list[str], threads: int | None,
                   trust: bool, as_json: bool) -> None:
    """`nestnas bench` of a dynamic bundle (per input of --inputs) or a switchable one (per subnet)."""
    from rich.table import Table

    from nestnas.compile.runners import bench_dynamic, read_inputs
    from nestnas.compile.switch import bench_switchable

    if inputs is None and kind == "dynamic":
        raise ConfigError(f"{bundle} is a dynamic bundle, which carries no example inputs: give --inputs "
                          "FILE.npz or FILE.npy (see --help)")
    calls = read_inputs(inputs) if inputs is not None else None
    with StageBar("bench", not as_json, err_console) as bar:
        if calls is None:
            result = bench_switchable(bundle, backends or None, threads, trust, progress=bar)
        else:
            result = bench_dynamic(bundle, calls, backends or None, threads, trust, f"--inputs {inputs}",
                                   progress=bar)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    title = f"{bundle} ({result['kind']} {result['model']}, signature {result['signature']})"
    if result["kind"] == "switchable":
        table = Table(title=f"{title}: each subnet run with its own latency as the budget, measured now against "
                            f"the manifest (the host uses {result['host_uses']} latencies)")
        names = list(dict.fromkeys(r["backend"] for r in result["rows"]))
        for col in ("subnet", "hash", "budget ms", "runs", *(f"{b} {c}" for b in names for c in ("ms", "manifest"))):
            table.add_column(col, justify="left" if col == "hash" else "right")
        for i in range(result["subnets"]):
            rows = {r["backend"]: r for r in result["rows"] if r["subnet"] == i}
            first = rows[names[0]]
            table.add_row(str(i), first["hash"] or "-", f"{first['budget_ms']:.4f}",
                          "/".join(dict.fromkeys(str(r["runs"]) for r in rows.values())),
                          *(v for b in names for v in (f"{rows[b]['median_ms']:.4f}",
                                                       f"{rows[b]['manifest_ms']:.4f}" if rows[b]["manifest_ms"]
                                                       else "-")))
        console.print(table)
        return
    table = Table(title=f"{title}: latency per input over {result['inputs']} inputs")
    for col in ("backend", "median ms", "p10-p90 ms", "min-max ms", "unstable inputs"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r in result["rows"]:
        table.add_row(r["backend"], f"{r['median_ms']:.4f}", f"{r['p10_ms']:.4f}-{r['p90_ms']:.4f}",
                      f"{r['min_ms']:.4f}-{r['max_ms']:.4f}", str(r["unstable_inputs"]))
    console.print(table)
    paths = Table(title="paths (the subgraphs an input ran): median ms of their inputs")
    for col in ("subgraphs", "inputs", *result["per_input_ms"]):
        paths.add_column(col, justify="left" if col == "subgraphs" else "right")
    for p in result["paths"]:
        paths.add_row(p["subgraphs"], f"{p['inputs']} ({100 * p['share']:.0f}%)",
                      *(f"{v:.4f}" for v in p["median_ms"].values()))
    console.print(paths)
    for b in result["branches"]:
        console.print(f"branch {b['id']} (program.py line {b['line']}: {b['condition']}): taken {b['taken']}, "
                      f"skipped {b['skipped']}", markup=False, highlight=False, soft_wrap=True)
    at_save = result["branch_coverage_at_save"]
    console.print(f"{100 * result['branch_coverage']:.0f}% of branch sides reached"
                  + (f" ({100 * at_save:.0f}% by the examples at save time)" if at_save is not None else "")
                  + f"; {result['subgraphs_used']} of {result['subgraphs']} subgraphs used", highlight=False,
                  soft_wrap=True)


@app.command()
def bench(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder from `nestnas export` (static or --switchable) or "
                                                "from `nestnas.rewrite(...).save` (dynamic).")],
    inputs: Annotated[Optional[Path], typer.Option(help="Inputs of a dynamic bundle, which carries none: FILE.npy "
                                                        "(the forward's first argument) or FILE.npz (arrays arr_0, "
                                                        "arr_1, ... as np.savez writes them are the positional "
                                                        "arguments in order, other names keyword arguments; host "
                                                        "arguments such as a threshold are 1-d arrays). The first "
                                                        "axis of every array enumerates the inputs; each input is "
                                                        "timed for at most 0.2 s. A switchable bundle is timed per "
                                                        "subnet without it.", show_default=False)] = None,
    backend: Annotated[Optional[str], typer.Option(help="Backends to measure, comma-separated: onnxruntime, tvm "
                                                        "\\[default: all the bundle holds].",
                                                   show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Runtime threads \\[default: the manifest's].",
                                                   show_default=False)] = None,
    calibrate: Annotated[Optional[Path], typer.Option(help="Profile the prediction came from: re-measure five of "
                                                           "its subnets and scale the prediction by how much "
                                                           "slower or faster this device runs now.",
                                                      show_default=False)] = None,
    trust: Annotated[bool, typer.Option("--trust", help="Run an unsigned bundle although a bundle key is "
                                                        "configured (a bad signature is refused all the same).")]
        = False,
    as_json: AsJson = False,
) -> None:
    """Re-measure a bundle on this device (manifest, signature and checksums verified first) and
    compare with its manifest and the predicted latency. A dynamic bundle is timed per input of
    --inputs (median and p10-p90 over the inputs, per path, and how often each branch was
    taken); a switchable bundle per subnet, each run with its own latency as the budget."""
    from nestnas.compile.bundle import bundle_batch, measure_bundle, verify_checksums
    from nestnas.compile.runners import bundle_kind
    from nestnas.compile.signing import check_signature

    backends = _parse_backends(backend)
    kind = bundle_kind(bundle)
    if kind != "static":
        if calibrate is not None:
            raise ConfigError(f"--calibrate applies to static bundles; {bundle} is a {kind} bundle")
        _bench_program(bundle, kind, inputs, backends, threads, trust, as_json)
        return
    if inputs is not None:
        raise ConfigError(f"--inputs applies to dynamic and switchable bundles; {bundle} is a static bundle, timed "
                          "on its check input")
    manifest = verify_checksums(bundle, trust)
    signature = check_signature(manifest, f"bundle {bundle}", trust)
    speed = None
    if calibrate is not None:
        from nestnas.hw_profiles import DeviceProfile, speed_factor

        profile = DeviceProfile.load(calibrate)
        if manifest.get("family") and profile.family != manifest["family"]:
            raise ConfigError(f"--calibrate {calibrate} profiles the {profile.family} family; bundle {bundle} "
                              f"holds a {manifest['family']} subnet")
        speed = speed_factor(profile)
    now = measure_bundle(bundle, [{"onnxruntime": "onnx", "tvm": "tvm"}[b] for b in backends] or None,
                         threads=threads, trust=trust)
    pred = manifest.get("predicted_latency") or {}
    batch = bundle_batch(manifest)
    rows = []
    for backend, m in now.items():
        before = manifest.get("measured", {}).get(backend, {})
        predicted = pred.get("ms") if pred.get("batch") == batch else None
        row = {"backend": backend, "median_ms": m["median_ms"], "p10_ms": m["p10_ms"], "p90_ms": m["p90_ms"],
               "manifest_ms": before.get("median_ms"), "predicted_ms": predicted,
               "speed_factor": speed.factor if speed else None,
               "predicted_now_ms": predicted * speed.factor if speed and predicted else None}
        rows.append(row)
    if as_json:
        print(json.dumps({"bundle": str(bundle), "batch": batch, "signature": signature, "rows": rows,
                          "calibration": speed.to_dict() if speed else None}, indent=2))
        return
    if speed:
        console.print(f"this device runs at {speed.factor:.3f}x the latency of profile {calibrate} "
                      f"({len(speed.anchors)} of its subnets re-measured: "
                      f"{speed.spread[0]:.3f} to {speed.spread[1]:.3f})")
    from rich.table import Table

    table = Table(title=f"{bundle} (batch {batch}, signature {signature}): measured now against manifest and "
                        "prediction")
    for col in ("backend", "median ms", "p10-p90 ms", "manifest ms", "now/manifest",
                "predicted ms" + (" (calibrated)" if speed else ""), "measured/predicted"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r in rows:
        predicted = r["predicted_now_ms"] or r["predicted_ms"]
        table.add_row(r["backend"], f"{r['median_ms']:.4f}", f"{r['p10_ms']:.4f}-{r['p90_ms']:.4f}",
                      f"{r['manifest_ms']:.4f}" if r["manifest_ms"] else "-",
                      f"{r['median_ms'] / r['manifest_ms']:.2f}" if r["manifest_ms"] else "-",
                      f"{predicted:.4f}" if predicted else "-",
                      f"{r['median_ms'] / predicted:.2f}" if predicted else "-")
    console.print(table)


@app.command()
def keygen(
    out: Annotated[Optional[Path], typer.Option(help="Key file \\[default: $NESTNAS_HOME/bundle.key, which "
                                                     "export and load then use].", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key file (bundles signed with it "
                                                        "no longer verify).")] = False,
    as_json: AsJson = False,
) -> None:
    """Write a new random bundle key (mode 0600). Where a key is configured ($NESTNAS_BUNDLE_KEY,
    $NESTNAS_BUNDLE_KEY_FILE, or this default file), `export` signs manifests and `bench`/`load`
    refuse bundles whose signature does not verify, and unsigned ones unless trusted."""
    from nestnas.compile.signing import BundleKey
    from nestnas.compile.signing import keygen as write_key

    try:
        path = write_key(out, force)
    except ConfigError as exc:  # the library names its parameters; here they are options
        raise ConfigError(str(exc).replace("path ", "--out ", 1).replace("force=True", "--force")) from None
    key_id = BundleKey(bytes.fromhex(path.read_text().strip()), str(path)).key_id
    _report({"key_file": str(path), "key_id": key_id}, as_json, f"bundle key written to {path} (key id {key_id})")


def main(argv: list[str] | None = None) -> int:
    _escape_unencodable_output()
    try:
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except NestnasError as exc:
        _error(_with_flags(exc))
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        _error("aborted")
    except _ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            return 0  # the help was shown
        _error(exc.format_message())
    except OSError as exc:
        if exc.filename is None:
            raise  # not about a path the user can fix: a bug, keep the traceback
        _error(_os_error_line(exc))
    return 1


# Library errors name parameters ("pop_size 5 is too large"); here they are options. A message that
# starts with a parameter name gets its flag; names with an underscore are mapped anywhere.
PARAM_FLAGS = {"pop_size": "--pop-size", "evals": "--evals", "algorithm": "--algorithm", "budget": "--budget",
               "holdout": "--holdout", "kind": "--kind", "objectives": "--objectives", "predictor": "--predictor",
               "max_minutes": "--max-minutes", "passes": "--passes", "batch_size": "--batch-size",
               "threads": "--threads", "inner_evals": "--inner-evals", "kappa": "--kappa", "formats": "--formats",
               "out_dir": "--out", "backend": "--backend", "tune_trials": "--tune-trials",
               "tune_seconds": "--tune-seconds", "n_samples": "--samples", "inputs": "--inputs"}


def _with_flags(exc: NestnasError) -> str:
    import re

    message = str(exc)
    if not isinstance(exc, ConfigError):  # about a file's contents, not an option
        return message
    first = re.match(r"[a-z_]+", message)
    if first and first.group() in PARAM_FLAGS and message[first.end():first.end() + 1] in (" ", ":", "="):
        message = PARAM_FLAGS[first.group()] + message[first.end():]
    return re.sub(r"\b(?<!-)([a-z]+_[a-z_]+)\b", lambda m: PARAM_FLAGS.get(m.group(1), m.group(1)), message)


def _escape_unencodable_output() -> None:
    """A file name that is not UTF-8 reaches Python as lone surrogates, which a strict stream
    cannot encode: print them escaped instead of failing after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _os_error_line(exc: OSError) -> str:
    """`cannot write PATH: REASON` for what only a write can hit, else `PATH: REASON`."""
    import errno

    where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else f"{exc.filename}"
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return f"cannot write {where}: {reason}"
    return f"{where}: {reason}"


def _error(message: str) -> None:
    line = " ".join(message.split())
    err_console.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
