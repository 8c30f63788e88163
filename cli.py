"""`nestnas` command line: a thin Typer shell over the library.

User errors (NestnasError) become one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from nestnas import __version__
from nestnas.errors import ConfigError, NestnasError

app = typer.Typer(
    name="nestnas", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Hardware-aware subnetwork search over weight-sharing supernets, with a compiler bridge.",
)
console = Console()
err_console = Console(stderr=True)
# Typer has vendored click since 0.20; take its base class from Typer itself so either works.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

Seed = Annotated[int, typer.Option(help="Seed of every random choice (results reproduce bit for bit).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


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


def _read_config(text: str):
    """A config given inline as JSON or as the path of a JSON file."""
    from nestnas.supernet.config import SubnetConfig

    if text.lstrip().startswith("{"):
        return SubnetConfig.from_json(text)
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"--config: {text!r} is neither inline JSON nor an existing file")
    try:
        return SubnetConfig.from_json(path.read_text())
    except ConfigError as exc:
        raise ConfigError(f"--config {path}: {exc}") from None


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Checkpoint file to write (resumed if it exists).")],
    family: Annotated[str, typer.Option(help="Supernet family: cnn or transformer.")] = "cnn",
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Training epochs [default: 8 for cnn, 60 for "
                                                              "transformer].", show_default=False)] = None,
    sandwich: Annotated[int, typer.Option(min=0, help="Subnets trained per step besides the largest and smallest.")] = 2,
    distill: Annotated[bool, typer.Option(help="Train subnets on the largest subnet's soft predictions.")] = True,
    sorted_ladder: Annotated[bool, typer.Option(help="Draw subnets from a sorted ladder of nested subnets "
                                                     "(SortedNet) instead of at random.")] = False,
    grad_accum: Annotated[int, typer.Option(min=1, help="Batches per optimiser step.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Training batch size.")] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (AdamW, cosine schedule).")] = 4e-3,
    resume: Annotated[bool, typer.Option(help="Continue from OUT if it holds an unfinished run.")] = True,
    seed: Seed = 0,
    as_json: AsJson = False,
) -> None:
    """Train a supernet on the embedded digits data set and write a checkpoint."""
    import torch

    from nestnas.supernet import SearchSpace, build_supernet
    from nestnas.supernet.data import digits_loaders
    from nestnas.supernet.evaluate import subnet_accuracy
    from nestnas.supernet.train import DEFAULT_EPOCHS, train_supernet

    space = SearchSpace.for_family(family)
    epochs = epochs or DEFAULT_EPOCHS[family]
    torch.manual_seed(seed)
    train_loader, val_loader = digits_loaders(family, batch_size, seed)
    net = build_supernet(space, num_classes=10)
    result = train_supernet(net, train_loader, epochs, sandwich=sandwich, distill=distill,
                            sorted_ladder=sorted_ladder, grad_accum=grad_accum, seed=seed, lr=lr,
                            checkpoint=out, resume=resume, progress=not as_json)
    summary = {
        "checkpoint": str(out), "family": family, "epochs": epochs, "train_seconds": result.seconds,
        "resumed_from_epoch": result.resumed_from_epoch,
        "val_acc_largest": subnet_accuracy(net, space.largest(), val_loader, train_loader, seed=seed),
        "val_acc_smallest": subnet_accuracy(net, space.smallest(), val_loader, train_loader, seed=seed),
    }
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(f"checkpoint {out}: largest {100 * summary['val_acc_largest']:.2f}%, "
                      f"smallest {100 * summary['val_acc_smallest']:.2f}% validation accuracy "
                      f"({result.seconds:.0f} s of training)")


@app.command("eval")
def eval_(
    checkpoint: Annotated[Path, typer.Option(help="Supernet checkpoint (from `nestnas train`).")],
    config: Annotated[Optional[str], typer.Option(help="Subnet config as inline JSON or a JSON file; "
                                                       "default: largest and smallest.")] = None,
    seed: Seed = 0,
    as_json: AsJson = False,
) -> None:
    """Shared-weight accuracy (batch norm recalibrated), params and MACs of subnets of a checkpoint."""
    from nestnas.quickstart import describe_subnet, subnet_table
    from nestnas.supernet.checkpoint import load_supernet
    from nestnas.supernet.data import digits_loaders

    net = load_supernet(checkpoint)
    space = net.space
    if config is not None:
        picks = [("config", space.validate(_read_config(config)))]
    else:
        picks = [("largest", space.largest()), ("smallest", space.smallest())]
    train_loader, val_loader = digits_loaders(space.family, 64, seed)
    rows = [(name, describe_subnet(net, c, val_loader, train_loader, seed)) for name, c in picks]
    if as_json:
        print(json.dumps({name: r for name, r in rows}, indent=2))
    else:
        console.print(subnet_table(f"{checkpoint}", rows))


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Folder for the checkpoint and results.")] = Path("nestnas-quickstart"),
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Supernet training epochs [default: 8].",
                                                  show_default=False)] = None,
    seed: Seed = 0,
    as_json: AsJson = False,
) -> None:
    """Run every stage of the pipeline on scikit-learn's digits (a few minutes on 2 cores)."""
    from nestnas.quickstart import run_quickstart
    from nestnas.supernet.train import DEFAULT_EPOCHS

    summary = run_quickstart(out, epochs=epochs or DEFAULT_EPOCHS["cnn"], seed=seed, console=Console(stderr=True) if as_json else console,
                             progress=not as_json)
    if as_json:
        print(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> int:
    try:
        rv = app(args=argv, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except NestnasError as exc:
        _error(str(exc))
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        _error("aborted")
    except _ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            return 0  # the help was shown
        _error(exc.format_message())
    return 1


def _error(message: str) -> None:
    line = " ".join(message.split())
    err_console.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
