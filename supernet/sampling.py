"""Which subnets one sandwich step trains.

The largest subnet always comes first (the teacher, trained on the labels), then the smallest,
then `sandwich` more: drawn with every choice uniform (``sampling="uniform"``), drawn so that
their MACs are uniform between the smallest's and the largest's (``"macs"``: choice-uniform
draws pile up in the middle of the choices, which is rarely the middle in cost) or uniform in
log MACs (``"log-macs"``: as many draws between 1x and 2x the smallest's cost as between half
and all of the largest's; linear MACs spend most draws on the largest subnets), or interior
rungs of a sorted ladder of nested subnets (SortedNet, ``sorted_ladder``). ``"attentive"``
(AttentiveNAS's worst-up) draws a target in log MACs as ``"log-macs"`` does, takes the
`ATTENTIVE_POOL` candidates nearest to it in cost, and trains the one whose loss on the step's
batch is highest: of subnets of one cost, the weak one gets the update, so the middle of the
space is not left behind its neighbours. Scoring costs `ATTENTIVE_POOL` forward passes without
gradients per subnet, on the first `SCORE_ROWS` rows of the batch.

With ``step_resolution`` every subnet of a step, the largest and smallest included, runs at one
input size drawn for the step (Once-for-All samples the resolution per batch): otherwise the
largest always sees the largest input and the smallest the smallest, and the subnets trained most
never see the sizes in between.

With ``progressive`` (Once-for-All's progressive shrinking) the space opens in phases over the
epochs: the largest alone, then elastic kernels (and input size), then depth, then width; a
phase only draws subnets whose closed choices sit at their largest option. A family without a
kind of choice skips that phase.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from nestnas.errors import ConfigError
from nestnas.supernet.config import SubnetConfig

if TYPE_CHECKING:
    from nestnas.supernet.base import Supernet
    from nestnas.supernet.train import TrainOptions

SAMPLINGS = ("uniform", "macs", "log-macs", "attentive")
DISTILL_FROM = ("largest", "previous")
#: Progressive shrinking: the phases and the share of the epochs at which each begins.
PHASES = ("largest", "kernel", "depth", "width")
PHASE_STARTS = (0.0, 0.125, 0.25, 0.5)
#: Choices opened with elastic kernels: kernel sizes, and the input size (elastic from the start in OFA).
KERNEL_CHOICES = ("kernel_sizes", "resolution", "seq_len")
INPUT_SIZE_CHOICES = ("resolution", "seq_len")
MACS_POOL = 128  # candidates per MACs-uniform draw
ATTENTIVE_POOL = 3  # equal-cost candidates per attentive draw, the worst of which is trained
SCORE_ROWS = 16  # rows of the batch an attentive draw scores its candidates on


def choice_group(var) -> str:
    """Progressive-shrinking group of a search variable: "kernel", "depth" or "width"."""
    if var.depth:
        return "depth"
    return "kernel" if var.name.split("[")[0] in KERNEL_CHOICES else "width"


def phase_masks(space) -> list[np.ndarray]:
    """Per phase of `PHASES`, which encoded variables are open. A phase that opens nothing new
    (the family has no such choice) takes the next phase's mask, so no epochs are spent idle."""
    groups = [choice_group(v) for v in space.variables()]
    masks = [np.array([g in PHASES[1:p + 1] for g in groups]) for p in range(len(PHASES))]
    for p in range(len(masks) - 2, 0, -1):
        if (masks[p] == masks[p - 1]).all():
            masks[p] = masks[p + 1]
    return masks


def phase_of(epoch: int, epochs: int) -> int:
    """Index in `PHASES` of 0-based `epoch` of a run of `epochs`."""
    share = epoch / epochs
    return max(p for p, start in enumerate(PHASE_STARTS) if share >= start)


def macs_uncountable(net: Supernet) -> str | None:
    """Why `net`'s family cannot have its MACs counted (None when it can)."""
    from nestnas.predictors.macs import count_macs_encoded

    try:
        count_macs_encoded(net.space, net.space.upper_bounds()[None, :], **net.spec())
    except (ConfigError, NotImplementedError, KeyError) as exc:
        return str(exc) or type(exc).__name__
    return None


class SubnetSampler:
    """Draws the subnets of each step of a run of `opts` on `net` (see the module text)."""

    def __init__(self, net: Supernet, opts: TrainOptions):
        self.space, self.opts = net.space, opts
        self.top = self.space.upper_bounds()
        self.ladder = self.space.ladder(opts.ladder_rungs) if opts.sorted_ladder else []
        self.masks = phase_masks(self.space) if opts.progressive else None
        self.spec = None
        self.size_vars = np.array([v.name in INPUT_SIZE_CHOICES for v in self.space.variables()], bool)
        if opts.sampling in ("macs", "log-macs", "attentive") or opts.distill_from == "previous":
            why = macs_uncountable(net)
            if why:
                raise ConfigError(f"training options sampling={opts.sampling!r}, distill_from="
                                  f"{opts.distill_from!r} need MACs of the {self.space.family!r} family, which "
                                  f"cannot be counted: {why}")
            self.spec = net.spec()

    def _macs(self, X: np.ndarray) -> np.ndarray:
        from nestnas.predictors.macs import count_macs_encoded

        return count_macs_encoded(self.space, X, **self.spec)[0]

    def _open(self, epoch: int) -> np.ndarray | None:
        """Open variables at `epoch`, None when all are."""
        if self.masks is None:
            return None
        mask = self.masks[phase_of(epoch, self.opts.epochs)]
        return None if mask.all() else mask

    def draw(self, epoch: int, rng: np.random.Generator,
             score: Callable[[list[SubnetConfig]], list[float]] | None = None) -> list[SubnetConfig]:
        """[largest, smallest, *others] of one step at `epoch`; with `distill_from="previous"`
        the others come largest first by MACs, so each can learn from the one before it.
        Attentive sampling needs `score` (configs -> loss of each on the step's batch)."""
        space, opts = self.space, self.opts
        if self.masks is not None and phase_of(epoch, opts.epochs) == 0:
            return [space.largest()]
        open_ = self._open(epoch)
        groups = None  # attentive: per slot, the equal-cost candidates
        if opts.sorted_ladder:
            interior = rng.choice(np.arange(1, len(self.ladder) - 1), size=min(opts.sandwich, len(self.ladder) - 2),
                                  replace=False)
            extra = [space.encode(self.ladder[i]) for i in sorted(interior.tolist())]
        elif opts.sampling == "attentive":
            groups = [self._macs_uniform(rng, open_, log=True, k=ATTENTIVE_POOL) for _ in range(opts.sandwich)]
            extra = [g[0] for g in groups]
        elif opts.sampling in ("macs", "log-macs"):
            extra = [self._macs_uniform(rng, open_, log=opts.sampling == "log-macs") for _ in range(opts.sandwich)]
        elif open_ is None:
            extra = [space.encode(space.sample(rng)) for _ in range(opts.sandwich)]
        else:
            extra = [np.where(open_, rng.integers(0, self.top + 1), self.top) for _ in range(opts.sandwich)]
        smallest = np.zeros_like(self.top) if open_ is None else np.where(open_, 0, self.top)
        if opts.distill_from == "previous" and extra and groups is None:
            extra = self._largest_first(extra)
        largest = self.top
        if opts.step_resolution and self.size_vars.any():
            sizes = self.size_vars if open_ is None else self.size_vars & open_
            size = rng.integers(0, self.top + 1)  # drawn after the subnets, which stay those drawn without it
            largest, smallest, *extra = (np.where(sizes, size, x) for x in (largest, smallest, *extra))
            if groups is not None:
                groups = [np.where(sizes, size, g) for g in groups]
        if groups is not None:
            if score is None:
                raise ConfigError("attentive sampling scores its candidates on the step's batch: give draw() a score")
            extra = [g[int(np.argmax(score([space.decode(x) for x in g])))] for g in groups]
            if opts.distill_from == "previous" and extra:
                extra = self._largest_first(extra)
        return [space.decode(largest), space.decode(smallest), *(space.decode(x) for x in extra)]

    def _largest_first(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        macs = self._macs(np.stack(rows))
        return [rows[i] for i in np.argsort(-macs, kind="stable")]

    def _macs_uniform(self, rng: np.random.Generator, open_: np.ndarray | None, log: bool = False,
                      k: int | None = None) -> np.ndarray:
        """One candidate at a MACs target drawn uniformly (in log MACs with `log`); with `k`, the
        `k` candidates nearest to the target, nearest first, as an array of rows."""
        top = self.top
        # Candidates at every level of size (each choice binomial around a per-candidate share q):
        # choice-uniform candidates would rarely reach the largest MACs.
        pool = rng.binomial(top, rng.uniform(0, 1, size=(MACS_POOL, 1)))
        low = np.zeros_like(top)
        if open_ is not None:
            pool = np.where(open_, pool, top)
            low = np.where(open_, 0, top)
        macs = self._macs(np.vstack([pool, low, top]))
        if log:
            target = rng.uniform(np.log(macs[-2]), np.log(macs[-1]))
            distance = np.abs(np.log(macs[:-2]) - target)
        else:
            target = rng.uniform(macs[-2], macs[-1])
            distance = np.abs(macs[:-2] - target)
        if k is None:
            return pool[int(np.argmin(distance))]
        return pool[np.argsort(distance, kind="stable")[:k]]
